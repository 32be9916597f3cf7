"""`p3o train|sft|rm|pipeline --num_processes N [--accelerate_config NAME|FILE]`: the same command on N
processes of this machine, through `accelerate launch`, as TRL's `--accelerate_config` does.

Why here: a `pip install p3o` user has no repository to take a config file from, and a bad flag
should be one line before N processes start (each would print it). So the command line is parsed
and its config built here first; then accelerate's own launcher runs `python -m p3o <the same
arguments>` N times (without these two flags) and waits. The launcher's exit code is the first
failed process's; torch's report of the failure is shown only with --debug. Each process hands its
last line (an error, how to resume) to this one (`hand_over`), which prints every distinct line
once when the launch ends: N processes meeting the same bad input say it once. A process killed by
a signal could say nothing, so that is said here.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from p3o.errors import UsageError

FLAGS = ("--num_processes", "--accelerate_config")
LINES = "P3O_LAUNCH_LINES"  # environment: the folder where the launched processes leave their last lines


def add_launch_arguments(parser) -> None:
    parser.add_argument("--num_processes", type=int, default=None,
                        help="Run on this many processes of this machine (one per GPU; gloo on a CPU) "
                             "through `accelerate launch`. Default: one process, no launcher.")
    parser.add_argument("--accelerate_config", default=None,
                        help="With --num_processes: ddp (default), fsdp (FSDP2), zero2 or zero3 (DeepSpeed), "
                             "the configs p3o ships, or an accelerate config file of your own.")


def launch_requested(args) -> bool:
    return getattr(args, "num_processes", None) is not None or getattr(args, "accelerate_config", None) is not None


def config_file(name: str | None) -> Path:
    """A shipped config's path by name, or the user's own file."""
    from p3o import accelerate_configs

    name = name or "ddp"
    if name in accelerate_configs.NAMES:
        return accelerate_configs.path(name)
    if Path(name).is_file():
        return Path(name)
    raise UsageError(f"--accelerate_config {name} is neither one of p3o's configs "
                     f"({', '.join(accelerate_configs.NAMES)}) nor a file")


def launch_argv(args, argv: list[str]) -> list[str]:
    """`accelerate launch` arguments that run `p3o <argv>` (less this module's flags) on
    args.num_processes processes with args.accelerate_config."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:  # set by torchrun and accelerate launch
        raise UsageError("this process was started by a launcher already (torchrun or accelerate launch); "
                         "leave out --num_processes and --accelerate_config")
    if args.num_processes is None:
        raise UsageError("--accelerate_config needs --num_processes N (the processes to start on this machine)")
    if args.num_processes < 1:
        raise UsageError(f"--num_processes must be at least 1, got {args.num_processes}")
    path = config_file(args.accelerate_config)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise UsageError(f"--accelerate_config {path} is not a .yaml or .json accelerate config")
    config = read_config(path)
    check_runnable(config, path)
    launcher = ["--config_file", str(path), "--num_processes", str(args.num_processes)]
    if "main_process_port" not in config:
        launcher += ["--main_process_port", "0"]  # a free port: two runs on one machine do not collide
    return [*launcher, "-m", "p3o", *without_launch_flags(argv)]


def read_config(path: Path) -> dict:
    from p3o.options import read_yaml_config

    try:
        return read_yaml_config(str(path))  # JSON is YAML too
    except UsageError as exc:
        raise UsageError(f"--accelerate_config: {exc}") from None


def check_runnable(config: dict, path: Path) -> None:
    """What would fail in every process, said once here: FSDP without GPUs (accelerate applies it only
    to GPUs; on a CPU the run would be plain DDP or N separate runs) and DeepSpeed not installed."""
    import torch

    kind = str(config.get("distributed_type", "")).upper()
    if kind == "FSDP" and not torch.cuda.is_available():
        raise UsageError(f"--accelerate_config {path} asks for FSDP, which accelerate runs on GPUs only; on this "
                         "machine use --accelerate_config ddp (or zero2/zero3)")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(f"--accelerate_config {path} asks for DeepSpeed, which is not installed: "
                         "pip install 'p3o[deepspeed]'")


def without_launch_flags(argv: list[str]) -> list[str]:
    """argv less --num_processes/--accelerate_config and their values (`--flag v` or `--flag=v`)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in FLAGS:
            skip = True
        elif not token.startswith(tuple(f"{flag}=" for flag in FLAGS)):
            kept.append(token)
    return kept


def launch(args, argv: list[str]) -> int:
    """Run `p3o <argv>` through accelerate's launcher; its exit code (the first failed process's)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launcher = launch_command_parser().parse_args(launch_argv(args, argv))
    if not args.debug:
        _quiet_torch_elastic()
    lines = Path(tempfile.mkdtemp(prefix="p3o-launch-"))
    os.environ[LINES] = str(lines)  # the processes inherit it
    try:
        return _launch_and_wait(launch_command, launcher, args)
    finally:
        del os.environ[LINES]
        said = [line for path in sorted(lines.glob("*.txt"), key=lambda p: int(p.stem))
                for line in path.read_text().splitlines()]
        for line in dict.fromkeys(said):  # each distinct line once, in rank order
            sys.stderr.write(line + "\n")
        shutil.rmtree(lines, ignore_errors=True)


def hand_over(line: str) -> bool:
    """In a process `launch` started: leave `line` for it to print (True); elsewhere False."""
    folder, rank = os.environ.get(LINES), os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return False
    with open(Path(folder) / f"{int(rank)}.txt", "a") as f:
        f.write(line + "\n")
    return True


def _launch_and_wait(launch_command, launcher, args) -> int:
    import subprocess

    try:
        launch_command(launcher)
    except subprocess.CalledProcessError as exc:  # accelerate's one-process launcher
        return exit_code(exc.returncode)
    except Exception as exc:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        if args.debug or not isinstance(exc, (ChildFailedError, SignalException)):
            raise
        if isinstance(exc, SignalException):  # the launcher was stopped: it passed the signal on (see docs)
            return 128 + int(exc.sigval)
        rank, failure = _cause(exc.failures)
        if failure.exitcode < 0:  # killed (the OOM killer, say): it printed nothing
            try:
                name = signal.Signals(-failure.exitcode).name
            except ValueError:
                name = f"signal {-failure.exitcode}"
            sys.stderr.write(f"p3o {args.command}: error: process {rank} was killed by {name} (out of memory?); "
                             "the others were stopped. --debug shows torch's report\n")
        return exit_code(failure.exitcode)
    return 0


def _quiet_torch_elastic() -> None:
    """Each process prints its own one-line error or how to resume; torch's launcher would add its
    report of the failure (a traceback per process). Its loggers set their own level, so each is
    set here, once torch.distributed.run has created them."""
    import torch.distributed.run  # noqa: F401 (imports the launcher's modules, creating their loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _cause(failures: dict) -> tuple:
    """The failure behind the others, as (rank, ProcessFailure): a process that exited with an error,
    else one killed by a signal other than the SIGTERM torch sends the rest, else the first."""
    def order(item):
        code = item[1].exitcode
        return (0 if code > 0 else 1 if code != -signal.SIGTERM else 2, item[1].timestamp, item[0])

    return min(failures.items(), key=order)


def exit_code(code: int) -> int:
    """A process killed by signal s exits with -s; a shell reports 128 + s."""
    return 128 - code if code < 0 else code or 1
