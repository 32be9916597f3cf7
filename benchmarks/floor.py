"""How close is a p3o step to its floor? Runs P3O steps (one pass over each rollout, as in the TRL
comparison) and, on each step's own rollout in the same process, times each necessary part alone:
generation, scoring, the reference forward, the training forward and backward, the optimiser step.
Prints the medians, the engine's own phase breakdown (as logged in metrics.jsonl) and the ratio
step / sum of parts (target: at most 1.15).

    python benchmarks/floor.py [--size 1m] [--pairs 16] [--new_tokens 32] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import build_assets  # noqa: E402

PARTS = ("generate", "score", "reference", "train_forward_backward", "optimizer_step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1m")
    p.add_argument("--algo", default="p3o-v1")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="Measured steps (after one warm-up step).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--separate_old_pass", action="store_true",
                   help="Run the no-grad pass for pi_old even when the training forward could give it (to measure the saving).")
    p.add_argument("--json", help="Also write the result here.")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More TrainConfig flags, e.g. --use_peft.")
    return p.parse_args(argv)


def build(args, workdir: str):
    from p3o.cli.args import config_from_argv
    from p3o.rl.config import TrainConfig
    from p3o.rl.train import build_trainer

    assets = build_assets(args.size)
    argv = ["--model_name_or_path", assets["policy"], "--dataset", assets["prompts"], "--output_dir", workdir,
            "--algo", args.algo, "--reward_fn", f"{Path(__file__).parent / 'task.py'}:reward_fn",
            "--max_steps", "1000", "--pairs_per_step", str(args.pairs), "--minibatch_pairs", str(args.pairs),
            "--epochs", "1", "--gradient_accumulation_steps", str(args.grad_accum),
            "--max_new_tokens", str(args.new_tokens), "--learning_rate", "1e-4", "--seed", "0", *args.extra]
    return build_trainer(config_from_argv(TrainConfig, argv + ["--disable_progress_bar"])), assets


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def parts_alone(trainer, rollout, texts, step: int) -> dict[str, float]:
    """Each necessary part of `step`, run alone on that step's rollout, as the engine runs it (under
    its autocast and checkpointing; a pair's prompt once, when the engine does so)."""
    import torch

    from p3o.rl.engine import training_mode
    from p3o.rl.rollout import batched_logprobs_and_values, token_logprobs_and_values

    seq, cfg = rollout, trainer.cfg
    batch = trainer.sizes.micro_groups * trainer.sizes.num_generations
    keys = ("query_ids", "query_mask", "response_ids", "response_mask")

    def train_forward_backward():
        with training_mode(trainer.policy, cfg.gradient_checkpointing), trainer.accelerator.autocast():
            forward_backward()

    def reference():
        with torch.no_grad(), trainer.accelerator.autocast():
            batched_logprobs_and_values(trainer.ref_policy, seq, cfg.temperature, batch, trainer.logits_to_keep,
                                        prompt_group=trainer.packed_group(seq))

    def forward_backward():
        for part in rollout.split(trainer.sizes.micro_groups):
            logps, _ = token_logprobs_and_values(trainer.policy, *(getattr(part, k) for k in keys), cfg.temperature,
                                                 trainer.logits_to_keep, prompt_group=trainer.packed_group(seq))
            (logps.sum() / rollout.num_groups).backward()

    def optimizer_step():
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    prompts = [p for p in texts.prompts for _ in range(rollout.num_generations)]
    return {
        "generate": timed(lambda: trainer.generate(seq.query_ids, seq.query_mask, trainer.gen_config,
                                                   "floor", step)),
        "score": timed(lambda: trainer.reward(prompts, texts.completions)),
        "reference": timed(reference),
        "train_forward_backward": timed(train_forward_backward),
        "optimizer_step": timed(optimizer_step),
    }


def measure(args) -> dict:
    """Median seconds of a step, of each part alone and of each engine phase, over `args.steps`
    steps after one warm-up step; also the parameter count and whether the old pass was fused."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        trainer, assets = build(args, workdir)
        trainer.fuse_old_pass = trainer.fuse_old_pass and not args.separate_old_pass
        steps, parts, phases = [], {p: [] for p in PARTS}, {}
        for step in range(args.steps + 1):
            start = time.perf_counter()
            rollout, texts, timings = trainer.collect_rollout(step)
            t0 = time.perf_counter()
            trainer.update(rollout, step)
            timings["time_update"] = time.perf_counter() - t0
            total = time.perf_counter() - start
            alone = parts_alone(trainer, rollout, texts, step)
            if step == 0:
                continue  # warm-up
            steps.append(total)
            for name, seconds in alone.items():
                parts[name].append(seconds)
            for name, seconds in timings.items():
                phases.setdefault(name, []).append(seconds)
    median = statistics.median
    return {"params": assets["policy_params"], "fused_old_pass": trainer.fuse_old_pass, "step": median(steps),
            "parts": {n: median(v) for n, v in parts.items()}, "phases": {n: median(v) for n, v in phases.items()}}


def main(argv=None) -> None:
    args = parse_args(argv)
    result = measure(args)
    floor = sum(result["parts"].values())
    print(f"{args.algo} on the {args.size} model ({result['params']:,} parameters): {args.pairs} pairs x "
          f"{args.new_tokens} new tokens per step, {args.steps} steps, torch threads {args.threads}; "
          f"fused old pass: {result['fused_old_pass']}")
    print(f"{'step (median)':<30}{result['step']:8.3f} s")
    for name, seconds in result["parts"].items():
        print(f"  {name + ' alone':<28}{seconds:8.3f} s")
    print(f"{'sum of the parts':<30}{floor:8.3f} s")
    print(f"step / sum of parts: {result['step'] / floor:.3f}  (target <= 1.15)")
    print("engine phases (metrics.jsonl): " + ", ".join(f"{n} {v:.3f} s" for n, v in result["phases"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
