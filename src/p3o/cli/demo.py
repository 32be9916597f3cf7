"""`p3o demo`: the whole pipeline on an embedded task, offline, in minutes."""
from __future__ import annotations

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.pipeline.demo import DemoConfig, run_demo


def add_arguments(parser) -> None:
    add_dataclass_arguments(parser, DemoConfig)


def run(args) -> None:
    run_demo(build_config(DemoConfig, args))
