"""P3O losses, docs/p3o.md section 4. Pure functions: tensors and floats in, (losses, stats) out.

Shape legend: P = pairs; the trailing 2 indexes the two responses y1, y2 of a pair.
    logp      (P, 2)  l(y_i): sequence log-probability under the policy being trained (has grad)
    old_logp  (P, 2)  l_old(y_i): under the policy that sampled the rollout
    delta     (P,)    Delta = (r1 - r2) - beta * (kl1 - kl2), the pair's relative advantage
Returns per-pair losses (P,) and detached stats; `p3o.rl.losses.aggregate` reduces them.
"""
from __future__ import annotations

import math

import torch


# Log-ratios are clamped before exp (as verl does) so that a stale rollout cannot overflow float32;
# e^20 is far outside any clip region, so the clamp only matters where the update is already wild.
MAX_LOG_RATIO = 20.0


def importance_weight(log_ratio: torch.Tensor, clamp: float) -> torch.Tensor:
    """w(rho) = clamp(rho, 1/C, C), always stop-gradient; computed in log space so it never overflows."""
    bound = math.log(clamp)
    return log_ratio.detach().clamp(-bound, bound).exp()


def _ratio_stats(log_ratio: torch.Tensor, clipped: torch.Tensor) -> dict[str, float]:
    log_ratio = log_ratio.detach()
    return {
        "clipfrac": clipped.float().mean().item(),
        # k3 estimator of KL(old || new) over the responses: (rho - 1) - log rho >= 0.
        "approx_kl": (log_ratio.exp() - 1 - log_ratio).mean().item(),
        "ratio_max": log_ratio.exp().max().item(),
    }


def p3o_v1_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    delta: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    is_clamp: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """P3O-V1, separate clipping:

    L_V1 = 1/2 * [ max(-Delta * w(rho2) * rho1, -Delta * w(rho2) * clip(rho1, 1-eps, 1+eps))
                 + max(+Delta * w(rho1) * rho2, +Delta * w(rho1) * clip(rho2, 1-eps, 1+eps)) ]
    """
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # (P, 2)
    rho1, rho2 = log_ratio.exp().unbind(-1)  # (P,), (P,)
    w1, w2 = importance_weight(log_ratio, is_clamp).unbind(-1)  # (P,), (P,)
    delta = delta.detach()

    def clip(rho: torch.Tensor) -> torch.Tensor:
        return rho.clamp(1 - clip_eps, 1 + clip_eps)

    term1 = (-delta * w2 * rho1, -delta * w2 * clip(rho1))
    term2 = (+delta * w1 * rho2, +delta * w1 * clip(rho2))
    losses = 0.5 * (torch.maximum(*term1) + torch.maximum(*term2))  # (P,)
    # A term is clipped when the constant branch wins outright: its gradient is exactly zero.
    clipped = torch.stack([term1[1] > term1[0], term2[1] > term2[0]], -1)  # (P, 2)
    return losses, _ratio_stats(log_ratio, clipped)


def p3o_v2_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    delta: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    is_clamp: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """P3O-V2, joint clipping of the pair's relative log-ratio:

    d    = l(y1) - l(y2),  d_old = l_old(y1) - l_old(y2)
    L_V2 = 1/2 * max(-Delta * w(rho1*rho2) * d, -Delta * w(rho1*rho2) * clip(d, d_old - eps, d_old + eps))
    """
    log_ratio = logp - old_logp  # (P, 2); only the weight and the stats read it, never exp'ed unclamped
    # Clamp the sum, not the parts: (25, -24) is rho1*rho2 = e, which clamping each to +-20 makes 1.
    w12 = importance_weight(log_ratio.sum(-1), is_clamp)  # (P,) w(rho1 * rho2)
    d = logp[:, 0] - logp[:, 1]  # (P,)
    d_old = (old_logp[:, 0] - old_logp[:, 1]).detach()  # (P,)
    delta = delta.detach()

    unclipped = -delta * w12 * d
    clipped = -delta * w12 * torch.clamp(d, d_old - clip_eps, d_old + clip_eps)
    losses = 0.5 * torch.maximum(unclipped, clipped)  # (P,)
    return losses, _ratio_stats(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), (clipped > unclipped)[:, None])
