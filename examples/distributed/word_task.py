"""Two processes under torchrun against one, on the held-out sky-word task of examples/baselines.

The same `p3o train` command (the same global --pairs_per_step, so the same experiment) runs once
in one process and once as two under `torchrun --standalone --nproc_per_node 2` on CPU (gloo), over
seeds. Each run's held-out evaluation (128 prompts no run trained on, at the start and the end)
gives the sky words per response and the KL to the start, with standard errors. One run's end score
varies by about 0.85 from seed to seed, and a seed does not pair the two runs (they sample with
different streams), so telling them apart needs dozens of seeds: the table in docs/distributed.md used
`--seeds 0,1,...,48` (about 16 s a seed on 2 cores). The last line is the paired difference.

    python examples/distributed/word_task.py [--out runs/distributed] [--steps 30] [--seeds 0,1,2] [--extra FLAGS]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def load_baselines():
    """build_task from examples/baselines/compare.py: the task, the model and the reward."""
    path = Path(__file__).resolve().parent.parent / "baselines" / "compare.py"
    spec = importlib.util.spec_from_file_location("baselines_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(task: dict, out: Path, processes: int, seed: int, steps: int, extra: list[str]) -> tuple[dict, dict, float]:
    args = ["train", "--algo", "p3o-v1", "--model_name_or_path", str(task["model"]), "--dataset", str(task["train"]),
            "--reward_fn", f"{task['reward']}:sky", "--eval_dataset", str(task["held_out"]), "--output_dir", str(out),
            "--max_steps", str(steps), "--pairs_per_step", "32", "--max_new_tokens", "8", "--learning_rate", "1e-3",
            "--seed", str(seed), "--disable_progress_bar", *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(2 // processes)}
    start = time.perf_counter()
    subprocess.run([*launcher, "-m", "p3o", *args], env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    lines = (out / "eval.jsonl").read_text().splitlines()  # the start and the end
    return json.loads(lines[0]), json.loads(lines[-1]), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/distributed")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More `p3o train` flags for every run.")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    task = load_baselines().build_task(root)
    print("| processes | seed | held-out sky words (start -> end) | KL to start (nats) | wall time (s) |")
    print("|---|---|---|---|---|")
    ends = {1: [], 2: []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for processes in (1, 2):
            first, last, seconds = run(task, root / f"p{processes}-seed{seed}", processes, seed, args.steps, args.extra)
            ends[processes].append(last["reward"])
            print(f"| {processes} | {seed} | {first['reward']:.2f} ± {first['reward_stderr']:.2f} -> "
                  f"{last['reward']:.2f} ± {last['reward_stderr']:.2f} | {last['kl']:.2f} ± {last['kl_stderr']:.2f} | "
                  f"{seconds:.0f} |", flush=True)
    for processes, values in ends.items():
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
        print(f"{processes} process(es): mean end {mean:.2f} (seed-to-seed std {spread:.2f})")
    gaps = [two - one for one, two in zip(ends[1], ends[2])]
    mean = sum(gaps) / len(gaps)
    error = math.sqrt(sum((g - mean) ** 2 for g in gaps) / max(1, len(gaps) - 1) / len(gaps))
    print(f"2 - 1 processes: {mean:+.2f} ± {error:.2f} (2 higher in {sum(g > 0 for g in gaps)} of {len(gaps)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
