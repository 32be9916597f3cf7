"""`p3o rm`: flags are the fields of `RMConfig`; `--config file.yaml` may set any of them."""
from __future__ import annotations

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.reward.train import RMConfig


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file of option: value pairs; flags given here override it.")
    add_dataclass_arguments(parser, RMConfig)


def run(args) -> None:
    from p3o.reward.train import run_rm

    run_rm(build_config(RMConfig, args))
