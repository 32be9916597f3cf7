"""Policy losses: pure functions of tensors, written as in docs/p3o.md.

Every loss returns `(per_unit_losses, stats)`: the un-reduced losses (one per pair for the pairwise
losses) and a dict of detached Python floats. An algorithm's adapter (`p3o.rl.algorithms`) turns a
micro-batch into these functions' arguments; the engine reduces the result with `aggregate`, so that
gradient accumulation and several processes see one normaliser for the whole minibatch. The
algorithms are the registry: the functions here have the signatures their maths needs.
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("group-mean", "token-mean")


def aggregate(unit_losses: torch.Tensor, normaliser: float | torch.Tensor) -> torch.Tensor:
    """Sum of per-unit losses over a micro-batch divided by the whole minibatch's normaliser.

    group-mean: normaliser = prompt groups in the minibatch (pairs for P3O: docs/p3o.md section 4, trajectory level);
    token-mean: normaliser = response tokens in the minibatch. Using the minibatch's count, not the
    micro-batch's, is what makes gradient accumulation equal to one large batch.
    """
    return unit_losses.sum() / normaliser

