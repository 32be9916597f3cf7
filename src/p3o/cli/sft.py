"""`p3o sft`: flags are the fields of `SFTConfig`; `--config file.yaml` may set any of them."""
from __future__ import annotations

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.sft.train import SFTConfig


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file of option: value pairs; flags given here override it.")
    add_dataclass_arguments(parser, SFTConfig)


def run(args) -> None:
    from p3o.sft.train import run_sft

    run_sft(build_config(SFTConfig, args))
