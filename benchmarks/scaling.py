"""How a p3o step grows with pairs per step, new tokens and model size, and where the time goes;
and what the levers cost or save (the fused old pass, LoRA, gradient checkpointing, bf16).

Each configuration runs `benchmarks/floor.py` in its own process (median of --steps steps after a
warm-up), so its peak resident memory (ru_maxrss, from os.wait4) is that configuration's alone.

    python benchmarks/scaling.py [--steps 5] [--out runs/bench/scaling.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = {"size": "1m", "pairs": 16, "new_tokens": 32}
TABLES = {
    "pairs per step (1m, 32 new tokens)": [{"pairs": g} for g in (8, 16, 32, 64)],
    "new tokens (1m, 16 pairs)": [{"new_tokens": t} for t in (16, 32, 64)],
    "model size (16 pairs, 32 new tokens)": [{"size": s} for s in ("1m", "10m", "40m")],
    "levers (10m, 16 pairs, 32 new tokens)": [
        {"size": "10m", "label": "p3o-v1, one pass: old log-probs from the training forward"},
        {"size": "10m", "label": "the same with a separate no-grad old pass", "flags": ["--separate_old_pass"]},
        {"size": "10m", "label": "LoRA r=16 (--use_peft): reference = adapters off", "extra": ["--use_peft"]},
        {"size": "10m", "label": "--gradient_checkpointing", "extra": ["--gradient_checkpointing"]},
        {"size": "10m", "label": "--mixed_precision bf16 (autocast)", "extra": ["--mixed_precision", "bf16"]},
    ],
    "memory levers": [
        {"size": "40m", "pairs": 4, "new_tokens": 16, "label": "40m, 4 pairs x 16 tokens, full fine-tune"},
        {"size": "40m", "pairs": 4, "new_tokens": 16, "label": "40m, 4 pairs x 16 tokens, LoRA r=16",
         "extra": ["--use_peft"]},
        {"size": "40m", "label": "40m, 16 pairs x 32 tokens, full fine-tune"},
        {"size": "40m", "label": "40m, 16 pairs x 32 tokens, LoRA r=16", "extra": ["--use_peft"]},
        {"size": "10m", "pairs": 64, "new_tokens": 64, "label": "10m, 64 pairs x 64 tokens"},
        {"size": "10m", "pairs": 64, "new_tokens": 64, "label": "10m, 64 pairs x 64 tokens, --gradient_checkpointing",
         "extra": ["--gradient_checkpointing"]},
    ],
}
PHASES = ("time_generate", "time_score", "time_old_logprobs", "time_reference", "time_update")


def run(config: dict, steps: int) -> dict:
    """floor.py for one configuration in a fresh process: its result and peak RSS in MiB."""
    settings = {**BASE, **{k: v for k, v in config.items() if k in BASE}}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [sys.executable, str(HERE / "floor.py"), "--steps", str(steps), "--json", out.name,
                *[f"--{k}={v}" for k, v in settings.items()], *config.get("flags", [])]
        if config.get("extra"):
            argv += ["--extra", *config["extra"]]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{process.stderr.read()[-2000:]}")
        return {**settings, **json.loads(Path(out.name).read_text()), "rss_mib": usage.ru_maxrss / 1024}


def row(label: str, r: dict) -> str:
    phases = r["phases"]
    shares = " / ".join(f"{100 * phases.get(p, 0.0) / r['step']:.0f}" for p in PHASES)
    return (f"| {label} | {r['params'] / 1e6:.1f}M | {r['step']:.3f} | {r['pairs'] / r['step']:.1f} | {shares} | "
            f"{r['step'] / sum(r['parts'].values()):.2f} | {r['rss_mib']:.0f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(HERE.parent / "runs" / "bench" / "scaling.md"))
    args = p.parse_args(argv)
    lines = []
    for title, configs in TABLES.items():
        lines += [f"\n**{title}**\n",
                  "| configuration | params | s/step | pairs/s | % generate / score / old pass / reference / update "
                  "| step / sum of parts | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
        for config in configs:
            result = run(config, args.steps)
            label = config.get("label") or ", ".join(f"{k} {config[k]}" for k in BASE if k in config)
            lines.append(row(label, result))
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
