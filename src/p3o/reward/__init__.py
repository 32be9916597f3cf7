"""Rewards for the RL stage: a Python function or a sequence-classification reward model.

Both are wrapped as a `RewardSource`: called with B prompts and B completions, it returns a float64
tensor (B,) of raw rewards, after checking the count and finiteness. Raw rewards are never
normalised or clipped here (docs/p3o.md section 2).
"""
from __future__ import annotations

from p3o.reward.functions import RewardFunction, load_reward_function
from p3o.reward.model import RewardModelScorer


def build_reward(reward_fn: str | None, reward_model: str | None, trust_remote_code: bool = False,
                 batch_size: int = 64, device=None):
    if reward_fn is not None:
        return RewardFunction(load_reward_function(reward_fn), reward_fn)
    return RewardModelScorer.load(reward_model, trust_remote_code=trust_remote_code, batch_size=batch_size,
                                  device=device)


__all__ = ["build_reward", "RewardFunction", "RewardModelScorer", "load_reward_function"]
