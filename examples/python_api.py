"""The Python API in one script, notebook style: P3O-V2 from a `datasets.Dataset`, two weighted
reward functions, and a callback that stops early. Runs offline on a tiny model built here; put a
real model's hub name or path in MODEL to train it instead.

    python examples/python_api.py [--output_dir runs/python_api]
"""
from __future__ import annotations

import argparse
import random

import datasets
from transformers import TrainerCallback

from p3o import P3OConfig, P3OTrainer
from p3o.models.tiny import build_tiny_model, build_word_tokenizer

# --- a tiny policy, so the script runs anywhere in seconds (MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct" works too)
WORDS = "the a cat dog bird sees likes finds big small apple pear plum story : .".split()
tokenizer = build_word_tokenizer(WORDS)
MODEL = build_tiny_model(tokenizer, "llama", num_layers=2, hidden_size=32, num_heads=2, max_positions=128)

# --- data: any datasets.Dataset (or a list of dicts) with a `prompt` column; other columns reach the rewards
rng = random.Random(0)
rows = [{"prompt": f"story : the {rng.choice(['big', 'small'])} {rng.choice(['cat', 'dog', 'bird'])} sees",
         "wanted": rng.choice(["apple", "pear", "plum"])} for _ in range(64)]
dataset = datasets.Dataset.from_list(rows)


# --- rewards: plain functions fn(prompts, completions, **columns) -> one float per completion
def mentions_the_wanted_fruit(prompts, completions, wanted, **kwargs):
    return [float(w in c.split()) for c, w in zip(completions, wanted)]


def brevity(prompts, completions, **kwargs):
    return [-len(c.split()) / 8 for c in completions]


# --- a callback: any transformers.TrainerCallback works; this one stops once the fruit reward is high
class StopWhenGood(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        print(f"step {state.global_step}: reward {logs['reward']:+.3f} "
              f"(fruit {logs['reward/mentions_the_wanted_fruit']:.2f}, brevity {logs['reward/brevity']:+.2f})")
        if logs["reward/mentions_the_wanted_fruit"] >= 0.5:
            control.should_training_stop = True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="runs/python_api")
    parser.add_argument("--max_steps", type=int, default=40)
    cli = parser.parse_args(argv)
    args = P3OConfig(output_dir=cli.output_dir, overwrite=True, algo="p3o-v2", max_steps=cli.max_steps,
                     pairs_per_step=16, max_new_tokens=6, learning_rate=2e-3, beta=0.05,
                     reward_weights=[1.0, 0.25], disable_progress_bar=True, seed=0)
    trainer = P3OTrainer(MODEL, [mentions_the_wanted_fruit, brevity], args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[StopWhenGood()])
    metrics = trainer.train()  # the run directory: config.yaml, metrics.jsonl, completions.jsonl, the model
    print(f"stopped after step {metrics['step']} of {args.max_steps}; policy saved to {args.output_dir}")
    return metrics


if __name__ == "__main__":
    main()
