"""Config fields documented once (`option`), and how a value from a YAML file or a flag becomes a
field's type. The configs of every stage use these; `p3o.cli.args` turns the same fields into flags.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from p3o.errors import UsageError

_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def option(default, help: str, **metadata):
    """A config field documented once: its `--flag` help, and `required=True` where it has no default."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _scalar_type(field: dataclasses.Field) -> type:
    """`int | None` -> int, `list[float] | None` -> float; the dataclasses use `from __future__ import
    annotations`, so types are strings."""
    name = str(field.type).replace(" ", "").replace("|None", "").replace("Optional[", "").rstrip("]")
    return _SCALARS[name.removeprefix("list[")]


def is_list(field: dataclasses.Field) -> bool:
    return str(field.type).replace(" ", "").startswith("list[")


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    if value is None or (value == "" and "None" in str(field.type)):  # `--reward_fn ""` means unset
        return None
    if is_list(field):  # one value or several; each checked like a scalar
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_coerce_scalar(field, v, source) for v in values if v != ""] or None
    return _coerce_scalar(field, value, source)


def _coerce_scalar(field: dataclasses.Field, value: Any, source: str) -> Any:
    kind = _scalar_type(field)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
    else:
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise UsageError(f"{source}: {field.name} must be {kind.__name__}, got {value!r}")


def read_yaml_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of option names to values")
    return data


def did_you_mean(key: str, known) -> str:
    """" (did you mean 'learning_rate'?)" for a near miss among `known`, else ""."""
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def typed(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` (option names of the dataclass `cls`, as a YAML file gives them) each checked against
    its field's type; `where` names their source in an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {k: _coerce(fields[k], v, where) for k, v in values.items()}
