"""`p3o eval`: flags are the fields of `EvalSettings`, plus `--model_name_or_path` taking one or more
policies (a list, which the dataclass-to-flags helper cannot express, so it is added here by hand)."""
from __future__ import annotations

import dataclasses

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.eval.evaluate import EvalConfig, EvalSettings, run_eval


def add_arguments(parser) -> None:
    field = next(f for f in dataclasses.fields(EvalConfig) if f.name == "model_name_or_path")
    parser.add_argument("--model_name_or_path", nargs="+", default=None, metavar="MODEL", help=field.metadata["help"])
    add_dataclass_arguments(parser, EvalSettings)


def run(args) -> None:
    settings = build_config(EvalSettings, args)
    run_eval(EvalConfig(model_name_or_path=args.model_name_or_path,
                        **{f.name: getattr(settings, f.name) for f in dataclasses.fields(EvalSettings)}))
