"""One GPU check: P3O-V2 with LoRA in bf16 on SmolLM2-135M-Instruct for 10 steps, per backend (and on
transformers with --compile_sampling: a CUDA graph per decoded token, compiled in the first step, which
is excluded), and TRL's RLOO (k = 2) on transformers generation and with vLLM colocated, when TRL (and vLLM) are installed;
every run takes one optimiser step per rollout. Prints responses per second and peak GPU memory for
each (see gpu_check.sh, which runs it; results/gpu-h100-2026-12-06.md, its one run so far).

Each row runs in a process of its own, under its own time limit (`--row_seconds`, within the whole
check's `--budget_seconds`): an engine that keeps its memory or its process groups, or a crash, then
ends one row and not the rows after it. The vLLM rows, never run yet, go first. Peak memory is read
twice: torch's allocator (vLLM runs inside the row's process and allocates through it, its KV cache
budget, --vllm_gpu_memory_utilization 0.3 of the GPU, included) and the whole device's used memory,
polled (CUDA context, NCCL and cuBLAS workspaces too).

`--model DIR` is a plain checkpoint (`p3o fetch-model smollm2 --output_dir DIR`). A directory with
only config.json and the tokenizer files (what fits through a small transfer) gets random weights of
the real shapes, said in the output: the step then costs what the real model's does at the same
lengths, but responses rarely stop early, so they are longer than the real model's.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from run_one import LORA  # the adapters of the CPU benchmark's smollm2 pairings, on both sides here too


def checkpoint(model: str, out: Path) -> tuple[str, str]:
    """A loadable checkpoint: `model` itself, or random weights of its config's shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if any(Path(model).glob("*.safetensors")) or any(Path(model).glob("*.bin")):
        return model, "real weights"
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return str(out), "random weights, real shapes"


def prompts(path: Path, n: int = 256) -> Path:
    topics = ["the sea", "bread", "a bicycle", "winter", "music", "a garden", "coffee", "the moon"]
    rows = [{"prompt": [{"role": "user", "content": f"Write two sentences about {topics[i % len(topics)]}."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


REWARD = "def brevity(prompts, completions, **kw):\n    return [-len(c[0]['content']) / 100 for c in completions]\n"


def run_p3o(model: str, data: Path, rewards: Path, out: Path, backend: str, args, extra: tuple = ()) -> dict:
    import torch

    from p3o.cli import main

    argv = ["train", "--algo", "p3o-v2", "--model_name_or_path", model, "--dataset", str(data),
            "--reward_fn", f"{rewards}:brevity", "--output_dir", str(out), "--max_steps", str(args.steps),
            "--pairs_per_step", str(args.prompts), "--max_new_tokens", str(args.new_tokens),
            # one pass and one optimiser step per rollout: the work TRL's row does (num_iterations=1, one batch)
            "--epochs", "1", "--minibatch_pairs", str(args.prompts),
            "--use_peft", "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]),
            "--mixed_precision", "bf16", "--learning_rate", "1e-5", "--generation_backend", backend,
            "--disable_progress_bar", "--overwrite", "--debug", *extra]  # --debug: a failure shows its traceback
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        return {"error": f"exit {code}"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:] or lines  # the first step pays for warm-up
    mean = lambda key: sum(m.get(key, 0.0) for m in steady) / len(steady)  # noqa: E731
    phases = {k: mean(f"time_{k}") for k in ("generate", "reference", "update")}
    return {"responses_per_s": mean("responses_per_s"), "response_length": mean("response_length"), "wall_s": seconds,
            "phases": " / ".join(f"{k} {v:.2f}" for k, v in phases.items()) + " s"}


def run_trl_rloo(model: str, data: Path, args, use_vllm: bool = True) -> dict:
    """TRL's RLOOTrainer (k = 2, the same gradient as P3O-V1) with vLLM colocated: the same prompts,
    LoRA (`LORA`, every linear layer), bf16, responses and steps as the p3o runs."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    namespace: dict = {}
    exec(REWARD, namespace)  # the reward p3o gets as rewards.py:brevity

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *unused, **kw):
            self.ends.append(time.perf_counter())

    gpu = torch.cuda.is_available()
    config = RLOOConfig(output_dir=tempfile.mkdtemp(prefix="trl_"), use_cpu=not gpu, bf16=gpu, num_generations=2,
                        num_iterations=1, beta=0.05, per_device_train_batch_size=2 * args.prompts,
                        gradient_accumulation_steps=1, max_completion_length=args.new_tokens, temperature=1.0,
                        top_p=1.0, top_k=0, max_steps=args.steps, learning_rate=1e-5, lr_scheduler_type="constant",
                        gradient_checkpointing=False,
                        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                        use_vllm=use_vllm, **({"vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
                                              if use_vllm else {}))
    clock = StepClock()
    trainer = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"),
                          reward_funcs=[namespace["brevity"]], args=config,
                          train_dataset=load_dataset("json", data_files=str(data), split="train"),
                          processing_class=AutoTokenizer.from_pretrained(model), callbacks=[clock],
                          peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steady = [b - a for a, b in zip(clock.ends, clock.ends[1:])] or [seconds]  # the first step pays for warm-up
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"responses_per_s": 2 * args.prompts / (sum(steady) / len(steady)),
            "response_length": sum(lengths[1:] or lengths) / max(1, len(lengths[1:] or lengths)), "wall_s": seconds}


class DevicePeak:
    """The device's used memory (total - free), polled every 0.2 s on a thread while a row runs."""

    def __init__(self):
        import torch

        self.torch, self.peak, self.done = torch, 0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while not self.done.wait(0.2):
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**30


def rows(model: str, data: Path, rewards: Path, root: Path, args) -> list[tuple[str, str, str, object]]:
    """(key, title, why it cannot run or "", the run) for every row, in the order they run."""
    have = {name: importlib.util.find_spec(name) is not None for name in ("vllm", "trl")}
    return [("p3o_vllm", "p3o, vLLM", "" if have["vllm"] else "vLLM not installed",
             lambda: run_p3o(model, data, rewards, root / "vllm", "vllm", args)),
            ("trl_vllm", "TRL RLOO + vLLM colocate", "" if have["trl"] and have["vllm"] else "TRL or vLLM not installed",
             lambda: run_trl_rloo(model, data, args)),
            ("p3o_hf", "p3o, transformers generate", "",
             lambda: run_p3o(model, data, rewards, root / "transformers", "transformers", args)),
            ("p3o_compiled", "p3o, transformers generate, --compile_sampling (a CUDA graph per token)", "",
             lambda: run_p3o(model, data, rewards, root / "compiled", "transformers", args, ("--compile_sampling",))),
            ("trl_hf", "TRL RLOO, transformers generate", "" if have["trl"] else "TRL not installed",
             lambda: run_trl_rloo(model, data, args, use_vllm=False))]


def run_row(key: str, root: Path, args) -> int:
    """The child process of one row: runs it and writes its result to root/KEY.json."""
    import torch

    model, weights = json.loads((root / "model.json").read_text())
    run = next(r for k, _, _, r in rows(model, root / "prompts.jsonl", root / "rewards.py", root, args) if k == key)
    device = DevicePeak()
    try:
        result = run()
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    result.update(torch_peak_gib=torch.cuda.max_memory_allocated() / 2**30, device_peak_gib=device.stop())
    (root / f"{key}.json").write_text(json.dumps(result))
    return 0


def cells(r: dict) -> str:
    """One table row's cells for a row's result; a failure becomes its row (traceback on stderr)."""
    if "error" in r:
        return f"{r['error']} | | | | | |"
    return (f"{r['responses_per_s']:.1f} | {r['response_length']:.1f} | {r['torch_peak_gib']:.2f} | "
            f"{r['device_peak_gib']:.2f} | {r['wall_s']:.0f} | {r.get('phases', '')} |")


def child(key: str, root: Path, args, seconds: float) -> dict:
    """Row `key` in a process of its own, ended after `seconds`."""
    argv = [sys.executable, __file__, "--row", key, "--root", str(root), "--model", args.model, "--steps",
            str(args.steps), "--prompts", str(args.prompts), "--new_tokens", str(args.new_tokens)]
    try:
        code = subprocess.run(argv, timeout=seconds).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {seconds:.0f} s"}
    out = root / f"{key}.json"
    if code == 0 and out.exists():
        return json.loads(out.read_text())
    return {"error": f"the row's process ended with exit {code}"}


def installed(name: str) -> str:
    """A package's version, read without importing it (this process stays off the GPU: the rows' device
    memory is then theirs)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step (x2 responses)")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rows", default="p3o_vllm,trl_vllm,p3o_hf,p3o_compiled,trl_hf",
                        help="which rows, in this order")
    parser.add_argument("--row_seconds", type=float, default=150, help="each row's time limit")
    parser.add_argument("--budget_seconds", type=float, default=450, help="the whole check's; later rows get what is left")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run this one row (a child process)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return run_row(args.row, Path(args.root), args)
    import torch

    if not torch.cuda.is_available():
        print("no GPU: this check is for a GPU machine")
        return 1
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    model, weights = checkpoint(args.model, root / "model")
    (root / "model.json").write_text(json.dumps([model, weights]))
    prompts(root / "prompts.jsonl")
    (root / "rewards.py").write_text(REWARD)
    versions = ", ".join(f"{name} {installed(name)}" for name in ("transformers", "trl", "vllm"))
    print(f"# torch {torch.__version__}, {versions}"
          + f"; {Path(args.model).name} ({weights}); P3O-V2 + LoRA, bf16, {args.prompts} prompts x 2 responses, "
          f"up to {args.new_tokens} new tokens, {args.steps} steps (first excluded)")
    print("| run | responses/s | mean length | torch peak memory (GiB) | device peak memory (GiB) | wall (s) | "
          "generate / reference / update |\n|---|---|---|---|---|---|---|", flush=True)
    planned = rows(model, root / "prompts.jsonl", root / "rewards.py", root, args)
    table = {key: (title, missing) for key, title, missing, _ in planned}
    for key in args.rows.split(","):
        title, missing = table[key]
        left = args.budget_seconds - (time.perf_counter() - start)
        if missing or left < 30:
            print(f"| {title} | skipped: {missing or 'no time left'} | | | | | |", flush=True)
            continue
        print(f"| {title} | " + cells(child(key, root, args, min(args.row_seconds, left))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
