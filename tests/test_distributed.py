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
# Opt-in until understood: in 2 of 4 clean-clone CI runs, rank 0 of one torchrun aborted under gloo
# ("terminate called without an active exception", SIGABRT); the default suite must not flake.
pytestmark = pytest.mark.skipif(os.environ.get("P3O_DISTRIBUTED_TESTS") != "1",
                                reason="rank 0 sometimes aborts under gloo (issue 7); P3O_DISTRIBUTED_TESTS=1 runs them")


def torchrun(out: Path, processes: int, *args: str, fixed: bool = False) -> list[dict]:
    """ddp_worker.py on `processes` processes; `fixed`: sampling replaced by a fixed function."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(WORKER.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29500 + os.getpid() % 1000), str(WORKER), str(out),
               "fixed" if fixed else "sampled", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def run_args(assets, out: Path, algo: str, pairs: int, steps: int = 2) -> list[str]:
    return ["--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--output_dir", str(out / "run"), "--algo", algo,
            "--max_steps", str(steps), "--pairs_per_step", str(pairs), "--max_new_tokens", "6",
            "--learning_rate", "1e-2", "--seed", "0", "--disable_progress_bar"]


@pytest.mark.parametrize("algo", ["p3o-v2", "ppo"])
def test_two_processes_draw_different_prompts_and_keep_identical_weights(assets, tmp_path, algo):
    records = torchrun(tmp_path, 2, *run_args(assets, tmp_path, algo, pairs=8))
    assert [r["processes"] for r in records] == [2, 2]
    first, second = (set(i for step in r["prompts"] for i in step) for r in records)
    assert not first & second  # each process its own prompts
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    initial = load_file(str(assets["llama"] / "model.safetensors"))
    policy = {k.removeprefix("policy."): v for k, v in weights[0].items()}  # PPO: the trunk beside its value head
    assert initial.keys() <= policy.keys() and any(not torch.equal(policy[k], initial[k]) for k in initial)  # trained
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), f"{name} differs between the processes"


@pytest.mark.parametrize("algo,aggregation", [("p3o-v1", "group-mean"), ("p3o-v1", "token-mean"),
                                               ("rloo", "group-mean")])
def test_one_update_on_two_processes_equals_one_process_with_the_same_global_batch(assets, tmp_path, algo,
                                                                                   aggregation):
    """The same rollouts (sampling replaced by a fixed function of the prompt): 2 processes of 4
    prompts and 1 process of 8 take the same first gradient."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    extra = ["--epochs", "1", "--loss_aggregation", aggregation]
    single_run = torchrun(one, 1, *run_args(assets, one, algo, pairs=8, steps=1), *extra, "--minibatch_pairs", "8",
                          fixed=True)
    records = torchrun(two, 2, *run_args(assets, two, algo, pairs=8, steps=1), *extra, "--minibatch_pairs", "8",
                       fixed=True)
    assert sorted(records[0]["prompts"][0] + records[1]["prompts"][0]) == sorted(single_run[0]["prompts"][0])
    assert records[0]["local_tokens"] != records[1]["local_tokens"]  # token counts differ between the processes
    single = load_file(str(one / "grad0.safetensors"))
    assert any(g.abs().max() > 1e-6 for g in single.values())
    for rank in range(2):
        split = load_file(str(two / f"grad{rank}.safetensors"))
        assert split.keys() == single.keys()
        for name in single:
            assert torch.allclose(split[name], single[name], atol=1e-7, rtol=1e-4), f"rank {rank}: {name}"
