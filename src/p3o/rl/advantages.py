"""Advantage estimators of the baselines (docs/p3o.md section 5). Pure functions of tensors.

Shape legend: G = prompts, k = responses per prompt, B = G*k sequences, T = response tokens.

Shift invariance (docs/p3o.md section 2): the group estimators read raw rewards (float64) only through
differences within a group, taken first, so a per-prompt reward shift cancels exactly, bit for bit.
The KL part `beta * kl` is added after, in the working precision.
"""
from __future__ import annotations

import torch

from p3o.utils.ops import masked_sum
from p3o.utils.registry import Registry

# name -> estimator(rewards (G, k) float64, kl (G, k), beta, rollout, cfg) -> advantages (G, k);
# `rollout` (a `p3o.rl.rollout.Rollout`) carries per-prompt extras (ReMax's greedy baseline).
ESTIMATORS = Registry("advantage estimator")
register_estimator, get_estimator = ESTIMATORS.register, ESTIMATORS.find


def leave_one_out(rewards: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """RLOO: A_i = s_i - mean_{j != i} s_j with s = r - beta * kl.  (G, k) float64, (G, k) -> (G, k).

    The reward part is (1/(k-1)) * sum_j (r_i - r_j): differences first, so a shift cancels exactly.
    """
    k = rewards.shape[-1]
    reward_part = (rewards[:, :, None] - rewards[:, None, :]).sum(-1) / (k - 1)  # (G, k) float64
    kl_part = kl - (kl.sum(-1, keepdim=True) - kl) / (k - 1)  # (G, k)
    return reward_part.to(kl.dtype) - beta * kl_part


def group_normalised(rewards: torch.Tensor, kl: torch.Tensor, beta: float, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(r)) / (std(r) + eps) - beta * (kl_i - mean(kl)).  (G, k) -> (G, k).

    Only the reward is divided by its group std: a group whose rewards all tie gets no reward
    advantage, and KL noise is never blown up to the size of a real win (KL enters unscaled, as a
    per-response penalty, like TRL's separate KL term). With k = 2 the reward part is +-1/sqrt(2):
    only the sign of r1 - r2 survives. `scale=False` skips the division (Dr. GRPO).
    """
    centred = (rewards[:, :, None] - rewards[:, None, :]).mean(-1)  # (G, k) = r_i - mean(r), differences first
    if scale:
        centred = centred / (centred.std(-1, keepdim=True) + eps)
    return centred.to(kl.dtype) - beta * (kl - kl.mean(-1, keepdim=True))


def greedy_baseline(rewards: torch.Tensor, kl: torch.Tensor, baseline_rewards: torch.Tensor,
                    baseline_kl: torch.Tensor, beta: float) -> torch.Tensor:
    """ReMax: A_i = s_i - s_greedy, the score of the prompt's greedy response as baseline.

    rewards, kl (G, k); baseline_rewards, baseline_kl (G,) -> (G, k).
    """
    reward_part = (rewards - baseline_rewards[:, None]).to(kl.dtype)  # (G, k) difference first
    return reward_part - beta * (kl - baseline_kl[:, None])


def token_rewards(scores: torch.Tensor, old_token_logp: torch.Tensor, ref_token_logp: torch.Tensor,
                  mask: torch.Tensor, beta: float) -> torch.Tensor:
    """PPO's per-token reward: -beta * (log pi_old(y_t) - log pi_ref(y_t)), plus the score r(x, y) on
    the last response token.  scores (B,), the rest (B, T) -> (B, T), zero on padding."""
    rewards = -beta * (old_token_logp - ref_token_logp)  # (B, T)
    last = (mask.sum(-1) - 1).clamp(min=0).long()  # (B,) the last response token (masks are prefixes)
    rewards = rewards.scatter_add(1, last[:, None], scores.to(rewards.dtype)[:, None])
    return torch.where(mask.bool(), rewards, torch.zeros_like(rewards))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens, vectorised. (B, T) each ->
    (advantages, returns), zero on padding. The value after the last token is 0 (episode ends).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = sum_{j >= t} (gamma * lam)^(j - t) * delta_j;  R_t = A_t + V_t

    Naive version (the test oracle):
        for b in range(B):
            a = 0.0
            for t in reversed(range(n_b)):          # n_b = mask[b].sum()
                next_v = values[b, t + 1] if t + 1 < n_b else 0.0
                a = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * a
                advantages[b, t] = a
    """
    mask = mask.to(values.dtype)
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T); 0 past the end
    deltas = (rewards + gamma * next_values - values) * mask  # (B, T)
    T = rewards.shape[1]
    steps = torch.arange(T, device=rewards.device)
    gap = steps[:, None] - steps[None, :]  # (T, T): gap[j, t] = j - t
    # discount[j, t] = (gamma * lam)^(j - t) for j >= t, else 0, so A[:, t] = sum_j deltas[:, j] * discount[j, t]
    discount = torch.where(gap >= 0, (gamma * lam) ** gap.clamp(min=0).to(values.dtype), 0.0)  # (T, T)
    advantages = deltas @ discount  # (B, T)
    return advantages * mask, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total=lambda sums: sums) -> torch.Tensor:
    """(values - mean) / std over the masked entries of the whole batch; zero on padding.

    `total` sums a tensor over every process holding part of the batch (identity for one), so the
    moments are the global batch's: `p3o.utils.distributed.sum_across_processes`."""
    count = total(mask.sum().to(values.dtype))
    mean = total(masked_sum(values, mask)) / count.clamp(min=1)
    var = total(masked_sum((values - mean).pow(2), mask)) / count.clamp(min=1)
    return torch.where(mask.bool(), (values - mean) * torch.rsqrt(var + eps), torch.zeros_like(values))


@register_estimator("rloo")
def _rloo(rewards, kl, beta, rollout, cfg):
    return leave_one_out(rewards, kl, beta)


@register_estimator("grpo")
def _grpo(rewards, kl, beta, rollout, cfg):
    return group_normalised(rewards, kl, beta, scale=cfg.scale_rewards == "group")


@register_estimator("remax")
def _remax(rewards, kl, beta, rollout, cfg):
    return greedy_baseline(rewards, kl, rollout.baseline_rewards, rollout.baseline_kl.cpu(), beta)
