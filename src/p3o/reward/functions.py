"""Reward functions named `package.module:function` or `path/to/file.py:function`."""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from p3o.errors import RewardError, UsageError


def load_reward_function(spec: str) -> Callable:
    """Import the callable that `spec` names; every failure is one line saying how to fix it."""
    if ":" not in spec:
        raise UsageError(f"reward function {spec!r} must look like package.module:function or path/to/file.py:function")
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        module = _import_file(target, spec)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UsageError(f"reward function {spec}: cannot import module {target!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise UsageError(f"reward function {spec}: {target} has no attribute {attr!r}")
    if not callable(fn):
        raise UsageError(f"reward function {spec}: {attr!r} is not callable")
    return fn


def _import_file(path: str, spec: str):
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"reward function {spec}: file {path} does not exist")
    name = f"p3o_reward_{abs(hash(str(file.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # lets the file use dataclasses/pickling of its own objects
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UsageError(f"reward function {spec}: importing {path} failed ({type(exc).__name__}: {exc})") from None
    return module


def check_rewards(values: Any, expected: int, name: str, none_allowed: bool = False) -> torch.Tensor:
    """A flat list of `expected` finite numbers -> float64 tensor (B,), else a RewardError naming `name`.

    Lists, tuples and 1-D numpy arrays or torch tensors are accepted; strings, mappings, nested
    lists and None are not (each would silently mean something else). `none_allowed`: None is TRL's
    "not applicable to this completion", returned as NaN (a NaN the function returns is still refused)."""
    if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):  # numpy / torch
        values = values.tolist()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise RewardError(f"reward {name} must return a list of numbers, got {type(values).__name__}")
    values = list(values)
    for value in values:
        if value is None and none_allowed:
            continue
        if isinstance(value, (str, bytes, list, tuple, Mapping)) or not hasattr(value, "__float__"):
            hint = " (None, TRL's 'not applicable', is accepted in training's rewards, not here)" * (value is None)
            raise RewardError(f"reward {name} must return a flat list of numbers, got an element {value!r}{hint}")
    if len(values) != expected:
        raise RewardError(f"reward {name} returned {len(values)} values for {expected} completions; "
                          "it must return one float per completion")
    bad = [i for i, v in enumerate(values) if v is not None and not math.isfinite(float(v))]
    values = [math.nan if v is None else float(v) for v in values]
    if bad:
        raise RewardError(f"reward {name} returned a non-finite value ({values[bad[0]]}) for completion {bad[0]} "
                          f"({len(bad)} of {expected}); it must return finite floats")
    return torch.tensor(values, dtype=torch.float64)


def takes_names(fn: Callable) -> bool:
    """Whether `fn` takes `completions` first (or by keyword only), as TRL's `fn(completions, **kwargs)`
    does: then it is called as TRL calls reward functions, every argument by keyword (the prompts in
    `kwargs["prompts"]`). Every other function is called positionally, `fn(prompts, completions,
    **kwargs)`, whatever its parameters are named."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return False
    named = {p.name: p for p in params}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    first = positional[0].name if positional else None
    return "completions" in named and named["completions"].kind != inspect.Parameter.POSITIONAL_ONLY and (
        first == "completions" or named["completions"].kind == inspect.Parameter.KEYWORD_ONLY)


def outside_training() -> dict:
    """TRL's reward context where no run is training: a fresh TrainerState, hooks that log nothing."""
    from transformers import TrainerState

    return {"trainer_state": TrainerState(), "log_metric": lambda name, value: None,
            "log_extra": lambda column, values: None}


class RewardFunction:
    """A user callable `fn(prompts, completions, **kwargs) -> list[float]` (or TRL's
    `fn(completions, **kwargs)`), checked on every call.

    kwargs are the prompt dataset's other columns (one entry per completion), `completion_ids`, and
    TRL's `trainer_state`, `log_extra` and `log_metric` (`trl_context`: the training run's, else
    `outside_training()`) where `fn` takes `**kwargs` or names them (one built here in Python may not).
    """

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name, self.by_name = fn, name, takes_names(fn)
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature
            params = []
        self.takes = None if any(p.kind == p.VAR_KEYWORD for p in params) else {p.name for p in params}  # None: all

    def __call__(self, prompts: list, completions: list, trl_context: dict | None = None, **kwargs) -> torch.Tensor:
        """(B,) finite rewards: a None refused (this reward stands alone)."""
        return self.scores(prompts, completions, trl_context, False, **kwargs)

    def scores(self, prompts: list, completions: list, trl_context: dict | None = None, none_allowed: bool = True,
               /, **kwargs) -> torch.Tensor:
        """(B,) rewards, NaN where the function returned None (`WeightedRewards` leaves it out of the sum).
        Positional-only, so a dataset column may be named like any parameter here."""
        values = settled([self.call(prompts, completions, trl_context, **kwargs)])[0]
        return self.checked(values, len(completions), none_allowed)

    def call(self, prompts: list, completions: list, trl_context: dict | None = None, /, **kwargs):
        """What the function returns: its values, or for an `async def` one a coroutine (`settled`)."""
        context = trl_context if trl_context is not None else outside_training()  # eval, winrate, the demos
        kwargs.update({k: v for k, v in context.items() if self.takes is None or k in self.takes})
        try:
            return (self.fn(prompts=prompts, completions=completions, **kwargs) if self.by_name
                    else self.fn(prompts, completions, **kwargs))
        except Exception as exc:
            raise RewardError(f"reward function {self.name} raised {type(exc).__name__}: {exc}") from exc

    def checked(self, values, expected: int, none_allowed: bool) -> torch.Tensor:
        """`call`'s values, settled, as a (B,) tensor; an exception an async function raised, as a RewardError."""
        if isinstance(values, Exception):
            raise RewardError(f"reward function {self.name} raised {type(values).__name__}: {values}") from values
        return check_rewards(values, expected, f"function {self.name}", none_allowed)


def settled(results: list) -> list:
    """`results` with each coroutine replaced by what it returns (or the exception it raises), the
    coroutines run together, as TRL runs async reward functions: on one event loop, in a thread of
    its own, kept for the process (a client a function keeps between calls stays on its loop). A
    SystemExit or KeyboardInterrupt one raises is raised here, in the caller's thread."""
    pending = [i for i, r in enumerate(results) if inspect.isawaitable(r)]
    if not pending:
        return results

    async def caught(awaitable):  # every exception comes back as a value: none may stop the loop's thread
        try:
            return await awaitable
        except BaseException as exc:  # noqa: BLE001
            return exc

    async def together():
        return await asyncio.gather(*(caught(results[i]) for i in pending))

    done = asyncio.run_coroutine_threadsafe(together(), _event_loop()).result()
    if stop := next((v for v in done if isinstance(v, BaseException) and not isinstance(v, Exception)), None):
        raise stop
    out = list(results)
    for i, value in zip(pending, done):
        out[i] = value
    return out


_LOOP: list = []  # [(loop, thread)] once made


def _event_loop() -> asyncio.AbstractEventLoop:
    if not _LOOP or not _LOOP[0][1].is_alive():
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="p3o-async-rewards", daemon=True)
        thread.start()
        _LOOP[:] = [(loop, thread)]
    return _LOOP[0][0]
