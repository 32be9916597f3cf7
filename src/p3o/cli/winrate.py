"""`p3o winrate` (being built)."""
from __future__ import annotations

from p3o.errors import UsageError


def add_arguments(parser) -> None:
    pass


def run(args) -> None:
    raise UsageError("p3o winrate is not built yet")
