"""Turn a documented config dataclass into `--flags`, merged over an optional `--config file.yaml`.

Flags take precedence over the YAML file, which takes precedence over the dataclass defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

from p3o.errors import UsageError
from p3o.options import _coerce, _scalar_type, did_you_mean, is_list, option, read_yaml_config  # noqa: F401 (re-exported)

C = TypeVar("C")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--name` per field, help from the field's metadata, grouped by the class's `SECTIONS`
    where it has them; defaults are suppressed so that only the flags actually given override the
    YAML file."""
    present = {f.name for f in dataclasses.fields(cls)}
    groups = {}  # one per section that has fields here, in the order SECTIONS lists them
    for section, names in getattr(cls, "SECTIONS", {}).items():
        if present & set(names):
            group = parser.add_argument_group(f"{section} options")
            groups.update({name: group for name in names})
    for f in dataclasses.fields(cls):
        target = groups.get(f.name, parser)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help strings with %
        if f.default is not dataclasses.MISSING and f.default is not None and not f.metadata.get("required"):
            help_text += f" (default: {f.default})"
        choices = f.metadata.get("choices")
        if is_list(f):  # `--reward_fn A --reward_fn B` and `--reward_weights 1 0.5` both work
            target.add_argument(f"--{f.name}", nargs="+", action="extend", default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text)
        elif _scalar_type(f) is bool:
            target.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:  # choices are shown in --help ({a,b,c}) and checked by argparse
            target.add_argument(f"--{f.name}", default=argparse.SUPPRESS, choices=choices,
                                metavar=None if choices else f.name.upper(), help=help_text)


def build_config(cls: type[C], namespace: argparse.Namespace) -> C:
    """Defaults < YAML (`--config`) < flags, each value checked against the field's type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    config_path = getattr(namespace, "config", None)
    if config_path:
        for key, value in read_yaml_config(config_path).items():
            if key in ("num_processes", "accelerate_config"):  # p3o.cli.launch: they start the launcher
                raise UsageError(f"{config_path}: {key} is a command-line flag only (it starts the processes "
                                 f"before any config is read); pass --{key}")
            if key not in fields:
                raise UsageError(f"{config_path}: unknown option {key!r}{did_you_mean(key, fields, value)}; see the "
                                 "command's --help")
            values[key] = _coerce(fields[key], value, config_path)
    for key, value in vars(namespace).items():
        if key in fields:
            for other in _spellings(fields, key) - {key}:  # a flag overrides the file under either name
                values.pop(other, None)
            values[key] = _coerce(fields[key], value, f"--{key}")
    for name, f in fields.items():  # the command line has no objects to stand in for a required path
        aliases = [n for n, g in fields.items() if g.metadata.get("alias_of") == name]  # TRL's names
        if f.metadata.get("required") and all(values.get(n, fields[n].default) is None for n in [name, *aliases]):
            raise UsageError(f"--{name} is required")
    return cls(**values)


def _spellings(fields: dict, name: str) -> set[str]:
    """`name` and its other spellings (TRL's names: max_completion_length for max_new_tokens)."""
    canonical = fields[name].metadata.get("alias_of") or name
    return {canonical} | {n for n, f in fields.items() if f.metadata.get("alias_of") == canonical}


def config_from_argv(cls: type[C], argv: list[str]) -> C:
    """`cls` from command-line flags alone, as its `p3o` subcommand would build it (for scripts)."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_dataclass_arguments(parser, cls)
    return build_config(cls, parser.parse_args(argv))
