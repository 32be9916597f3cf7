"""Adding an algorithm to p3o: one file, one registration, from outside the package.

The algorithm here is REINFORCE with the group-mean baseline (k responses per prompt, no importance
ratio, no clipping, one pass per rollout):

    A_i  = s_i - mean_j s_j,   s_i = r_i - beta * kl_i        (per response, within its prompt's group)
    loss = -1/k * sum_i A_i * l_theta(y_i)                    (per group; the engine averages over groups)

An algorithm is two functions over the engine's typed contract (`p3o.rl.rollout.Rollout`):

- `prepare(rollout, cfg, beta) -> Prepared`: runs once per rollout, after sampling and scoring, and
  returns Rollout fields by name (here `advantages`, (B,)) and statistics to log;
- `loss(batch, out, cfg) -> (per-group losses (G',), stats)`: runs on every micro-batch of whole
  groups; `out.token_logps` (b, T) carries the gradient.

Everything else (sampling, rewards, the reference and the KL, micro-batching, gradient accumulation,
several processes, LoRA, checkpoints, resume, logging) is the engine's. Run it:

    python examples/custom_algorithm.py [--output_dir runs/custom_algorithm]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import datasets
import torch

from p3o import P3OConfig, P3OTrainer
from p3o.models.tiny import build_tiny_model, build_word_tokenizer
from p3o.rl.algorithms import ALGORITHMS, Algorithm, Prepared, per_group, register_algorithm, sequence_logps
from p3o.rl.rollout import PolicyOutputs, Rollout


# --- the algorithm ---------------------------------------------------------------------------------

def group_mean_advantages(rollout: Rollout, cfg, beta: float) -> Prepared:
    k = rollout.num_generations
    rewards = rollout.rewards.view(-1, k)  # (G, k) float64, raw
    kl = rollout.kl.view(-1, k).cpu()  # (G, k) l_old(y) - l_ref(y)
    # Differences first, in float64, so a per-prompt reward shift cancels exactly.
    centred = (rewards - rewards.mean(-1, keepdim=True)).to(kl.dtype)  # (G, k)
    advantages = centred - beta * (kl - kl.mean(-1, keepdim=True))  # (G, k)
    advantages = advantages.flatten().to(rollout.kl.device)  # (B,)
    return Prepared({"advantages": advantages}, {"advantage_abs": advantages.abs().mean().item()})


def reinforce_loss(batch: Rollout, out: PolicyOutputs, cfg):
    logp = sequence_logps(batch, out)  # (b,) with gradient
    losses = -batch.advantages * logp  # (b,)
    return per_group(losses, batch.num_generations), {}  # (g,)


REINFORCE = Algorithm(
    "reinforce-mean", group_mean_advantages, reinforce_loss,
    samples=(2, None),  # at least 2 responses per prompt (a baseline needs a second one)
    defaults={"num_generations": 4, "epochs": 1},  # on-policy: one pass, no ratio needed
)
if REINFORCE.name not in ALGORITHMS:  # registering twice is an error (a re-imported script)
    register_algorithm(REINFORCE)


# --- a run with it, offline on a tiny policy (put a real model's name or path in MODEL) ----------------

WORDS = "the a cat dog bird sees likes finds big small apple pear plum story : .".split()


def wants_a_fruit(prompts, completions, **kwargs):
    fruit = {"apple", "pear", "plum"}
    return [float(bool(fruit & set(c.split()))) for c in completions]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/custom_algorithm")
    parser.add_argument("--max_steps", type=int, default=30)
    cli = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_model(tokenizer, "llama", num_layers=2, hidden_size=32, num_heads=2, max_positions=128)
    rng = random.Random(0)
    prompts = [{"prompt": f"story : the {rng.choice(['big', 'small'])} {rng.choice(['cat', 'dog'])} sees"}
               for _ in range(64)]
    args = P3OConfig(output_dir=cli.output_dir, overwrite=True, algo="reinforce-mean", max_steps=cli.max_steps,
                     pairs_per_step=8, max_new_tokens=6, learning_rate=3e-3, beta=0.02,
                     disable_progress_bar=True, seed=0)
    trainer = P3OTrainer(model, wants_a_fruit, args=args, train_dataset=datasets.Dataset.from_list(prompts),
                         processing_class=tokenizer)
    trainer.train()
    history = [json.loads(line) for line in (Path(cli.output_dir) / "metrics.jsonl").read_text().splitlines()]
    first, last = history[: len(history) // 3], history[-len(history) // 3:]
    print(f"reinforce-mean: reward {sum(m['reward'] for m in first) / len(first):.3f} in the first third of the "
          f"steps, {sum(m['reward'] for m in last) / len(last):.3f} in the last")
    return history


if __name__ == "__main__":
    main()
