"""examples/custom_algorithm.py: an algorithm registered from outside the package runs on the engine."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import yaml


def load_example():
    path = Path(__file__).parent.parent / "examples" / "custom_algorithm.py"
    spec = importlib.util.spec_from_file_location("custom_algorithm_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_algorithm_registered_from_outside_trains_on_the_engine(tmp_path):
    from p3o.rl.algorithms import get_algorithm

    example = load_example()
    load_example()  # importing it twice must not register it twice
    assert get_algorithm("reinforce-mean") is example.REINFORCE
    history = example.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "30"])
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["algo"] == "reinforce-mean"
    assert len(history) == 30 and all("advantage_abs" in m for m in history)  # its prepare ran every step
    first, last = (sum(m["reward"] for m in part) / 10 for part in (history[:10], history[-10:]))
    assert last > first + 0.15, (first, last)  # it learns the fruit reward (0.68 -> 0.98 when written)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_its_advantages_are_centred_per_group_and_blind_to_a_reward_shift():
    from p3o.rl.rollout import Rollout

    example = load_example()
    g = torch.Generator().manual_seed(0)
    rewards, kl = torch.rand(12, generator=g).double(), torch.randn(12, generator=g)
    shifted = rewards + torch.arange(3).double().repeat_interleave(4) * 1e3  # a different shift per prompt
    prepared = [example.group_mean_advantages(Rollout(4, rewards=r, kl=kl), None, 0.1) for r in (rewards, shifted)]
    advantages = prepared[0].fields["advantages"]
    assert torch.allclose(advantages.view(3, 4).sum(-1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(prepared[1].fields["advantages"], advantages, atol=1e-5)
