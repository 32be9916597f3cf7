"""Several processes on CPU (gloo) under torchrun: prompts are sharded, gradients synchronised."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NOUNS, TARGETS, prompt_rows, write_jsonl
from safetensors.torch import load_file

from p3o.cli import main

WORKER = Path(__file__).with_name("ddp_worker.py")
ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def launch(processes: int, *target: str, fsdp: bool = False, zero_stage: int = 0,
           p3o_flags: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port of its own) on `processes` CPU processes; `fsdp`: the
    worker shards every run with FSDP2 (see ddp_worker.force_fsdp_on_cpu); `zero_stage` 2 or 3:
    `accelerate launch` with p3o's zero2.yaml or zero3.yaml, as a user runs it; `p3o_flags`: no
    launcher, `python -m p3o <target> --num_processes <processes>` (p3o.cli.launch, ddp.yaml)."""
    from p3o import accelerate_configs

    env = {**os.environ, **ENV, "PYTHONPATH": str(WORKER.parent), "P3O_TEST_FSDP": "1" if fsdp else "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    if zero_stage or p3o_flags:
        env.pop("ACCELERATE_USE_CPU")  # accelerate ignores DeepSpeed under it; p3o's flags: as a user has it
    if zero_stage:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(accelerate_configs.path(f"zero{zero_stage}")), "--num_processes", str(processes),
                   "--main_process_port", "0"]  # accelerate picks a free port just before binding it
    if p3o_flags:
        command, target = [sys.executable, "-m", "p3o"], (*target, "--num_processes", str(processes))
    command.extend(target)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_args(assets, out: Path, algo: str, pairs: int, steps: int = 2) -> list[str]:
    return ["--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out / "run"), "--algo", algo,
            "--max_steps", str(steps), "--pairs_per_step", str(pairs), "--max_new_tokens", "6",
            "--learning_rate", "1e-2", "--seed", "0", "--disable_progress_bar"]


SAMPLED = ["p3o-v2", "ppo"]
FIXED = [("p3o-v1", "group-mean"), ("p3o-v1", "token-mean"), ("rloo", "group-mean"), ("ppo", "token-mean")]
FSDP = [("p3o-v1", "token-mean"), ("ppo", "token-mean")]
ZERO = {2: FIXED, 3: FSDP}  # ZeRO-3 partitions what ZeRO-2 does, and the weights: the costlier runs, fewer


@pytest.fixture(scope="session")
def worker_runs(assets, tmp_path_factory, worker_id) -> Path:
    """Every ddp_worker run of this file, one launch per kind: DDP on 2 processes (sampled runs, the
    FIXED runs with 4 prompts a process, `sft` and `rm`), the FIXED runs on 1 process with all 8, and
    FSDP2, ZeRO-2 and ZeRO-3 on 2 processes (FIXED runs and the `train`, `sft`, `rm` commands). Under
    pytest-xdist without --dist loadfile, the first worker to get here launches them and the others
    wait for it and read the results."""
    from filelock import FileLock

    session = tmp_path_factory.getbasetemp()  # under xdist, each worker's own directory in the session's
    root = (session if worker_id == "master" else session.parent) / "worker-runs"  # shared by this session only
    with FileLock(f"{root}.lock"):
        if not (root / "done").is_file():
            _launch_worker_runs(assets, root)
            (root / "done").touch()
    return root


def _launch_worker_runs(assets, root: Path) -> None:
    root.mkdir(exist_ok=True)

    def fixed(name: str, algo: str, aggregation: str, accumulation: int = 1) -> dict:
        argv = [*run_args(assets, root / name, algo, pairs=8, steps=1), "--epochs", "1", "--loss_aggregation",
                aggregation, "--minibatch_pairs", "8", "--gradient_accumulation_steps", str(accumulation)]
        return {"name": name, "fixed": True, "argv": argv}

    two = [{"name": f"sampled-{algo}", "fixed": False, "argv": run_args(assets, root / algo, algo, pairs=8)}
           for algo in SAMPLED] + [fixed(f"two-{a}-{g}", a, g) for a, g in FIXED]
    one = [fixed(f"one-{a}-{g}", a, g) for a, g in FIXED]
    held_out = write_jsonl(root / "held_out.jsonl", prompt_rows(9, seed=7))  # 5 + 4: FSDP pads the second share

    def commands(prefix: str) -> list[dict]:  # `p3o train`, `sft` and `rm` as a user launches them
        runs = [{"name": f"{prefix}-cli", "fixed": False,
                 "argv": train_cli(assets, root / f"{prefix}-cli" / "run", held_out, steps=2)}]
        for stage in ("sft", "rm"):
            data = write_jsonl(root / f"{stage}.jsonl", supervised_rows(stage))
            runs.append({"name": f"{prefix}-{stage}", "fixed": False, "argv": [
                *supervised_cli(assets, stage, data), "--output_dir", str(root / f"{prefix}-{stage}" / "run"),
                "--per_device_train_batch_size", "4"]})
        return runs

    def poisoned(prefix: str) -> dict:  # rank 1's loss is NaN at its only step
        return {"name": f"{prefix}-poisoned", "fixed": False, "poison_rank": 1,
                "argv": [*run_args(assets, root / f"{prefix}-poisoned", "p3o-v1", pairs=8, steps=1), "--epochs", "1",
                         "--minibatch_pairs", "8"]}

    two += commands("two")[1:] + [poisoned("two")]  # DDP's `p3o train` has a test of its own
    fsdp = [fixed(f"fsdp-{a}-{g}", a, g) for a, g in FSDP] + commands("fsdp")
    def interrupted(prefix: str, **zero_optimization) -> list[dict]:  # PPO 2 steps; 1, then step 2 from checkpoint-1
        def train(name: str, steps: int, *extra: str) -> dict:
            return {"name": f"{prefix}-{name}", "fixed": False, "zero_optimization": zero_optimization, "argv": [
                "train", *run_args(assets, root / f"{prefix}-{name}", "ppo", pairs=8, steps=steps), "--save_steps", "1",
                *extra]}
        return [train("straight", 2), train("resumed", 1), train("resumed", 2, "--resume")]

    zero = {stage: [fixed(f"zero{stage}-{a}-{g}", a, g) for a, g in ZERO[stage]] + commands(f"zero{stage}") + [
        fixed(f"zero{stage}-accumulated-p3o-v1-token-mean", "p3o-v1", "token-mean", accumulation=2),
        poisoned(f"zero{stage}"), *interrupted(f"zero{stage}")] for stage in (2, 3)}
    zero[3] += interrupted("zero3sub", sub_group_size=1000)  # ZeRO-3 splits each group into sub-groups
    zero[3].append({"name": "zero3-from-fsdp", "fixed": False,  # FSDP2's run, copied below, resumed from checkpoint-2
                    "argv": [*train_cli(assets, root / "zero3-from-fsdp" / "run", held_out, steps=3), "--resume"]})
    for name, processes, runs in (("two", 2, two), ("one", 1, one), ("fsdp", 2, fsdp), ("zero2", 2, zero[2]),
                                  ("zero3", 2, zero[3])):
        if name == "zero3":
            shutil.copytree(root / "fsdp-cli" / "run", root / "zero3-from-fsdp" / "run")
        spec = root / f"{name}.json"
        spec.write_text(json.dumps(runs))
        launch(processes, str(WORKER), str(root), str(spec), fsdp=name == "fsdp",
               zero_stage=int(name[-1]) if name.startswith("zero") else 0)


def launched_argv(root: Path, name: str) -> list[str]:
    """The flags a worker run was launched with (its paths are those of the xdist worker that launched
    it), from the launch its prefix names (fsdp-sft: fsdp.json)."""
    spec = root / f"{name.split('-')[0]}.json"
    return next(run["argv"] for run in json.loads(spec.read_text()) if run["name"] == name)


def records(root: Path, processes: int) -> list[dict]:
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(processes)]


# `make test` runs this file on one pytest-xdist worker (--dist loadfile): the other goes on with the
# rest of the suite meanwhile, instead of waiting on `worker_runs`' lock for the launches (about 75 s).


def test_train_under_torchrun_writes_once_and_resumes_on_one_process(assets, tmp_path):
    from conftest import train_config

    from p3o.rl.train import build_trainer

    held_out, out = write_jsonl(tmp_path / "held_out.jsonl", prompt_rows(20, seed=7)), tmp_path / "run"
    # A second reward that applies to every completion on process 1, to half of them on process 0 (None,
    # TRL's "not applicable", elsewhere): reward/on_one is the mean over all that it applies to, not
    # the mean of the processes' means.
    partial = tmp_path / "partial.py"
    partial.write_text("import json, os\n"
                       "def on_one(completions, **kwargs):\n"
                       "    rank = os.environ.get('RANK', '1')\n"
                       "    values = [None if rank == '0' and i % 2 else float(len(c))\n"
                       "              for i, c in enumerate(completions)]\n"
                       f"    with open({str(tmp_path)!r} + f'/values-{{rank}}.jsonl', 'a') as f:\n"
                       "        f.write(json.dumps(values) + '\\n')\n"
                       "    return values\n")
    two_rewards = ["--reward_fn", f"{partial}:on_one"]
    done = launch(2, "-m", "p3o", *train_cli(assets, out, held_out, steps=2), *two_rewards)
    assert done.stderr.count("saved the trained policy") == 1 and done.stderr.count("p3o-v2: ") == 1  # one voice
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    rollouts = [[json.loads(line) for line in (tmp_path / f"values-{rank}.jsonl").read_text().splitlines()
                 if len(json.loads(line)) == 8] for rank in (0, 1)]  # the rollouts' 4 pairs (held-out: 10 prompts)
    expected = []
    for zero, one in zip(*rollouts):
        known = [v for v in zero + one if v is not None]
        expected.append(sum(known) / len(known))
    assert [m["reward/on_one"] for m in read_jsonl(out / "metrics.jsonl")] == pytest.approx(expected, abs=1e-12)
    assert [(e["step"], e["n"]) for e in read_jsonl(out / "eval.jsonl")] == [(0, 20), (2, 20)]  # all prompts, split
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()

    # The last step's checkpoint of 2 processes, resumed in 1: it goes on at step 3 with the prompts of step 3.
    assert main([*train_cli(assets, out, held_out, steps=3), *two_rewards, "--resume"]) == 0
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 3]
    fresh = build_trainer(train_config(assets, tmp_path, pairs_per_step=8))
    for step in (1, 3):  # step 1 by two processes (--log_completions 8: both processes' prompts), 3 by one
        logged = [r["prompt"] for r in read_jsonl(out / "completions.jsonl") if r["step"] == step]
        assert logged == [fresh.prompts.rows[i]["prompt"] for i in fresh.prompt_indices(step - 1)]


def test_the_shipped_ddp_config_runs_one_run_of_two_processes_on_cpu(assets, tmp_path):
    """`p3o train --num_processes 2` launches with the shipped ddp.yaml (p3o.cli.launch). accelerate
    alone starts each process of a `ddp.yaml` launch on a machine without GPUs as a run of its own
    (all writing one directory); p3o runs them as one, over gloo."""
    out = tmp_path / "run"
    done = launch(2, "train", *run_args(assets, tmp_path, "p3o-v2", pairs=4), p3o_flags=True)
    assert done.stderr.count("(2 in each of 2 processes)") == 1
    # A folder that exists but holds no model: only loading finds it, in every process; said once.
    (tmp_path / "empty").mkdir()
    argv = run_args(assets, tmp_path / "other", "p3o-v2", pairs=4)
    argv[argv.index("--model_name_or_path") + 1] = str(tmp_path / "empty")
    failed = subprocess.run([sys.executable, "-m", "p3o", "train", *argv, "--num_processes", "2"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in failed.stderr.splitlines() if line.startswith("p3o train: error:")]
    assert failed.returncode == 2 and len(errors) == 1 and str(tmp_path / "empty") in errors[0], failed.stderr[-2000:]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]


SIGNAL_DURING_THE_SAVE = """
import os, signal, sys, time
import p3o.core.supervised_run as run
save = run._save_final

def slow_save(cfg, *args, **kwargs):  # the reward model's final save: slow, SIGTERM to the launcher in its midst
    if os.environ["RANK"] == "0" and cfg.output_dir.endswith("rm"):
        time.sleep(3)  # the other process is done with its part by now
        os.kill(os.getppid(), signal.SIGTERM)  # torchrun passes it on to every process
        time.sleep(1)
    return save(cfg, *args, **kwargs)

run._save_final = slow_save
from p3o.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_pipeline_on_two_processes_keeps_a_stage_signalled_in_its_save_and_chains_the_rest(assets, tmp_path):
    """Each stage starts once the main process has saved the one before (RM read the SFT model while
    it was being saved, and failed). A signal during the main process's final save of RM: the other
    process waits for that save with its signal handler on, so the stage is complete and stamped and
    the pipeline stops (it left at once, was killed at the pipeline's barrier and took the main one
    down before the stamp: --resume trained RM again). `--num_processes 2 --resume` keeps both and
    runs RL, its files written once."""
    import yaml

    sft, prefs = (write_jsonl(tmp_path / f"{stage}.jsonl", supervised_rows(stage)) for stage in ("sft", "rm"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "sft": {"model_name_or_path": str(assets["llama"]), "dataset": str(sft), "per_device_train_batch_size": 4,
                "disable_progress_bar": True},
        "rm": {"dataset": str(prefs), "per_device_train_batch_size": 4, "disable_progress_bar": True},
        "train": {"dataset": str(assets["prompts"]), "max_steps": 2, "pairs_per_step": 4, "max_new_tokens": 4,
                  "disable_progress_bar": True}}))
    script = tmp_path / "slow_save.py"
    script.write_text(SIGNAL_DURING_THE_SAVE)
    env = {**os.environ, **ENV, "PYTHONPATH": str(WORKER.parent)}
    stopped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(script), "pipeline", "--config", str(recipe)], env=env, capture_output=True,
                             text=True, timeout=300)
    assert "stopped by SIGTERM as stage rm finished" in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stdout.count("== p3o pipeline: rm -> ") == 1  # the main process speaks
    for stage in ("sft", "rm"):
        assert (tmp_path / "run" / stage / "pipeline_stage.json").is_file()
    assert not (tmp_path / "run" / "train").exists()
    saved = (tmp_path / "run" / "rm" / "model.safetensors").stat().st_mtime_ns

    resumed = launch(2, "pipeline", "--config", str(recipe), "--resume", p3o_flags=True)
    assert resumed.stdout.count("sft finished already") == resumed.stdout.count("rm finished already") == 1
    assert (tmp_path / "run" / "rm" / "model.safetensors").stat().st_mtime_ns == saved
    assert resumed.stdout.count("== p3o pipeline: train -> ") == 1
    assert (tmp_path / "run" / "train" / "pipeline_stage.json").is_file()
    assert resumed.stderr.count("(2 in each of 2 processes)") == 1
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "train" / "metrics.jsonl")] == [1, 2]


def test_two_processes_learn_the_held_out_word_task_as_well_as_one(assets, tmp_path):
    """P3O-V1 on the fruit reward, 10 steps of 16 pairs (8 a process), judged on 64 held-out prompts
    at the start and the end: both rise far beyond noise, and 2 processes end no worse than 1.
    (examples/distributed/word_task.py makes the same comparison on a larger task, over seeds.)"""
    held_out = write_jsonl(tmp_path / "held_out.jsonl", prompt_rows(64, seed=99))

    def args(out: Path) -> list[str]:
        return ["train", "--algo", "p3o-v1", "--model_name_or_path", str(assets["llama"]), "--dataset",
                str(assets["prompts"]), "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out),
                "--max_steps", "10", "--pairs_per_step", "16", "--minibatch_pairs", "8", "--epochs", "4",
                "--max_new_tokens", "8", "--learning_rate", "1e-3", "--seed", "0", "--eval_dataset", str(held_out),
                "--disable_progress_bar"]

    launch(2, "-m", "p3o", *args(tmp_path / "two"))
    assert main(args(tmp_path / "one")) == 0
    (start2, end2), (start1, end1) = (read_jsonl(tmp_path / run / "eval.jsonl") for run in ("two", "one"))
    for start, end in ((start2, end2), (start1, end1)):
        assert end["reward"] - start["reward"] > 3 * math.hypot(start["reward_stderr"], end["reward_stderr"])
    assert end2["reward"] > end1["reward"] - 3 * math.hypot(end1["reward_stderr"], end2["reward_stderr"]), (end1, end2)


def test_a_signal_to_one_process_stops_all_at_the_same_step_with_one_checkpoint(assets, tmp_path):
    """SIGTERM reaches rank 1 only: every process must still save the same step's checkpoint (a
    save is a collective) and exit 130, instead of rank 0 waiting for rank 1 forever."""
    import signal
    import time

    import psutil

    out = tmp_path / "run"
    args = ["-m", "p3o", "train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out), "--max_steps", "1000",
            "--pairs_per_step", "8", "--max_new_tokens", "6", "--disable_progress_bar"]
    env = {**os.environ, **ENV, "P3O_TEST_FSDP": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size) and time.time() < deadline:
        time.sleep(0.05)
    rank1 = [p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)  # without the agreement, rank 0 waits for rank 1 forever
    # Both stop as asked (exit 130); torchrun may end the slower one with SIGTERM once the other has exited.
    assert err.count("exitcode  : 130") + err.count("exitcode  : -15") == 2 and "exitcode  : 130" in err, err[-2000:]
    assert "checkpoint saved to" in err
    steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl")]
    state = json.loads((out / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())
    assert state["step"] == steps[-1] == len(steps) and len(list(out.glob("checkpoint-*"))) == 1


@pytest.mark.parametrize("algo", SAMPLED)
def test_two_processes_draw_different_prompts_and_keep_identical_weights(assets, worker_runs, algo):
    run = worker_runs / f"sampled-{algo}"
    assert [r["processes"] for r in records(run, 2)] == [2, 2]
    first, second = (set(i for step in r["prompts"] for i in step) for r in records(run, 2))
    assert not first & second  # each process its own prompts
    weights = [load_file(str(run / f"rank{r}.safetensors")) for r in range(2)]
    initial = load_file(str(assets["llama"] / "model.safetensors"))
    policy = {k.removeprefix("policy."): v for k, v in weights[0].items()}  # PPO: the trunk beside its value head
    assert initial.keys() <= policy.keys() and any(not torch.equal(policy[k], initial[k]) for k in initial)  # trained
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), f"{name} differs between the processes"


@pytest.mark.parametrize("algo,aggregation", FIXED)
def test_one_update_on_two_processes_equals_one_process_with_the_same_global_batch(worker_runs, algo, aggregation):
    """The same rollouts (sampling replaced by a fixed function of the prompt): 2 processes of 4
    prompts and 1 process of 8 take the same first gradient. PPO's whitening of the advantages and
    every loss's normaliser (pairs or tokens) are the global batch's, not each process's."""
    one, two = worker_runs / f"one-{algo}-{aggregation}", worker_runs / f"two-{algo}-{aggregation}"
    single_run, split_run = records(one, 1), records(two, 2)
    assert sorted(split_run[0]["prompts"][0] + split_run[1]["prompts"][0]) == sorted(single_run[0]["prompts"][0])
    assert split_run[0]["local_tokens"] != split_run[1]["local_tokens"]  # token counts differ between the processes
    single = load_file(str(one / "grad0.safetensors"))
    assert any(g.abs().max() > 1e-6 for g in single.values())
    for rank in range(2):
        split = load_file(str(two / f"grad{rank}.safetensors"))
        assert split.keys() == single.keys()
        for name in single:
            assert torch.allclose(split[name], single[name], atol=1e-7, rtol=1e-4), f"rank {rank}: {name}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_cli(assets, out: Path, held_out: Path, steps: int) -> list[str]:
    return ["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out), "--max_steps", str(steps),
            "--pairs_per_step", "8", "--max_new_tokens", "6", "--learning_rate", "1e-2", "--seed", "0",
            "--eval_dataset", str(held_out), "--save_steps", "1", "--log_completions", "8", "--disable_progress_bar"]


def supervised_rows(stage: str, n: int = 39) -> list[dict]:
    rows = []
    for i, row in enumerate(prompt_rows(n, seed=5)):
        noun, fruit = NOUNS[i % len(NOUNS)], TARGETS[i % len(TARGETS)]
        if stage == "sft":
            rows.append({"prompt": row["prompt"], "completion": f" the {noun} eats a {fruit} ."})
        else:
            rows.append({"prompt": row["prompt"], "chosen": f" a {fruit} .", "rejected": f" the {noun} ."})
    return rows


def supervised_cli(assets, stage: str, data: Path) -> list[str]:
    return [stage, "--model_name_or_path", str(assets["llama"]), "--dataset", str(data), "--eval_fraction", "0.25",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "2", "--disable_progress_bar"]


def assert_same_steps(split: list[dict], single: list[dict]) -> None:
    assert [m["step"] for m in split] == [m["step"] for m in single] == [1, 2, 3, 4, 4]  # 4 steps, then the evaluation
    for a, b in zip(split, single):
        assert a.keys() == b.keys()
        for name in a.keys() - {"elapsed", "lr"}:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name


def assert_close_weights(a: Path, b: Path) -> None:
    # Adam turns float-rounding-sized gradient differences into visible update differences on
    # near-zero gradients, so the weights match to a tenth of one step (lr 1e-3); the losses and
    # gradient norms carry the exact check.
    first, second = (load_file(str(d / "model.safetensors")) for d in (a, b))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-4), name


@pytest.mark.parametrize("algo,aggregation", FSDP)
def test_fsdp_shards_the_weights_and_takes_the_single_process_gradient(worker_runs, algo, aggregation):
    """FSDP2 on 2 CPU processes: each holds about half of every matrix, and the first (gathered)
    gradient equals 1 process's on the same 8 prompts' fixed rollouts."""
    run, one = worker_runs / f"fsdp-{algo}-{aggregation}", worker_runs / f"one-{algo}-{aggregation}"
    held = [json.loads((run / f"held{r}.json").read_text()) for r in range(2)]
    single = load_file(str(one / "grad0.safetensors"))
    whole = load_file(str(one / "rank0.safetensors"))
    assert held[0].keys() == held[1].keys() and held[0].keys() <= whole.keys()  # parameters (tied ones once)
    for name in held[0]:
        assert held[0][name] + held[1][name] == whole[name].numel(), name
        # FSDP2 splits the first dimension (a (1, H) value head stays on one process)
        assert held[0][name] < whole[name].numel() or whole[name].shape[0] < 2, f"{name} is not sharded"
    for rank in range(2):
        sharded = load_file(str(run / f"grad{rank}.safetensors"))
        assert sharded.keys() == single.keys()
        for name in single:
            assert torch.allclose(sharded[name], single[name], atol=1e-7, rtol=1e-4), f"rank {rank}: {name}"


SHARDED = ["fsdp", "zero2", "zero3"]  # FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 launches


@pytest.mark.parametrize("launch_kind", SHARDED)
def test_a_sharded_checkpoint_resumes_on_one_process(assets, worker_runs, launch_kind):
    """`p3o train` under FSDP2 or ZeRO: the held-out evaluation splits 9 prompts (sharded: padded to
    5 + 5), the saved policy is whole, the checkpoint's optimiser state is whole (by parameter name)
    and resumes on one process."""
    out = worker_runs / f"{launch_kind}-cli" / "run"
    assert [(e["step"], e["n"]) for e in read_jsonl(out / "eval.jsonl")] == [(0, 9), (2, 9)]
    saved, initial = (load_file(str(d / "model.safetensors")) for d in (out, assets["llama"]))
    assert saved.keys() == initial.keys() and all(saved[k].shape == initial[k].shape for k in saved)
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
    optimizer = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert set(optimizer["state"]) == set(initial)  # every parameter's moments, whole, by name
    assert all(optimizer["state"][k]["exp_avg"].shape == initial[k].shape for k in initial)
    launched = launched_argv(worker_runs, f"{launch_kind}-cli")
    assert main([*launched[:launched.index("--max_steps") + 1], "3", *launched[launched.index("--max_steps") + 2:],
                 "--resume"]) == 0
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("stage,algo,aggregation", [(stage, *case) for stage, cases in ZERO.items() for case in cases]
                         + [(stage, "accumulated-p3o-v1", "token-mean") for stage in ZERO])
def test_deepspeed_zero_takes_the_single_process_gradient_and_update(worker_runs, stage, algo, aggregation):
    """DeepSpeed ZeRO-2/3 on 2 CPU processes: the first (gathered, clipped) gradient equals 1 process's
    on the same 8 prompts' fixed rollouts, and so does the first update; "accumulated": each process
    in two micro-batches of 2 pairs (the engine told which one ends the step)."""
    run = worker_runs / f"zero{stage}-{algo}-{aggregation}"
    one = worker_runs / f"one-{algo.removeprefix('accumulated-')}-{aggregation}"
    assert [(r["processes"], r["zero_stage"]) for r in records(run, 2)] == [(2, stage)] * 2
    held = [json.loads((run / f"held{rank}.json").read_text()) for rank in range(2)]
    whole = {name: t.numel() for name, t in load_file(str(run / "rank0.safetensors")).items()}
    for name in held[0]:  # ZeRO-3 partitions every weight (padded to equal shares); ZeRO-2 keeps them whole
        assert [h[name] for h in held] == [math.ceil(whole[name] / 2) if stage == 3 else whole[name]] * 2, name
    single = load_file(str(one / "grad0.safetensors"))
    for rank in range(2):
        split = load_file(str(run / f"grad{rank}.safetensors"))
        assert split.keys() == single.keys()
        for name in single:
            assert torch.allclose(split[name], single[name], atol=1e-7, rtol=1e-4), f"rank {rank}: {name}"
    updated, reference = (load_file(str(d / "rank0.safetensors")) for d in (run, one))
    for name in reference:
        assert torch.allclose(updated[name], reference[name], atol=1e-4), name  # a tenth of one step (lr 1e-2)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_sampled_ppo_as_ddp(worker_runs, stage):
    """`p3o train --algo ppo` under ZeRO (the "straight" run: 2 sampled steps) samples and ends as the
    same run under DDP does."""
    from p3o.models.value_head import split_state_dict

    zero, ddp = worker_runs / f"zero{stage}-straight" / "run", worker_runs / "sampled-ppo"
    assert [m["reward"] for m in read_jsonl(zero / "metrics.jsonl")] == pytest.approx(records(ddp, 2)[0]["reward"])
    references = split_state_dict(load_file(str(ddp / "rank0.safetensors")))
    for file, reference in zip(("model.safetensors", "value_head.safetensors"), references):
        weights = load_file(str(zero / file))
        assert weights.keys() <= reference.keys() and len(weights) >= len(reference) - 1  # lm_head tied: saved once
        assert all(torch.allclose(weights[k], reference[k], atol=1e-4) for k in weights), file


@pytest.mark.parametrize("stage", ["2", "3", "3sub"])  # 3sub: ZeRO-3 with sub-groups of 1000 elements
def test_a_zero_checkpoint_resumes_under_zero_where_the_uninterrupted_run_ends(worker_runs, stage):
    """PPO under ZeRO for 2 steps, and for 1 step then step 2 from its checkpoint-1 under ZeRO (the whole optimiser
    state scattered back to the partitions, the value head into the module and its fp32 master copy):
    the uninterrupted run's weights."""
    straight, resumed = (worker_runs / f"zero{stage}-{name}" / "run" for name in ("straight", "resumed"))
    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [1, 2]
    for file in ("model.safetensors", "value_head.safetensors"):
        a, b = (load_file(str(d / file)) for d in (straight, resumed))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-6), f"{file}: {name}"


def test_an_fsdp_checkpoint_resumes_under_zero3(worker_runs):
    """Both sharded, differently: FSDP2's whole optimiser state by name scattered into ZeRO-3's partitions."""
    out = worker_runs / "zero3-from-fsdp" / "run"
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 3]  # from FSDP's checkpoint-2
    optimizer = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)  # written under ZeRO-3
    assert optimizer["state"] and all(isinstance(name, str) for name in optimizer["state"])


@pytest.mark.parametrize("launch_kind", ["two", "zero2", "zero3"])
def test_a_non_finite_loss_on_one_process_skips_the_step_on_all(assets, worker_runs, launch_kind):
    run = worker_runs / f"{launch_kind}-poisoned"
    assert [(r["skipped_updates"], r["optimizer_steps"]) for r in records(run, 2)] == [(1, 0)] * 2
    weights, initial = (load_file(str(path)) for path in (run / "rank0.safetensors", assets["llama"] / "model.safetensors"))
    assert all(torch.equal(weights[name], initial[name]) for name in initial)  # untouched, Adam's moments too


def test_the_deepspeed_config_gets_p3os_sizes_and_what_p3o_cannot_honour_is_refused():
    from types import SimpleNamespace

    from p3o.errors import UsageError
    from p3o.utils.zero import configure

    def accelerator(**config):
        return SimpleNamespace(num_processes=4, gradient_accumulation_steps=8,
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))

    fine = accelerator(zero_optimization={"stage": 3}, gradient_accumulation_steps="auto")
    configure(fine, micro_batch=6, max_grad_norm=0.5)
    config = fine.state.deepspeed_plugin.deepspeed_config
    assert (config["gradient_accumulation_steps"], config["train_micro_batch_size_per_gpu"], config["train_batch_size"],
            config["gradient_clipping"], fine.gradient_accumulation_steps) == (1, 6, 24, 0.5, 1)
    assert config["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    for section in ("optimizer", "scheduler"):
        with pytest.raises(UsageError, match=f"has a '{section}' section, but p3o builds its own"):
            configure(accelerator(**{section: {"type": "AdamW"}}), 6, 1.0)
    with pytest.raises(UsageError, match="offload_optimizer is not supported"):
        configure(accelerator(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}), 6, 1.0)
    configure(accelerator(zero_optimization={"stage": 2, "offload_param": {"device": "none"}}), 6, 1.0)


def test_deepspeed_below_zero2_and_fsdp1_are_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from p3o.errors import UsageError
    from p3o.utils.distributed import check_supported

    def accelerator(kind, version=2, stage=2):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(
            fsdp_plugin=SimpleNamespace(fsdp_version=version), deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    with pytest.raises(UsageError, match="ZeRO stage 2 or 3 only"):
        check_supported(accelerator(DistributedType.DEEPSPEED, stage=1))
    check_supported(accelerator(DistributedType.DEEPSPEED, stage=3))
    with pytest.raises(UsageError, match="FSDP version 1 is not supported"):
        check_supported(accelerator(DistributedType.FSDP, version=1))
    for fine in (accelerator(DistributedType.FSDP), accelerator(DistributedType.MULTI_GPU), accelerator(DistributedType.NO)):
        check_supported(fine)


@pytest.mark.parametrize("launch_kind", ["two", *SHARDED])
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_supervised_stage_on_two_processes_takes_the_single_process_steps(assets, worker_runs, tmp_path, stage,
                                                                         launch_kind):
    """`p3o sft`/`rm` under DDP, FSDP2 or ZeRO on 2 processes x 4 examples: the steps, evaluation and
    saved model of 1 process x 8 (29 training examples: the last batch splits 3 + 2). Its mid-run
    checkpoint (whole weights and optimiser state) resumes on 1 process, only with the same global batch."""
    split, one = worker_runs / f"{launch_kind}-{stage}" / "run", tmp_path / "one"
    common = launched_argv(worker_runs, f"{launch_kind}-{stage}")[:-4]  # as launched (the first xdist worker's paths)
    assert main([*common, "--output_dir", str(one), "--per_device_train_batch_size", "8"]) == 0
    assert_same_steps(read_jsonl(split / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl"))
    assert_close_weights(split, one)
    optimizer = torch.load(split / "checkpoint-2" / "optimizer.pt", weights_only=True)
    if launch_kind != "two":
        assert optimizer["state"] and all(isinstance(name, str) for name in optimizer["state"])  # whole, by name
    shutil.rmtree(split / "checkpoint-4")  # the last step's: as if stopped in it, so the run resumes mid-way
    assert main([*common, "--output_dir", str(split), "--per_device_train_batch_size", "4", "--resume"]) == 2
    assert main([*common, "--output_dir", str(split), "--per_device_train_batch_size", "8", "--resume"]) == 0
    assert_close_weights(split, one)
