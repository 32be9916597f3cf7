"""Algorithms on the shared engine: each is its own loss plus a small adapter, registered by name.

An algorithm says how many responses it samples per prompt, what it derives from a scored rollout
(`prepare`: e.g. P3O's Delta per pair), how a micro-batch of whole groups becomes per-unit losses
(`loss`), and what a minibatch's losses are divided by (`normaliser`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from p3o.errors import UsageError
from p3o.rl.losses import get_loss
from p3o.rl.rollout import Rollout, sequence_logprobs


@dataclass(frozen=True)
class Algorithm:
    name: str
    samples_per_prompt: int
    prepare: Callable[[Rollout, object], dict[str, torch.Tensor]]  # -> per-group tensors
    loss: Callable[[Rollout, torch.Tensor, object], tuple[torch.Tensor, dict[str, float]]]
    normaliser: Callable[[Rollout, object], float]


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is registered twice")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise UsageError(f"unknown --algo {name!r}; known algorithms: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


# --- P3O: pairs, Delta per pair, a pairwise loss (P3O.md sections 2-4) -------------------------

def pair_delta(rollout: Rollout, cfg) -> dict[str, torch.Tensor]:
    """Delta = (r1 - r2) - beta * (kl1 - kl2), the reward difference taken first (P3O.md section 2).

    Raw rewards arrive in float64 and their difference is taken before anything else touches them,
    so a per-prompt reward shift cancels exactly; only Delta is ever scaled or clipped.
    """
    rewards = rollout.seq["rewards"].view(-1, 2)  # (P, 2) float64
    kl = rollout.seq["kl"].view(-1, 2)  # (P, 2)
    reward_diff = (rewards[:, 0] - rewards[:, 1]).to(kl.dtype).to(kl.device)  # (P,) exact, then float32
    delta = reward_diff - cfg.beta * (kl[:, 0] - kl[:, 1])  # (P,)
    if cfg.delta_normalization == "rms":
        delta = delta / delta.pow(2).mean().sqrt().clamp(min=1e-8)
    if cfg.delta_clip is not None:
        delta = delta.clamp(-cfg.delta_clip, cfg.delta_clip)
    return {"delta": delta}


def pairwise_loss(loss_name: str) -> Callable:
    """Adapter: a micro-batch of pairs and its token log-probs (B, T) -> the registered pair loss."""
    loss_fn = get_loss(loss_name)

    def loss(batch: Rollout, token_logps: torch.Tensor, cfg):
        logp = sequence_logprobs(token_logps, batch.seq["response_mask"]).view(-1, 2)  # (P, 2)
        old_logp = batch.seq["old_logp"].view(-1, 2)  # (P, 2)
        return loss_fn(logp, old_logp, batch.group["delta"], clip_eps=cfg.clip_eps, is_clamp=cfg.importance_clamp)

    return loss


def pair_normaliser(batch: Rollout, cfg) -> float:
    """pair-mean divides by the pairs of the minibatch, token-mean by its response tokens."""
    if cfg.loss_aggregation == "token-mean":
        return float(batch.seq["response_mask"].sum())
    return float(batch.num_groups)


for _name in ("p3o-v1", "p3o-v2"):
    register_algorithm(Algorithm(_name, 2, pair_delta, pairwise_loss(_name), pair_normaliser))
