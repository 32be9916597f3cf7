"""Over-optimisation watch: the proxy reward keeps rising while the gold reward falls (Gao et al. 2022).

Training optimises a proxy (a reward model); where a gold reward exists (the embedded tasks' hidden
labeller, or any `--monitor_reward_fn`) the two can part ways. The watch works on blocks: per-step
values are averaged over non-overlapping windows of `window` steps (held-out evaluations are blocks
already, with their standard errors). It remembers the block where the gold reward peaked and fires
when, for `patience` blocks in a row, the gold reward sits below that peak and the proxy above its
value there, each by more than `z` standard errors of the difference. Comparing with the peak
catches a slow, steady decline; the persistence and z = 3 keep noise from tripping it (a rising
proxy with a flat, noisy gold reward should not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    proxy: float
    proxy_se: float
    gold: float
    gold_se: float


class OverOptimisationWatch:
    def __init__(self, window: int = 10, z: float = 3.0, patience: int = 3):
        self.window, self.z, self.patience = window, z, patience
        self.pending: list[tuple[float, float]] = []
        self.peak: Block | None = None
        self.streak = 0
        self.warned = False

    def update(self, proxy: float, gold: float) -> str | None:
        """Record one step's (proxy, gold); a warning the first time the divergence persists."""
        self.pending.append((proxy, gold))
        if len(self.pending) < self.window:
            return None
        proxies, golds = zip(*self.pending)
        self.pending = []
        return self.update_block(Block(_mean(proxies), _stderr(proxies), _mean(golds), _stderr(golds)))

    def update_block(self, block: Block) -> str | None:
        """Record one block (or held-out evaluation) with its standard errors."""
        if self.peak is None or block.gold > self.peak.gold:
            self.peak, self.streak = block, 0
            return None
        peak = self.peak
        gold_drop = peak.gold - block.gold
        proxy_gain = block.proxy - peak.proxy
        diverging = (gold_drop > self.z * math.hypot(peak.gold_se, block.gold_se)
                     and proxy_gain > self.z * math.hypot(peak.proxy_se, block.proxy_se))
        self.streak = self.streak + 1 if diverging else 0
        if self.streak < self.patience or self.warned:
            return None
        self.warned = True
        return (f"over-optimisation: the proxy reward is {proxy_gain:+.4f} above its value where the gold reward "
                f"peaked, and the gold reward {gold_drop:.4f} below that peak, for {self.streak} checks in a row; the "
                "policy is exploiting the reward model. Consider an earlier checkpoint, a larger --beta or a lower "
                "learning rate")


def _mean(values) -> float:
    return sum(values) / len(values)


def _stderr(values) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1) / len(values))
