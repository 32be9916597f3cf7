"""Every algorithm on one small word task that no test or default was tuned on, judged on held-out prompts.

A random 2-layer Llama over a 300-word random vocabulary learns to say three sky words (sun, moon,
star), which it almost never says at the start. Each sampling algorithm trains on that reward;
offline DPO trains on preference pairs whose chosen side has sky words. Every policy is then judged
on 128 prompts none of them trained on (reward and KL to the start, with standard errors). Then the
same runs are repeated with a huge per-prompt shift added to the reward: comparative algorithms
must end bit-identical, PPO must not.

    python examples/baselines/compare.py [--out runs/baselines] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import string
import sys
import time
from pathlib import Path

import torch

SKY = ["sun", "moon", "star"]
REWARD = '''
SKY = {"sun", "moon", "star"}

def sky(prompts, completions, **kwargs):
    return [float(sum(w in SKY for w in c.split())) for c in completions]

def shifted_sky(prompts, completions, **kwargs):
    return [r + 1e12 * (len(p) % 5) - 2e12 for r, p in zip(sky(prompts, completions), prompts)]
'''


def random_words(n: int, rng: random.Random) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))))
    return sorted(words - set(SKY))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_task(root: Path, seed: int = 7) -> dict:
    from p3o.models.tiny import build_tiny_model, build_word_tokenizer

    rng = random.Random(seed)
    vocab = random_words(300, rng)
    tokenizer = build_word_tokenizer(vocab + SKY)
    build_tiny_model(tokenizer, "llama", num_layers=2, hidden_size=32, num_heads=2, max_positions=128,
                     seed=seed).save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")

    def prompt():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 8)))

    train = [{"prompt": prompt()} for _ in range(256)]
    held_out = [{"prompt": prompt()} for _ in range(128)]
    pairs = []
    for row in train:
        plain = [rng.choice(vocab) for _ in range(8)]
        sky = [rng.choice(SKY) if i % 3 == 1 else w for i, w in enumerate(plain)]
        pairs.append({"prompt": row["prompt"], "chosen": " " + " ".join(sky), "rejected": " " + " ".join(plain)})
    (root / "reward.py").write_text(REWARD)
    return {"model": root / "init", "train": write_jsonl(root / "prompts.jsonl", train),
            "held_out": write_jsonl(root / "held_out.jsonl", held_out),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs), "reward": root / "reward.py"}


def train(task: dict, algo: str, out: Path, steps: int, reward: str = "sky"):
    from p3o.rl.config import TrainConfig
    from p3o.rl.train import build_trainer

    common = dict(model_name_or_path=str(task["model"]), output_dir=str(out), algo=algo, seed=0,
                  max_steps=steps, pairs_per_step=32, max_new_tokens=8, learning_rate=1e-3,
                  disable_progress_bar=True)
    if algo == "dpo":
        cfg = TrainConfig(dataset=str(task["pairs"]), **{**common, "max_new_tokens": 9})
    else:
        cfg = TrainConfig(dataset=str(task["train"]), reward_fn=f"{task['reward']}:{reward}", **common)
    trainer = build_trainer(cfg)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def judge(task: dict, trainer) -> dict:
    from p3o.data.prompts import load_prompts
    from p3o.eval.policy import evaluate_policy
    from p3o.reward import build_reward

    prompts = load_prompts(str(task["held_out"]), trainer.tokenizer)
    return evaluate_policy(trainer.unwrapped_policy, trainer.ref_policy, trainer.tokenizer, prompts,
                           {"sky": build_reward(f"{task['reward']}:sky", None)}, max_new_tokens=8, seed=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/baselines")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.set_num_threads(2)
    task = build_task(root)
    algos = ["p3o-v1", "p3o-v2", "ppo", "rloo", "grpo", "remax", "online-dpo", "dpo"]
    print("| algorithm | held-out sky words per response (start -> end) | KL to start (nats) | train time (s) |")
    print("|---|---|---|---|")
    weights = {}
    for algo in algos:
        trainer, seconds = train(task, algo, root / algo, args.steps)
        before = judge(task, type("Start", (), {"unwrapped_policy": trainer.ref_policy, "ref_policy": trainer.ref_policy,
                                                "tokenizer": trainer.tokenizer})())
        after = judge(task, trainer)
        weights[algo] = {k: v.clone() for k, v in trainer.unwrapped_policy.state_dict().items()}
        print(f"| {algo} | {before['sky']:.2f} ± {before['sky_stderr']:.2f} -> {after['sky']:.2f} ± "
              f"{after['sky_stderr']:.2f} | {after['kl']:.2f} ± {after['kl_stderr']:.2f} | {seconds:.1f} |", flush=True)
    print("\nper-prompt reward shift of up to 2e12 (same seed, same steps):")
    for algo in ("p3o-v1", "p3o-v2", "rloo", "grpo", "remax", "online-dpo", "ppo"):
        shifted, _ = train(task, algo, root / f"{algo}-shifted", args.steps, reward="shifted_sky")
        same = all(torch.equal(weights[algo][k], v) for k, v in shifted.unwrapped_policy.state_dict().items())
        print(f"  {algo}: weights {'bit-identical' if same else 'differ'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
