"""Clipped policy-gradient losses of the baselines (docs/p3o.md section 5). Pure functions.

Shape legend: B = sequences, T = response tokens.
    sequence level (RLOO, ReMax):  logp, old_logp, advantages  (B,)
    token level (PPO, GRPO):       logp, old_logp, advantages, mask  (B, T); GRPO's sequence
                                   advantage is broadcast over its tokens by the caller
Each returns un-reduced losses of the same shape as `logp` and detached stats; the algorithm's
adapter turns them into per-group units for `p3o.rl.losses.aggregate`.
"""
from __future__ import annotations

import torch

from p3o.rl.losses.p3o import MAX_LOG_RATIO
from p3o.utils.ops import masked_mean


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float):
    """PPO's surrogate per unit: max(-A * rho, -A * clip(rho, 1-eps, 1+eps)), and where it clipped."""
    rho = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    unclipped = -advantages * rho
    clipped = -advantages * rho.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _ratio_stats(log_ratio: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    log_ratio = log_ratio.detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return {
        "clipfrac": masked_mean(clipped.float(), mask).item(),
        "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item(),  # k3 estimator, >= 0
        "ratio_max": torch.where(mask.bool(), log_ratio.exp(), torch.zeros_like(log_ratio)).max().item(),
    }


def sequence_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE with a per-response advantage, reused with PPO clipping of the sequence ratio:

    L_i = max(-A_i * rho_i, -A_i * clip(rho_i, 1-eps, 1+eps)),  rho_i = exp(l(y_i) - l_old(y_i))

    At rho = 1 the gradient is -A_i * grad l(y_i): RLOO's estimator (Ahmadian et al. 2024). With k = 2
    and A = +-Delta, averaged over the pair, it is P3O-V1's gradient -(Delta/2) grad(l(y1) - l(y2)).
    """
    log_ratio = logp - old_logp.detach()  # (B,)
    losses, clipped = clipped_surrogate(log_ratio, advantages.detach(), clip_eps)  # (B,)
    return losses, _ratio_stats(log_ratio, clipped, torch.ones_like(logp))


def token_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's per-token clipped surrogate (GRPO uses it with one advantage per response):

    L_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1-eps, 1+eps)),  rho_t = pi(y_t | ...) / pi_old(y_t | ...)

    Returns (B, T) losses, zero on padding.
    """
    log_ratio = logp - old_logp.detach()  # (B, T)
    losses, clipped = clipped_surrogate(log_ratio, advantages.detach(), clip_eps)  # (B, T)
    return torch.where(mask.bool(), losses, torch.zeros_like(losses)), _ratio_stats(log_ratio, clipped, mask)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """1/2 * max((V - R)^2, (V_clip - R)^2),  V_clip = V_old + clip(V - V_old, -clip, clip). (B, T)."""
    returns, old_values = returns.detach(), old_values.detach()
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error, clipped_error = (values - returns).pow(2), (clipped_values - returns).pow(2)
    losses = 0.5 * torch.maximum(unclipped_error, clipped_error)  # (B, T)
    stats = {"value_loss": masked_mean(losses.detach(), mask).item(),
             "value_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask).item()}
    return torch.where(mask.bool(), losses, torch.zeros_like(losses)), stats


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    value_clip: float = 0.2,
    vf_coef: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO with a critic (docs/p3o.md section 5), per token (B, T): clipped surrogate + vf_coef * clipped value loss."""
    policy_losses, stats = token_clip_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps)
    value_losses, value_stats = clipped_value_loss(values, old_values, returns, mask, value_clip)
    stats["policy_loss"] = masked_mean(policy_losses.detach(), mask).item()
    return policy_losses + vf_coef * value_losses, {**stats, **value_stats}
