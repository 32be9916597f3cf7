"""DPO's loss (Rafailov et al. 2023; docs/p3o.md section 5). A pure function.

Shape legend: P = pairs; the trailing 2 indexes (chosen, rejected).
    logp      (P, 2)  l(y): sequence log-probability under the policy being trained (has grad)
    ref_logp  (P, 2)  l_ref(y): under the frozen reference policy
    weight    (P,)    1 for a pair that carries a preference, 0 for a tie (online DPO)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = -log sigmoid( beta * [ (l(y_w) - l_ref(y_w)) - (l(y_l) - l_ref(y_l)) ] ), per pair (P,).

    With the policy equal to the reference every pair's loss is log 2.
    """
    implicit_rewards = beta * (logp - ref_logp.detach())  # (P, 2)
    margin = implicit_rewards[:, 0] - implicit_rewards[:, 1]  # (P,)
    losses = -F.logsigmoid(margin)  # (P,)
    if weight is not None:
        losses = losses * weight
    counted = torch.ones_like(margin, dtype=torch.bool) if weight is None else weight > 0  # ties say nothing
    implicit_rewards, margin = implicit_rewards.detach()[counted], margin.detach()[counted]
    logp = logp.detach()[counted]  # (P', 2)
    stats = {"chosen_reward": _mean(implicit_rewards[:, 0]), "rejected_reward": _mean(implicit_rewards[:, 1]),
             "reward_margin": _mean(margin), "reward_accuracy": _mean((margin > 0).float()),
             "chosen_logp": _mean(logp[:, 0]), "rejected_logp": _mean(logp[:, 1])}  # TRL's logps/chosen, /rejected
    return losses, stats


def _mean(values: torch.Tensor) -> float:
    return values.mean().item() if values.numel() else 0.0
