"""The `p3o` command: one subcommand per pipeline stage.

Errors in the user's input end the run with one line (what is wrong, how to fix it) and exit code 2;
`--debug` shows the traceback as well.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.cli.launch import add_launch_arguments, hand_over, launch, launch_requested
from p3o.errors import AlreadyFinished, UsageError
from p3o.options import did_you_mean

COMMANDS = {  # name: (module with add_arguments/run, or (config class, run function) of a config command, help)
    "demo": ("p3o.cli.demo", "Run SFT -> reward model -> P3O-V2 on an embedded task, offline, with a report."),
    "sft": (("p3o.sft.train:SFTConfig", "p3o.sft.train:run_sft"),
            "Supervised fine-tuning on prompt-completion data (loss on completion tokens only)."),
    "rm": (("p3o.reward.train:RewardConfig", "p3o.reward.train:run_rm"),
           "Train a reward model on preference data with the Bradley-Terry loss."),
    "train": (("p3o.rl.config:P3OConfig", "p3o.rl.train:run_train"),
              "RL fine-tuning of a causal LM against a reward: P3O-V1/V2, PPO, RLOO, GRPO, ReMax, DPO, online DPO."),
    "eval": ("p3o.cli.evaluate", "Evaluate policies on held-out prompts: KL to a reference, proxy and gold reward, length."),
    "winrate": (("p3o.eval.winrate:WinrateConfig", "p3o.eval.winrate:run_winrate"),
                "Win rate of policy A against policy B on the same prompts, by a judge, with a 95% interval."),
    "frontier": (("p3o.eval.frontier:FrontierConfig", "p3o.eval.frontier:run_frontier"),
                 "Sweep algorithms x beta x seeds and draw each algorithm's KL-reward frontier."),
    "pipeline": ("p3o.cli.pipeline", "Run SFT -> reward model -> RL from one recipe file on your own data."),
    "convert": ("p3o.cli.convert", "Convert TL;DR comparisons or Anthropic HH rows to the standard preference format."),
    "tiny-model": ("p3o.cli.tiny_model", "Build a small random GPT-2/Llama model and a word tokenizer from a corpus."),
    "fetch-model": ("p3o.cli.fetch_model", "Save a real pretrained model (SmolLM2-135M-Instruct) or a .gguf file as a plain checkpoint, offline."),
}
LAUNCHED = ("train", "sft", "rm", "pipeline")  # commands that take --num_processes / --accelerate_config (p3o.cli.launch)


class _OneLineParser(argparse.ArgumentParser):
    """Flag errors in one line, like every other error, with the exit code 2 argparse uses."""

    def error(self, message: str):
        typed = re.search(r"argument COMMAND: invalid choice: '([^']*)'", message)
        if typed:  # `p3o tran`: argparse lists every command; name the one meant
            message = f"unknown command {typed[1]!r}{did_you_mean(typed[1], COMMANDS)}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag the command does not know is reported by the command's parser:
        `p3o train: error: ... (see p3o train --help)`."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = getattr(self, "commands", {})  # set by build_parser: name -> the command's parser
            command = commands.get(getattr(namespace, "command", None), self)
            flag = next((e for e in extras if e.startswith("--")), "").removeprefix("--").partition("=")[0]
            hint = did_you_mean(flag, [a.dest for a in command._actions]) if flag else ""  # TRL's names too
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `p3o` parser. `only`: the command about to run, the one whose options are read (each
    command's imports its config, torch and transformers: seconds); the others are listed for
    `p3o --help` and an unknown command's message. None: every command's options."""
    import importlib

    # allow_abbrev=False: --model must not silently mean --model_name_or_path
    parser = _OneLineParser(prog="p3o", description="Pairwise Proximal Policy Optimization for RLHF.", allow_abbrev=False)
    parser.commands = {}
    parser.add_argument("--version", action="version", version=f"p3o {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        # argparse formats a help string with % (a description only where it names %(prog))
        command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text, allow_abbrev=False)
        parser.commands[name] = command
        if only is not None and name != only:
            continue
        command.add_argument("--debug", action="store_true", help="Show full tracebacks for errors.")
        if name in LAUNCHED:
            add_launch_arguments(command)
        if isinstance(module, tuple):  # every flag is a field of the command's config dataclass
            command.add_argument("--config", help="YAML file of option: value pairs; flags given here override it.")
            add_dataclass_arguments(command, _resolve(module[0]))
        else:
            importlib.import_module(module).add_arguments(command)
        command.set_defaults(module=module)
    return parser


def _resolve(spec: str):
    """"package.module:name" -> the object."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run_command(args: argparse.Namespace) -> None:
    """Run the parsed command (`main` without its error handling and shutdown)."""
    import importlib

    module = args.module
    if isinstance(module, tuple):
        config, run = (_resolve(spec) for spec in module)
        run(build_config(config, args))
    else:
        importlib.import_module(module).run(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    named = next((a for a in argv if not a.startswith("-")), "")  # the command: argparse reads it first
    args = build_parser(named).parse_args(argv)
    from p3o.utils.distributed import shut_down

    _setup_logging()
    try:
        if launch_requested(args):
            return _launch(args, argv)
        run_command(args)
    except UsageError as exc:
        if args.debug:
            raise
        _say(f"p3o {args.command}: error: {exc}")
        return 2
    except AlreadyFinished as exc:  # --resume of a finished run: done
        _say(f"p3o {args.command}: {exc}")
        return 0
    except PermissionError as exc:  # a path the checks could not foresee (a file made read-only, ...)
        if args.debug:
            raise
        _say(f"p3o {args.command}: error: {exc.strerror or 'permission denied'}: {exc.filename or exc}; check "
             "that path's permissions (--debug shows where)")
        return 2
    except OSError as exc:  # a full disk or a read-only one, met while writing
        if args.debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        _say(f"p3o {args.command}: error: {exc.strerror}: {exc.filename or exc}; free some space or choose "
             "another --output_dir (--debug shows where)")
        return 2
    except KeyboardInterrupt as exc:  # a run that saved a checkpoint says how to resume
        _say(f"p3o {args.command}: {str(exc) or 'interrupted'}")
        return 130
    finally:
        shut_down()  # under torchrun / accelerate launch: before Python finalises (see shut_down)
    return 0


def _say(line: str) -> None:
    """The command's last line (an error, how to resume). In a process that `p3o --num_processes`
    started it goes to the launching `p3o`, which prints each distinct line once (`p3o.cli.launch`);
    otherwise to stderr, in one write, so that several processes' lines do not run into one another."""
    if not hand_over(line):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """The command on --num_processes processes (`p3o.cli.launch`), once its config is known to be valid."""
    counted = args.num_processes is not None and args.num_processes > 0  # otherwise `launch` says what is wrong
    if args.command == "pipeline":
        from p3o.cli.pipeline import check, run

        if counted and args.check:  # checked here for that many processes: nothing to launch
            run(args)
            return 0
        if counted:  # every stage's config, as `p3o pipeline --check` checks them
            check(args)
    else:
        cfg = build_config(_resolve(args.module[0]), args)
        if counted:  # what every process would refuse, said once: models, data, rewards, sizes, output_dir
            from p3o.pipeline.recipe import check_inputs
            from p3o.utils.io import check_output_dir

            check_inputs(args.command, cfg, processes=args.num_processes)
            check_output_dir(cfg.output_dir, cfg.overwrite or cfg.resume, {})
    return launch(args, argv)


def _setup_logging() -> None:
    from p3o.utils.distributed import launched_rank

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One process of several speaks for all; the others report only warnings and errors.
    level = logging.INFO if launched_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("p3o")
    except PackageNotFoundError:
        return "unknown"
