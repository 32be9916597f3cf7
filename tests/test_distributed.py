"""Several processes on CPU (gloo) under torchrun: prompts are sharded, gradients synchronised."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(out: Path, processes: int, *args: str) -> list[dict]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29500 + os.getpid() % 1000), str(WORKER), str(out), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.parametrize("algo", ["p3o-v2", "ppo"])
def test_two_processes_draw_different_prompts_and_keep_identical_weights(assets, tmp_path, algo):
    records = torchrun(tmp_path, 2, "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
                       "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(tmp_path / "run"),
                       "--algo", algo, "--max_steps", "2", "--pairs_per_step", "4", "--max_new_tokens", "6",
                       "--learning_rate", "1e-2", "--seed", "0", "--disable_progress_bar")
    assert [r["processes"] for r in records] == [2, 2]
    first, second = (set(i for step in r["prompts"] for i in step) for r in records)
    assert not first & second  # each process its own prompts
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    initial = load_file(str(assets["llama"] / "model.safetensors"))
    policy = {k.removeprefix("policy."): v for k, v in weights[0].items()}  # PPO: the trunk beside its value head
    assert initial.keys() <= policy.keys() and any(not torch.equal(policy[k], initial[k]) for k in initial)  # trained
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), f"{name} differs between the processes"
