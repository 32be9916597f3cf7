"""The KL penalty coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019)."""
from __future__ import annotations


class KLController:
    """beta for the next rollout. Fixed when `target` is None; otherwise after each rollout

        error = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + error * n / horizon)

    with KL the rollout's mean sequence KL and n the responses it held.
    """

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, responses: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * responses / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
