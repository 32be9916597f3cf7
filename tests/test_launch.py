"""`--num_processes N [--accelerate_config NAME|FILE]` on `p3o train|sft|rm` (p3o.cli.launch), and the
configs shipped in the wheel. The real two-process launch through these flags is in
tests/test_distributed.py (test_the_shipped_ddp_config_runs_one_run_of_two_processes_on_cpu)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import prompt_rows, write_jsonl

from p3o import accelerate_configs
from p3o.cli import main
from p3o.cli.launch import launch_argv, without_launch_flags
from p3o.errors import UsageError

ROOT = Path(__file__).parents[1]


def train_args(assets, tmp_path, *extra) -> list[str]:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    return ["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(prompts),
            "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(tmp_path / "run"), *extra]


@pytest.fixture(autouse=True)
def not_launched(monkeypatch):
    """As `p3o` is run by hand: no launcher's variables (a test that wants one sets it)."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def test_the_launch_flags_are_taken_out_and_the_rest_passed_on_unchanged():
    argv = ["train", "--num_processes", "2", "--model_name_or_path", "m", "--accelerate_config=zero2", "--seed", "3"]
    assert without_launch_flags(argv) == ["train", "--model_name_or_path", "m", "--seed", "3"]


@pytest.mark.parametrize("name", accelerate_configs.NAMES)
def test_a_config_name_is_the_shipped_file_and_a_free_port_is_asked_for(name, monkeypatch):
    import torch

    from p3o.cli import build_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # FSDP: accelerate applies it on GPUs only
    argv = ["train", "--num_processes", "4", "--accelerate_config", name, "--seed", "1"]
    launcher = launch_argv(build_parser().parse_args(argv), argv)
    config = Path(launcher[launcher.index("--config_file") + 1])
    assert config == accelerate_configs.path(name) and config.is_file()
    if name.startswith("zero"):
        assert f"zero_stage: {name[-1]}" in config.read_text()
    assert launcher[launcher.index("--num_processes") + 1] == "4"
    assert launcher[launcher.index("--main_process_port") + 1] == "0"  # accelerate picks a free one
    assert launcher[launcher.index("-m"):] == ["-m", "p3o", "train", "--seed", "1"]


def test_without_a_name_ddp_and_a_file_of_ones_own_is_taken_as_it_is(tmp_path, monkeypatch):
    from p3o.cli import build_parser

    argv = ["sft", "--num_processes", "2"]
    launcher = launch_argv(build_parser().parse_args(argv), argv)
    assert Path(launcher[launcher.index("--config_file") + 1]) == accelerate_configs.path("ddp")
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\nmain_process_port: 29600\n")
    argv = ["rm", "--num_processes", "2", "--accelerate_config", str(own)]
    launcher = launch_argv(build_parser().parse_args(argv), argv)
    assert launcher[:2] == ["--config_file", str(own)] and "--main_process_port" not in launcher  # the file's port
    own.write_text("- not a mapping\n")
    with pytest.raises(UsageError, match="--accelerate_config: config file .* must be a mapping"):
        launch_argv(build_parser().parse_args(argv), argv)


@pytest.mark.parametrize("flags,message", [
    (["--num_processes", "2", "--pairs_per_step", "3"], "make it a multiple of 2"),
    (["--num_processes", "2", "--accelerate_config", "zero9"], "neither one of p3o's configs (ddp, fsdp, zero2, zero3)"),
    (["--accelerate_config", "zero2"], "--accelerate_config needs --num_processes N"),
    (["--num_processes", "0"], "--num_processes must be at least 1"),
    (["--num_processes", "2", "--learning_rate", "-1"], "learning_rate"),
    (["--num_processes", "2", "--dataset", "nope.jsonl"], "--dataset nope.jsonl does not exist"),  # each process
    (["--num_processes", "2", "--reward_fn", "nope.py:f"], "nope.py does not exist"),  # would say it: once here
    (["--num_processes", "2", "--accelerate_config", "fsdp"], "FSDP, which accelerate runs on GPUs only"),
])
def test_a_bad_launch_is_one_line_before_any_process_starts(assets, tmp_path, capsys, monkeypatch, flags, message):
    import accelerate.commands.launch

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", lambda *a: pytest.fail("launched"))
    assert main(train_args(assets, tmp_path, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("p3o train: error:") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_non_empty_output_dir_a_missing_deepspeed_and_launch_flags_in_yaml_are_one_line(
        assets, tmp_path, capsys, monkeypatch):
    import importlib.util

    import accelerate.commands.launch

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", lambda *a: pytest.fail("launched"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("keep")
    assert main(train_args(assets, tmp_path, "--num_processes", "2")) == 2
    assert "--output_dir" in capsys.readouterr().err and (tmp_path / "run" / "mine.txt").read_text() == "keep"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    assert main(train_args(assets, tmp_path, "--num_processes", "2", "--accelerate_config", "zero3", "--overwrite")) == 2
    assert "pip install 'p3o[deepspeed]'" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text("num_processes: 2\n")
    assert main(train_args(assets, tmp_path, "--config", str(config))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_processes is a command-line flag only" in err[0] and "pass --num_processes" in err[0]


def test_under_a_launcher_already_the_flags_are_refused(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(train_args(assets, tmp_path, "--num_processes", "2")) == 2
    assert "started by a launcher already" in capsys.readouterr().err


# exit codes of the processes (rank: code; negative: killed by that signal) -> the command's code, its line
FAILURES = [
    ({1: 2}, 2, ""),  # a process's own error: it printed its line
    ({0: -15, 1: 2}, 2, ""),  # the one that failed, not the one torch then stopped with SIGTERM
    ({0: -15, 1: -9}, 137, "process 1 was killed by SIGKILL"),  # it could print nothing
    ({1: -15}, 143, "process 1 was killed by SIGTERM"),
]


@pytest.mark.parametrize("codes,code,line", FAILURES)
def test_a_failed_process_s_exit_code_is_the_command_s_without_torch_s_report(assets, tmp_path, capsys, monkeypatch,
                                                                               codes, code, line):
    """A process that failed printed its own error line; the launcher adds no traceback (torch's report
    of the failed processes only with --debug), but says which process a signal killed."""
    import accelerate.commands.launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    launched = []

    def failing(args):
        launched.append(args)
        raise ChildFailedError("p3o", {rank: ProcessFailure(local_rank=rank, pid=rank + 1, exitcode=exitcode,
                                                            error_file="<N/A>") for rank, exitcode in codes.items()})

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", failing)
    assert main(train_args(assets, tmp_path, "--num_processes", "2")) == code
    assert launched and launched[0].num_processes == 2 and launched[0].module
    err = capsys.readouterr().err.splitlines()
    said = f"p3o train: error: {line} (out of memory?); the others were stopped. --debug shows torch's report"
    assert err == ([said] if line else []), err
    with pytest.raises(ChildFailedError):
        main(train_args(assets, tmp_path, "--num_processes", "2", "--debug"))


def test_the_processes_last_lines_are_printed_once_each(assets, tmp_path, capsys, monkeypatch):
    """Two processes meeting the same bad input (found only once loading: the parent cannot) hand
    the same line over: it is printed once; a line only one process has is printed too."""
    import os

    import accelerate.commands.launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from p3o.cli.launch import hand_over

    def processes(args):
        for rank, lines in ((0, ["p3o train: error: not a model"]), (1, ["p3o train: error: not a model",
                                                                           "p3o train: error: only here"])):
            monkeypatch.setenv("RANK", str(rank))
            for line in lines:
                assert hand_over(line)
        monkeypatch.delenv("RANK")
        raise ChildFailedError("p3o", {r: ProcessFailure(local_rank=r, pid=r + 1, exitcode=2, error_file="<N/A>")
                                       for r in (0, 1)})

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", processes)
    assert main(train_args(assets, tmp_path, "--num_processes", "2")) == 2
    assert capsys.readouterr().err.splitlines() == ["p3o train: error: not a model", "p3o train: error: only here"]
    assert "P3O_LAUNCH_LINES" not in os.environ and not hand_over("elsewhere")  # no launch: stderr as before


@pytest.mark.parametrize("kind,code", [("signal", 143), ("one-process", 3)])
def test_the_launcher_stopped_or_one_process_failing_gives_its_code(assets, tmp_path, capsys, monkeypatch, kind, code):
    """SIGTERM to `p3o` itself (torch's launcher passes it on: each process saves a checkpoint and
    says so) -> 143; accelerate's one-process launcher's failure -> that process's code."""
    import signal

    import accelerate.commands.launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def failing(args):
        if kind == "signal":
            raise SignalException("stopped", sigval=signal.SIGTERM)
        raise subprocess.CalledProcessError(code, ["p3o"])

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", failing)
    assert main(train_args(assets, tmp_path, "--num_processes", "2")) == code
    assert capsys.readouterr().err == ""


def test_the_wheel_ships_the_named_configs_and_runs_outside_the_checkout(tmp_path):
    """A `pip install p3o` user has no repository: the configs --accelerate_config names come in the
    wheel, and the installed package imports and answers --help from elsewhere."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ into the tree it builds
    shutil.copytree(ROOT / "src" / "p3o", source / "src" / "p3o", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            str(source), "--wheel-dir", str(tmp_path / "wheel")], capture_output=True, text=True,
                           cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("p3o-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"p3o/accelerate_configs/{n}.yaml" for n in accelerate_configs.NAMES} <= names
    shipped = {n for n in names if n.startswith("p3o/") and n.endswith(".py")}
    assert shipped == {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "p3o").rglob("*.py")}
    target = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(target)
    check = ("import p3o, p3o.accelerate_configs as c, p3o.cli;"
             f"assert p3o.__file__.startswith({str(target)!r}), p3o.__file__;"
             "assert all(c.path(n).is_file() for n in c.NAMES);"
             "p3o.cli.main(['train', '--help'])")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--accelerate_config ACCELERATE_CONFIG" in done.stdout


def test_a_pipeline_s_recipe_is_checked_for_the_processes_before_any_starts(assets, tmp_path, capsys, monkeypatch):
    import accelerate.commands.launch
    import yaml

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", lambda *a: pytest.fail("launched"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "train": {
        "model_name_or_path": str(assets["llama"]), "dataset": str(prompts), "reward_fn": f"{assets['rewards']}:fruit",
        "pairs_per_step": 3, "minibatch_pairs": 1}}))
    assert main(["pipeline", "--config", str(recipe), "--check"]) == 0  # one process: 3 prompts a step will do
    capsys.readouterr()
    assert main(["pipeline", "--config", str(recipe), "--num_processes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make it a multiple of 2" in err[0] and err[0].startswith("p3o pipeline: error:"), err
    assert not (tmp_path / "run").exists()

    # A stage in bf16 and one in float32: one process runs them in turn; a launch keeps accelerate's
    # first precision for every stage, so it is refused before anything runs.
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": " b"}] * 4)
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "sft": {
        "model_name_or_path": str(assets["llama"]), "dataset": str(sft), "mixed_precision": "bf16"}, "train": {
        "dataset": str(prompts), "reward_fn": f"{assets['rewards']}:fruit", "pairs_per_step": 4}}))
    assert main(["pipeline", "--config", str(recipe), "--check"]) == 0
    capsys.readouterr()
    assert main(["pipeline", "--config", str(recipe), "--num_processes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every stage must use the same mixed_precision (sft bf16, train no)" in err[0], err
    # --check with --num_processes: checked for 2 processes here, printed once, nothing launched
    recipe.write_text(recipe.read_text().replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    assert main(["pipeline", "--config", str(recipe), "--check", "--num_processes", "2"]) == 0
    assert capsys.readouterr().out.count("train: ") == 1 and not (tmp_path / "run").exists()
