"""Rewards for the RL stage: Python functions, sequence-classification reward models, or a weighted
sum of several.

Each is called with B prompts and B completions and returns a float64 tensor (B,) of raw rewards,
after checking the count and finiteness. Raw rewards are never normalised or clipped here
(docs/p3o.md section 2): P3O takes differences within a pair, so a per-prompt shift of any part of a
weighted sum changes nothing.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from p3o.errors import UsageError
from p3o.models.loading import load_tokenizer
from p3o.reward.functions import RewardFunction, load_reward_function, settled, takes_names
from p3o.reward.model import RewardModelScorer, model_kind
from p3o.reward.remote import RemoteReward

log = logging.getLogger("p3o")


class WeightedRewards:
    """r = sum_i w_i * r_i over named parts; `last_parts` holds each part of the last call (B,).

    A reward function may return None for a completion, TRL's "not applicable" (NaN in `last_parts`):
    that completion's reward is the weighted sum of the parts that apply, and 0 where none does
    (TRL's nansum), with a warning."""

    def __init__(self, parts: list[tuple[str, Callable, float]]):
        self.parts, self.last_parts = parts, {}

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.parts]

    def __call__(self, prompts: list, completions: list, trl_context: dict | None = None, **kwargs) -> torch.Tensor:
        """`trl_context`: TRL's trainer_state, log_extra and log_metric, for the reward functions only
        (a reward model or a URL has no use for them)."""
        functions = {name for name, source, _ in self.parts if isinstance(source, RewardFunction)}
        values = settled([source.call(prompts, completions, trl_context, **kwargs) if name in functions
                          else source(prompts, completions, **kwargs)
                          for name, source, _ in self.parts])  # async functions' coroutines run together
        self.last_parts = {name: source.checked(v, len(completions), True) if name in functions else v
                           for (name, source, _), v in zip(self.parts, values)}
        total, applies = None, None
        for name, _, weight in self.parts:  # weight 1 of one reward gives that reward bit for bit
            part = self.last_parts[name]
            known = ~part.isnan()
            term = torch.where(known, part * weight, 0.0)
            total, applies = (term, known) if total is None else (total + term, applies | known)
        if not applies.all():
            log.warning("no reward applies to %d of %d completions (every reward function returned None); "
                        "their reward is 0, as in TRL", int((~applies).sum()), len(applies))
        return total


def build_rewards(sources: list, weights: list[float] | None = None, trust_remote_code: bool = False,
                  batch_size: int = 64, device=None, url_settings: tuple[float, int] = (60.0, 5)) -> WeightedRewards | None:
    """The weighted sum of `sources` (None if there are none). A source is a function spec
    (`package.module:fn`, `file.py:fn`), a reward-model path or hub name (or .gguf), an http(s) URL
    (`RemoteReward`, with `url_settings` = (timeout, retries)), a callable
    `fn(prompts, completions, **kwargs)`, or a loaded sequence-classification model."""
    if not sources:
        return None
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise UsageError(f"reward_weights has {len(weights)} weights for {len(sources)} rewards; give one per reward")
    built = [_reward_source(s, i, trust_remote_code, batch_size, device, url_settings) for i, s in enumerate(sources)]
    names = _unique([name for name, _ in built])
    return WeightedRewards([(name, source, w) for name, (_, source), w in zip(names, built, weights)])


def score_in(reward: WeightedRewards, mixed_precision: str) -> None:
    """The reward models among `reward`'s parts score under the run's --mixed_precision (bf16 or fp16),
    as the policy does; functions and remote rewards are left as they are."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None:
        return
    for _, source, _ in reward.parts:
        if isinstance(source, RewardModelScorer):
            source.score_in(dtype)


def build_reward(reward_fn: str | None, reward_model: str | None, trust_remote_code: bool = False,
                 batch_size: int = 64, device=None):
    """One reward from a function spec or a reward-model path (the evaluation commands' form)."""
    if reward_fn is not None:
        return RewardFunction(_checked(load_reward_function(reward_fn), reward_fn), reward_fn)
    return RewardModelScorer.load(reward_model, trust_remote_code=trust_remote_code, batch_size=batch_size,
                                  device=device)


def _reward_source(source, index: int, trust_remote_code: bool, batch_size: int, device,
                   url_settings: tuple[float, int]) -> tuple[str, Callable]:
    where = f"reward_funcs[{index}]"
    if isinstance(source, (RewardFunction, RewardModelScorer, RemoteReward)):
        return source.name, source
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            remote = RemoteReward(source, *url_settings)
            return remote.name, remote
        if ":" in source and not Path(source).exists():
            return source.rpartition(":")[2], RewardFunction(_checked(load_reward_function(source), source), source)
        scorer = RewardModelScorer.load(source, trust_remote_code=trust_remote_code, batch_size=batch_size,
                                        device=device)
        return Path(source.rstrip("/")).name or source, scorer
    if isinstance(source, torch.nn.Module):
        return _loaded_reward_model(source, where, trust_remote_code, batch_size, device)
    if callable(source):
        check_reward_signature(source, where)
        name = getattr(source, "__name__", type(source).__name__)
        return name, RewardFunction(source, name)
    raise UsageError(f"{where} is a {type(source).__name__}; give a function fn(prompts, completions, **kwargs), "
                     "a reward-model path or a loaded sequence-classification model")


def _checked(fn: Callable, spec: str) -> Callable:
    """A function named by a spec, its signature checked before any rollout is sampled."""
    check_reward_signature(fn, f"reward function {spec}:")
    return fn


def check_reward_signature(fn: Callable, where: str) -> None:
    """fn must take (prompts, completions, **kwargs), or TRL's (completions, **kwargs): the dataset's
    other columns and completion_ids come as keywords (a column may also be a named parameter, as
    `fn(prompts, completions, topic, **kw)`)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    varkw = any(p.kind == p.VAR_KEYWORD for p in params)
    if not ((len(positional) >= 2 or varargs or takes_names(fn)) and varkw):
        raise UsageError(f"{where} {getattr(fn, '__name__', fn)}{inspect.signature(fn)} must accept "
                         "(prompts, completions, **kwargs), or (completions, **kwargs) as in TRL: the dataset's "
                         "other columns and completion_ids come as keyword arguments")


def _loaded_reward_model(model, where: str, trust_remote_code: bool, batch_size: int, device):
    kind = type(model).__name__  # the class, not config.architectures (copied from the checkpoint it came from)
    if not kind.endswith("ForSequenceClassification") or model.config.num_labels != 1:
        raise UsageError(f"{where}: a model given as a reward must be a sequence-classification model with one "
                         f"label, got {model_kind(model)}")
    name = getattr(model.config, "name_or_path", "") or getattr(model, "name_or_path", "")
    if not name:
        raise UsageError(f"{where}: cannot find the reward model's tokenizer (the model has no name_or_path); "
                         "give the reward model as a path")
    tokenizer = load_tokenizer(name, trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return Path(name.rstrip("/")).name or name, RewardModelScorer(model, tokenizer, name, batch_size, device)


def _unique(names: list[str]) -> list[str]:
    """Names with repeats numbered (fruit, fruit_2), for the per-part metrics reward/<name>."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


__all__ = ["build_reward", "build_rewards", "check_reward_signature", "score_in", "RemoteReward", "RewardFunction",
           "RewardModelScorer", "WeightedRewards", "load_reward_function"]
