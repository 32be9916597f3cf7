"""Name -> function registries (losses, advantage estimators): registered once, looked up with the
known names in the refusal."""
from __future__ import annotations

from collections.abc import Callable

from p3o.errors import UsageError


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: `fn` under `name`; a name registered twice is an error."""

        def decorate(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = fn
            return fn

        return decorate

    def find(self, name: str) -> Callable:
        """The function registered as `name`; an unknown name is refused with the known ones."""
        if name not in self:
            raise UsageError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
        return self[name]
