"""`p3o eval`: flags are the fields of `EvalSettings`, plus `--model_name_or_path` taking one or more
policies (a list, which the dataclass-to-flags helper cannot express, so it is added here by hand),
and `--config`, a YAML file of the same options (`model_name_or_path` a list there)."""
from __future__ import annotations

import argparse
import dataclasses

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.eval.evaluate import EvalConfig, EvalSettings, run_eval


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file of option: value pairs; flags given here override it.")
    field = next(f for f in dataclasses.fields(EvalConfig) if f.name == "model_name_or_path")
    parser.add_argument("--model_name_or_path", nargs="+", default=argparse.SUPPRESS, metavar="MODEL", help=field.metadata["help"])
    add_dataclass_arguments(parser, EvalSettings)


def run(args) -> None:
    run_eval(build_config(EvalConfig, args))
