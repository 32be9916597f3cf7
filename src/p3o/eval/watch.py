"""Over-optimisation watch: the proxy reward keeps rising while the gold reward falls (Gao et al. 2022).

Training optimises a proxy (a reward model); where a gold reward exists (the embedded tasks' hidden
labeller, or any `--monitor_reward_fn`) the two can part ways. The watch compares the means of the
last `window` observations with the `window` before them and fires when the proxy rose and the gold
fell, each by more than `z` standard errors of the difference, so per-step noise alone rarely trips it.
"""
from __future__ import annotations

import math


class OverOptimisationWatch:
    def __init__(self, window: int = 10, z: float = 2.0):
        self.window, self.z = window, z
        self.proxy: list[float] = []
        self.gold: list[float] = []
        self.firing = False

    def update(self, proxy: float, gold: float) -> str | None:
        """Record one observation; a warning the first time the divergence shows (re-armed once it clears)."""
        self.proxy.append(proxy)
        self.gold.append(gold)
        if len(self.proxy) < 2 * self.window:
            return None
        proxy_change, proxy_noise = _change(self.proxy, self.window)
        gold_change, gold_noise = _change(self.gold, self.window)
        diverging = proxy_change > self.z * proxy_noise and -gold_change > self.z * gold_noise
        warn = diverging and not self.firing
        self.firing = diverging
        if warn:
            return (f"over-optimisation: over the last {self.window} observations the proxy reward rose by "
                    f"{proxy_change:+.4f} while the gold reward fell by {gold_change:+.4f}; the policy is exploiting "
                    "the reward model. Consider an earlier checkpoint, a larger --beta or a lower learning rate")
        return None


def _change(values: list[float], window: int) -> tuple[float, float]:
    """(mean of the last window - mean of the window before, standard error of that difference)."""
    recent, before = values[-window:], values[-2 * window:-window]
    noise = math.sqrt(_var(recent) / window + _var(before) / window)
    return sum(recent) / window - sum(before) / window, noise


def _var(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)


def eval_points_diverge(previous: dict, current: dict, z: float = 2.0) -> bool:
    """Between two held-out evaluations (each with `reward`, `monitor_reward` and their `*_stderr`):
    did the proxy rise and the gold fall, each by more than `z` standard errors of the change?"""
    proxy = current["reward"] - previous["reward"]
    gold = current["monitor_reward"] - previous["monitor_reward"]
    proxy_noise = math.hypot(current["reward_stderr"], previous["reward_stderr"])
    gold_noise = math.hypot(current["monitor_reward_stderr"], previous["monitor_reward_stderr"])
    return proxy > z * proxy_noise and -gold > z * gold_noise
