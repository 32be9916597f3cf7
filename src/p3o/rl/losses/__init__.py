"""Registry of policy losses: each is a pure function of tensors, looked up once by name.

Every loss returns `(per_unit_losses, stats)`: the un-reduced losses (one per pair for the pairwise
losses) and a dict of detached Python floats. The engine reduces them with `aggregate` so that
gradient accumulation and (later) several processes see one normaliser for the whole minibatch.
"""
from __future__ import annotations

import torch

from p3o.utils.registry import Registry

LOSSES = Registry("loss")  # name -> fn(...) -> (per-unit losses, stats)
register_loss, get_loss = LOSSES.register, LOSSES.find

AGGREGATIONS = ("group-mean", "token-mean")


def aggregate(unit_losses: torch.Tensor, normaliser: float | torch.Tensor) -> torch.Tensor:
    """Sum of per-unit losses over a micro-batch divided by the whole minibatch's normaliser.

    group-mean: normaliser = prompt groups in the minibatch (pairs for P3O: docs/p3o.md section 4, trajectory level);
    token-mean: normaliser = response tokens in the minibatch. Using the minibatch's count, not the
    micro-batch's, is what makes gradient accumulation equal to one large batch.
    """
    return unit_losses.sum() / normaliser


from p3o.rl.losses import dpo as _dpo  # noqa: E402,F401  (registers dpo)
from p3o.rl.losses import p3o as _p3o  # noqa: E402,F401  (registers p3o-v1 and p3o-v2)
from p3o.rl.losses import policy_gradient as _pg  # noqa: E402,F401  (sequence-clip, token-clip, ppo)
