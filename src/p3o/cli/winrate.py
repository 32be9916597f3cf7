"""`p3o winrate`: flags are the fields of `WinrateConfig`; `--config file.yaml` may set any of them."""
from __future__ import annotations

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.eval.winrate import WinrateConfig


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file of option: value pairs; flags given here override it.")
    add_dataclass_arguments(parser, WinrateConfig)


def run(args) -> None:
    from p3o.eval.winrate import run_winrate

    run_winrate(build_config(WinrateConfig, args))
