"""Never lose a run: atomic checkpoints, exact resume after SIGKILL, SIGTERM, non-finite training."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import sigterm_after_first_step, train_config
from safetensors.torch import load_file

from p3o.cli import main
from p3o.errors import UsageError
from p3o.utils.checkpoints import checkpoints, latest_checkpoint
from p3o.rl.train import build_trainer, run_train


def cli_args(assets, out, *extra):
    return ["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out), "--max_steps", "6",
            "--pairs_per_step", "4", "--minibatch_pairs", "2", "--epochs", "2", "--max_new_tokens", "5",
            "--learning_rate", "1e-3", "--seed", "3", "--disable_progress_bar", *extra]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.mark.parametrize("algo", ["p3o-v2", "ppo"])
def test_checkpoints_hold_the_whole_state_and_rotate(assets, tmp_path, algo):
    out = tmp_path / "run"
    assert main(cli_args(assets, out, "--algo", algo, "--save_steps", "2", "--save_total_limit", "2")) == 0
    found = checkpoints(out)
    assert [p.name for p in found] == ["checkpoint-4", "checkpoint-6"]  # the last step's too, as transformers
    names = {p.name for p in found[0].iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.json",
            "tokenizer.json"} <= names
    assert ("value_head.safetensors" in names) == (algo == "ppo")
    state = json.loads((found[0] / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["optimizer_steps"] == 4 * 2 * 2 and state["kl_control"]["value"] == 0.05
    torch.load(found[0] / "optimizer.pt", weights_only=True)  # loadable without unpickling code
    torch.load(found[0] / "rng.pt", weights_only=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("algo", ["p3o-v2", "ppo"])
def test_resume_from_a_checkpoint_is_bit_identical(assets, tmp_path, algo):
    whole = tmp_path / "whole"
    assert main(cli_args(assets, whole, "--algo", algo)) == 0
    part = tmp_path / "part"
    assert main(cli_args(assets, part, "--algo", algo, "--save_steps", "2")) == 0
    for name in ("model.safetensors", "metrics.jsonl"):
        (part / name).unlink()
    import shutil

    shutil.rmtree(part / "checkpoint-4")  # as if the run had died between steps 2 and 4
    assert main(cli_args(assets, part, "--algo", algo, "--save_steps", "2", "--resume")) == 0
    assert_same_weights(weights(whole), weights(part))
    if algo == "ppo":
        assert_same_weights(load_file(str(whole / "value_head.safetensors")), load_file(str(part / "value_head.safetensors")))


def test_sigkill_at_any_moment_then_resume_is_bit_identical(assets, tmp_path):
    """A real `kill -9` of the training process, twice, at different moments; then --resume."""
    whole = tmp_path / "whole"
    assert main(cli_args(assets, whole, "--max_steps", "8")) == 0
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "p3o", *cli_args(assets, out, "--max_steps", "8", "--save_steps", "1", "--resume")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kill_after in ("checkpoint-2", "checkpoint-5"):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not (out / kill_after).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-step, maybe mid-checkpoint: whatever it was doing
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = subprocess.run(args, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_same_weights(weights(whole), weights(out))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # lines after the checkpoint were rewritten, not duplicated


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(assets, tmp_path):
    out = tmp_path / "run"
    code, last = sigterm_after_first_step(cli_args(assets, out, "--max_steps", "200"), out)
    assert code == 130
    assert "stopped by SIGTERM" in last and "--resume" in last
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and 0 < json.loads((checkpoint / "trainer_state.json").read_text())["step"] < 200


def test_resume_refuses_changed_settings_and_a_directory_without_checkpoints(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(assets, out, "--save_steps", "2")) == 0
    assert main(cli_args(assets, out, "--save_steps", "2", "--resume", "--learning_rate", "5e-4")) == 2
    assert "--learning_rate 0.001 -> 0.0005" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(cli_args(assets, other, "--resume")) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"  # nothing there yet: --resume starts from the beginning
    assert main(cli_args(assets, fresh, "--resume", "--max_steps", "2")) == 0
    # A longer run resumes where the schedule does not span the run (the default), not under a decay
    constant = cli_args(assets, tmp_path / "constant", "--save_steps", "1")
    assert main([*constant, "--max_steps", "2"]) == 0
    assert main([*constant, "--max_steps", "3", "--resume"]) == 0
    linear = cli_args(assets, tmp_path / "linear", "--lr_scheduler_type", "linear", "--save_steps", "1")
    assert main([*linear, "--max_steps", "2"]) == 0
    assert main([*linear, "--max_steps", "3", "--resume"]) == 2
    assert "--max_steps 2 -> 3" in capsys.readouterr().err


def test_the_python_api_resumes_from_checkpoint_as_transformers_does(assets, tmp_path, capsys):
    """`train(resume_from_checkpoint=True or DIR)` on a directory holding checkpoints: the same weights
    as a run never stopped; a named checkpoint is checked against the run's settings as --resume is."""
    from p3o import P3OConfig, P3OTrainer
    from p3o.cli.args import config_from_argv

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(cli_args(assets, whole, "--max_steps", "4")) == 0
    assert main(cli_args(assets, part, "--max_steps", "4", "--save_steps", "2")) == 0
    for name in ("model.safetensors", "metrics.jsonl"):  # as if the run had died after checkpoint-2
        (part / name).unlink()
    assert main(cli_args(assets, part, "--max_steps", "4", "--save_steps", "2")) == 2  # the command line says how to continue
    assert "--resume to continue from its latest checkpoint" in capsys.readouterr().err
    cfg = config_from_argv(P3OConfig, cli_args(assets, part, "--max_steps", "4", "--save_steps", "2")[1:])
    changed = P3OTrainer(args=dataclasses.replace(cfg, learning_rate=5e-4))
    with pytest.raises(UsageError, match="--learning_rate 0.001 -> 0.0005"):
        changed.train(resume_from_checkpoint=str(part / "checkpoint-2"))
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        changed.train(resume_from_checkpoint=str(part / "checkpoint-3"))
    P3OTrainer(args=cfg).train(resume_from_checkpoint=True)
    assert_same_weights(weights(whole), weights(part))


def test_a_half_written_checkpoint_is_never_taken_for_a_complete_one(assets, tmp_path):
    out = tmp_path / "run"
    assert main(cli_args(assets, out, "--save_steps", "2", "--max_steps", "2")) == 0
    torn = out / "checkpoint-3"  # a directory without its state file: a crash before the rename cannot make it
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"garbage")
    (out / ".checkpoint-4.tmp").mkdir()
    assert latest_checkpoint(out).name == "checkpoint-2"


def test_repeated_non_finite_updates_stop_the_run_with_a_clear_error(assets, tmp_path):
    """The RL engine's guard is the core's (shared with SFT and RM), still importable from the engine."""
    import dataclasses

    from p3o.core.skips import NonFiniteTraining as CoreNonFiniteTraining
    from p3o.rl.engine import NonFiniteTraining

    assert NonFiniteTraining is CoreNonFiniteTraining and issubclass(NonFiniteTraining, UsageError)

    cfg = train_config(assets, tmp_path, max_steps=5, max_consecutive_skips=3, epochs=1)
    trainer = build_trainer(cfg)
    algorithm = trainer.algorithm

    def poisoned(batch, outputs, cfg):
        losses, stats = algorithm.loss(batch, outputs, cfg)
        return losses * float("nan"), stats

    trainer.algorithm = dataclasses.replace(algorithm, loss=poisoned)
    with pytest.raises(NonFiniteTraining, match="3 optimiser steps in a row had a non-finite"):
        trainer.train()
    assert trainer.state.optimizer_steps == 0
    assert (trainer.state.skipped_updates, trainer.state.consecutive_skips) == (3, 3)


def test_the_config_flags_of_checkpointing_are_validated(assets, tmp_path):
    with pytest.raises(UsageError, match="--save_steps must be >= 0"):
        train_config(assets, tmp_path, save_steps=-1)
    with pytest.raises(UsageError, match="max_consecutive_skips must be at least 1"):
        train_config(assets, tmp_path, max_consecutive_skips=0)
    assert run_train  # the Python entry point used by the pipeline stays importable


def test_overwrite_removes_the_earlier_runs_checkpoints_so_resume_never_mixes_two_runs(assets, tmp_path):
    """Run A's checkpoint-4 stayed under run B's --overwrite: B's --resume continued from it (two
    runs mixed, silently) and --save_total_limit deleted B's own checkpoints instead."""
    out = tmp_path / "run"
    assert main(cli_args(assets, out, "--max_steps", "4", "--save_steps", "2")) == 0
    (out / "notes.txt").write_text("mine")
    assert main(cli_args(assets, out, "--max_steps", "2", "--save_steps", "1", "--seed", "5", "--overwrite")) == 0
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own folders go
    # A checkpoint that is this run's own input is refused, never removed.
    assert main([*cli_args(assets, out, "--max_steps", "2", "--overwrite"), "--model_name_or_path",
                 str(out / "checkpoint-1")]) == 2
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


def test_a_requeued_resume_starts_over_where_the_first_try_died_before_its_first_checkpoint(assets, tmp_path,
                                                                                             capsys):
    out = tmp_path / "run"
    assert main(cli_args(assets, out, "--max_steps", "2")) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(cli_args(assets, out, "--max_steps", "2", "--resume")) == 0  # requeued after it finished: done
    assert "holds a finished run" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    # As if killed after logging, before a checkpoint:
    for path in out.iterdir():  # keep what a run writes before its first checkpoint
        if path.name not in ("config.yaml", "metrics.jsonl", "completions.jsonl"):
            path.unlink()
    (out / ".checkpoint-1.tmp").mkdir()  # a torn one too
    assert main(cli_args(assets, out, "--max_steps", "2", "--resume")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "model.safetensors").is_file() and not (out / ".checkpoint-1.tmp").exists()
    for path in out.iterdir():
        if path.name not in ("config.yaml", "metrics.jsonl", "completions.jsonl"):
            path.unlink()
    (out / "notes.txt").write_text("mine")  # a file p3o did not write: refused, as before
    assert main(cli_args(assets, out, "--max_steps", "2", "--resume")) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_the_python_apis_resume_from_checkpoint_true_is_resume(assets, tmp_path, capsys):
    """`train(resume_from_checkpoint=True)` takes what --resume takes: a finished run is nothing to do
    (AlreadyFinished) and a start that died before its first checkpoint starts over; the trainer's
    construction refused both as "not empty". A plain train() there is still refused. And --resume of a
    finished run with other settings is refused, naming them (it said "nothing to do")."""
    from p3o import P3OConfig, P3OTrainer
    from p3o.cli.args import config_from_argv
    from p3o.errors import AlreadyFinished

    out = tmp_path / "run"
    assert main(cli_args(assets, out, "--max_steps", "2")) == 0
    cfg = config_from_argv(P3OConfig, cli_args(assets, out, "--max_steps", "2")[1:])
    with pytest.raises(AlreadyFinished, match="holds a finished run"):
        P3OTrainer(args=cfg).train(resume_from_checkpoint=True)
    with pytest.raises(UsageError, match="not empty"):
        P3OTrainer(args=cfg).train()
    assert main(cli_args(assets, out, "--max_steps", "2", "--resume", "--beta", "0.5")) == 2
    assert "started with other settings (--beta 0.05 -> 0.5)" in capsys.readouterr().err
    for path in out.iterdir():  # as if killed after logging, before a checkpoint
        if path.name not in ("config.yaml", "metrics.jsonl", "completions.jsonl"):
            path.unlink()
    P3OTrainer(args=cfg).train(resume_from_checkpoint=True)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "model.safetensors").is_file()


def test_the_last_step_is_checkpointed_so_a_finished_run_extends_and_a_signal_waits_for_the_final_save(
        assets, tmp_path, monkeypatch, caplog):
    import p3o.rl.train as rl_train

    out = tmp_path / "run"
    save = rl_train._save_policy

    def interrupted_save(trainer, where):  # SIGTERM while the final model is being written
        os.kill(os.getpid(), signal.SIGTERM)
        save(trainer, where)

    monkeypatch.setattr(rl_train, "_save_policy", interrupted_save)
    assert main(cli_args(assets, out, "--max_steps", "2")) == 0  # the run is complete
    assert "SIGTERM came during the final save, which finished first: the run in" in caplog.text
    assert (out / "model.safetensors").is_file() and latest_checkpoint(out) is None
    assert main(cli_args(assets, out, "--max_steps", "2", "--save_steps", "1", "--overwrite")) == 0
    assert (out / "model.safetensors").is_file() and latest_checkpoint(out).name == "checkpoint-2"
    monkeypatch.setattr(rl_train, "_save_policy", save)
    assert main(cli_args(assets, out, "--max_steps", "3", "--save_steps", "1", "--resume")) == 0  # from step 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    straight = tmp_path / "straight"
    assert main(cli_args(assets, straight, "--max_steps", "3")) == 0
    assert_same_weights(weights(straight), weights(out))


def test_a_full_disk_is_one_line_and_leaves_no_half_written_checkpoint(assets, tmp_path, monkeypatch, capsys):
    import errno
    import shutil
    from collections import namedtuple

    import p3o.rl.train as rl_train
    from p3o.utils.checkpoints import write_checkpoint

    def torn(tmp):  # torch.save on a full disk: a RuntimeError of its own, not an OSError
        (tmp / "optimizer.pt").write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 159488 vs 159376")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1024))
    with pytest.raises(UsageError, match="no space left on the device of .* while writing checkpoint-3"):
        write_checkpoint(tmp_path, 3, torn, None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space to spare it is no disk error
        write_checkpoint(tmp_path, 3, torn, None)

    def bug(tmp):  # a genuine bug while the disk happens to be nearly full: not called a full disk
        raise TypeError("Object of type set is not JSON serializable")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1024))
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_checkpoint(tmp_path, 3, bug, None)
    assert list(tmp_path.iterdir()) == []

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(rl_train, "write_yaml", full)
    assert main(cli_args(assets, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "Traceback" not in err[0]


def test_a_moved_run_keeps_its_neighbours_and_nothing_else(tmp_path):
    """`moved_along`: a path that lay beside the run's old directory, and is gone from there, is taken
    beside the new one; hub names, other paths, paths still in place (a copied run) and runs whose
    folder is the working directory or / are left as they were."""
    from p3o.utils.checkpoints import check_resumable, moved_along
    from p3o.errors import UsageError

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sft").mkdir()  # still at the old place: the run was copied, not moved
    copied = {"output_dir": str(tmp_path / "runs" / "train"), "model_name_or_path": str(tmp_path / "runs" / "sft")}
    kept = moved_along(copied, copied["output_dir"], "/b/runs/train")
    assert kept["model_name_or_path"] == str(tmp_path / "runs" / "sft")

    saved = {"output_dir": "/a/runs/train", "model_name_or_path": "/a/runs/sft", "reward_fn": ["/a/runs/r.py:f", "x:y"],
             "dataset": "/data/p.jsonl", "tokenizer_name_or_path": "HuggingFaceTB/SmolLM2-135M"}
    moved = moved_along(saved, saved["output_dir"], "/b/runs/train")
    assert moved == {**saved, "output_dir": "/b/runs/train", "model_name_or_path": "/b/runs/sft",
                     "reward_fn": ["/b/runs/r.py:f", "x:y"]}
    assert moved_along(saved, "/a/runs/train", "/a/runs/train") == saved  # not moved
    assert moved_along({"model_name_or_path": "gpt2"}, "train", "/b/train") == {"model_name_or_path": "gpt2"}
    assert moved_along({"model_name_or_path": "/a/sft"}, "/train", "/b/train") == {"model_name_or_path": "/a/sft"}
    current = {**saved, "output_dir": "/b/runs/train", "model_name_or_path": "/b/runs/sft"}
    check_resumable(saved, current, {"output_dir"})  # moved along: accepted
    check_resumable(saved, {**current, "model_name_or_path": "/a/runs/sft"}, {"output_dir"})  # the old place: too
    with pytest.raises(UsageError, match="model_name_or_path"):
        check_resumable(saved, {**current, "model_name_or_path": "/b/other"}, {"output_dir"})
