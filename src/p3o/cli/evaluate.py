"""`p3o eval` (being built)."""
from __future__ import annotations

from p3o.errors import UsageError


def add_arguments(parser) -> None:
    pass


def run(args) -> None:
    raise UsageError("p3o eval is not built yet")
