"""`p3o train`: flags are the fields of `TrainConfig`; `--config file.yaml` may set any of them."""
from __future__ import annotations

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.rl.config import TrainConfig


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file of option: value pairs; flags given here override it.")
    add_dataclass_arguments(parser, TrainConfig)


def run(args) -> None:
    from p3o.rl.train import run_train

    run_train(build_config(TrainConfig, args))
