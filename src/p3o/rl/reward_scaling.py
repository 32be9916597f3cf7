"""`--reward_normalization running_std`: the authors' reward processing (trlx's), as an option.

Raw rewards are clipped to +-`clip`, then divided by the standard deviation of every clipped reward
seen so far, this rollout's included, over all processes (left as they are while every reward so
far is equal: there is no spread to divide by). Off by default: a per-prompt shift still
cancels inside each group's differences, but it changes the running std, so the scale of every
update depends on the shift (docs/p3o.md section 8); clipping also cuts differences between large
rewards.
"""
from __future__ import annotations

import math

import torch

from p3o.utils.distributed import sum_across_processes


class RunningRewardScale:
    """Running count, mean and (population) variance of the clipped rewards, combined batch by batch
    (Chan et al.'s parallel update), and the unbiased std they give."""

    def __init__(self, clip: float):
        self.clip, self.count, self.mean, self.var = clip, 0.0, 0.0, 0.0

    @property
    def std(self) -> float:
        """The unbiased std of the rewards so far; 1 (no scaling) until they have spread: every reward
        equal would otherwise be divided by a std of 0 (or of rounding)."""
        std = math.sqrt(self.var * self.count / (self.count - 1)) if self.count >= 2 else 0.0
        return std if std > 1e-9 * max(1.0, abs(self.mean)) else 1.0

    def __call__(self, rewards: torch.Tensor, device=None) -> torch.Tensor:
        """(B,) raw float64 rewards -> clipped and divided by the running std (B,), after this batch.
        `device`: where the processes' collective runs (NCCL needs the GPU)."""
        self.update(rewards.clamp(-self.clip, self.clip), device)
        return self.scale(rewards)

    def scale(self, rewards: torch.Tensor) -> torch.Tensor:
        """Clipped and divided by the running std as it is, which this does not update (ReMax's greedy
        baseline is scaled as its rollout's samples were)."""
        return rewards.clamp(-self.clip, self.clip) / self.std

    def update(self, values: torch.Tensor, device=None) -> None:
        sums = torch.stack([torch.tensor(float(len(values)), dtype=torch.float64), values.sum()])
        n, total = sum_across_processes(sums.to(device)).tolist()  # the whole rollout's, on every process
        if n == 0:
            return
        mean = total / n
        # Centred before squaring (a second collective): sum(x^2)/n - mean^2 cancels to rounding noise,
        # which a constant reward would then be divided by.
        var = sum_across_processes((values - mean).pow(2).sum().reshape(1).to(device)).item() / n
        count = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta * delta * self.count * n / count) / count
        self.mean += delta * n / count
        self.count = count

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]
