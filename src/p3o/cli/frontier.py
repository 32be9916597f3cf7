"""`p3o frontier`: flags are the fields of `FrontierConfig`; `--config file.yaml` may set any of them."""
from __future__ import annotations

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.eval.frontier import FrontierConfig


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file of option: value pairs; flags given here override it.")
    add_dataclass_arguments(parser, FrontierConfig)


def run(args) -> None:
    from p3o.eval.frontier import run_frontier

    run_frontier(build_config(FrontierConfig, args))
