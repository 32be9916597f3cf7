"""Each phase of a p3o step against this machine's own limits, measured in the same run.

First the machine: the matmul peak (the best of a few square matmuls, in float32 and in bf16) and
the copy bandwidth (a large tensor copied, bytes read + written per second). Then, for the 1M and
10M models of benchmarks/task.py (P3O-V1, 16 prompts x 2 responses x 32 new tokens, the TRL
comparison's work) and SmolLM2-135M-Instruct (RLOO, LoRA r16/alpha32 on every linear layer, 8 chat
prompts x 2 x 32, the setting of issue 19), in float32 and under --mixed_precision bf16, each in its
own process: the median seconds of each engine phase over --steps steps after a warm-up, the
floating-point work it did, and

- achieved FLOP/s of sampling, the reference pass and the update, and that over the matmul peak
  in the dtype the matmuls ran in (bf16 under --mixed_precision bf16, else float32);
- sampling's bytes/s (the weights read once per decoded token, plus the KV cache) over the copy
  bandwidth: at small batches, decoding is bound by memory, not arithmetic.

and last the step's floor on this machine: each phase at these limits, summed, beside the measured
sum of the phases.

    python benchmarks/phases.py            # a few minutes (5 at 1 thread on this project's CPU)
    python benchmarks/phases.py --quick    # one step each, smaller probes: a smoke run

How the work is counted (an estimate of what the step executes, padding included; see
benchmarks/README.md): 2 FLOPs per multiply-add of every matmul weight per token that goes through
it (the output head only at positions whose logits are kept), attention's QK^T and AV over the keys
each query sees, and for the update a backward of the same size for input gradients plus one for
the weight gradients of the trained matrices (all of them, or LoRA's adapters).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = {  # name: (how it is built, algorithm, prompts per step, extra TrainConfig flags)
    "1m": ("task", "p3o-v1", 16, []),
    "10m": ("task", "p3o-v1", 16, []),
    "smollm2": ("smollm2", "rloo", 8, ["--use_peft", "--lora_r", "16", "--lora_alpha", "32",
                                       "--lora_target_modules", "all-linear"]),
}
PHASES = {"sampling": "time_generate", "old pass": "time_old_logprobs", "reference": "time_reference",
          "update": "time_update"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"],
                   help="--mixed_precision of the runs: no (float32) and/or bf16.")
    p.add_argument("--steps", type=int, default=3, help="Measured steps per run, after one warm-up step.")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: every time (the probes too) in CPU seconds of the process; on shared cores use it with "
                        "--threads 1 (benchmarks/levers.py says why).")
    p.add_argument("--quick", action="store_true", help="One measured step per run and smaller probes (a smoke run).")
    p.add_argument("--json", help="Also write every number here.")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model/precision and write its JSON here
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the machine's limits ---------------------------------------------------------------------------

CLOCK = time.perf_counter  # or time.process_time (--clock cpu)


def matmul_peak(dtype, sizes=(1024, 2048), reps: int = 5) -> float:
    """FLOP/s of the best square matmul among `sizes` (median of `reps` after a warm-up)."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up: kernels chosen, memory touched
        times = []
        for _ in range(reps):
            start = CLOCK()
            a @ b
            times.append(CLOCK() - start)
        best = max(best, 2 * n ** 3 / statistics.median(times))
    return best


def copy_bandwidth(megabytes: int = 256, reps: int = 5) -> float:
    """Bytes per second read + written by copying a float32 tensor of `megabytes` MiB (median)."""
    import torch

    src = torch.ones(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = CLOCK()
        dst.copy_(src)
        times.append(CLOCK() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


# --- one run: a model in one precision --------------------------------------------------------------

def build(model: str, precision: str, steps: int, new_tokens: int, workdir: str):
    from p3o.cli.args import config_from_argv
    from p3o.rl.config import TrainConfig
    from p3o.rl.train import build_trainer

    how, algo, pairs, extra = MODELS[model]
    if how == "task":
        from task import build_assets

        assets = build_assets(model)
        data = ["--model_name_or_path", assets["policy"], "--dataset", assets["prompts"],
                "--reward_fn", f"{HERE / 'task.py'}:reward_fn"]
    else:
        from levers import QUESTIONS, REWARD, SMOLLM2

        if not SMOLLM2.is_dir():
            raise SystemExit(f"{SMOLLM2} is missing: build it with `p3o fetch-model smollm2 --output_dir {SMOLLM2}` "
                             "(or run tests/test_smollm2.py once)")
        prompts, rewards = Path(workdir, "prompts.jsonl"), Path(workdir, "rewards.py")
        prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
        rewards.write_text(REWARD)
        data = ["--model_name_or_path", str(SMOLLM2), "--dataset", str(prompts), "--reward_fn", f"{rewards}:short"]
    argv = [*data, "--output_dir", str(Path(workdir, "run")), "--algo", algo, "--max_steps", str(steps + 1),
            "--pairs_per_step", str(pairs), "--minibatch_pairs", str(pairs), "--epochs", "1",
            "--max_new_tokens", str(new_tokens), "--learning_rate", "1e-5", "--seed", "0",
            "--mixed_precision", precision, "--disable_progress_bar", *extra]
    return build_trainer(config_from_argv(TrainConfig, argv))


def linear_weights(module):
    """(matmul weights but the output head, the head, trained matmul weights): numbers of
    multiply-adds per token; nn.Linear and GPT-2's Conv1D, adapters included."""
    from torch import nn

    head = module.get_output_embeddings()
    body = trained = 0
    for m in module.modules():
        if m is head or not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
            continue
        body += m.weight.numel()
        trained += m.weight.numel() if m.weight.requires_grad else 0
    trained += head.weight.numel() if head.weight.requires_grad else 0
    return body, head.weight.numel(), trained


def weight_bytes(module) -> int:
    """Bytes of every weight a forward reads (each stored tensor once), in the dtype it is held."""
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    embedding = module.get_input_embeddings().weight  # a lookup reads a few rows, not the table
    if embedding is not module.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size()
    return total


def own_loop(trainer) -> bool:
    """Whether the trainer samples with p3o's own decoding loop (`p3o.rl.decoding`)."""
    from p3o.rl.decoding import fast_decoder
    from p3o.rl.sampling import as_inverse_cdf

    model = trainer.unwrapped_policy
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft, as sampling unwraps it
    with trainer.accelerator.autocast():
        return (trainer.cfg.decoding_loop == "p3o" and not trainer.cfg.compile_sampling
                and fast_decoder(model, as_inverse_cdf(trainer.gen_config)[0]) is not None)


def work(trainer, seq) -> dict:  # seq: the step's Rollout
    """FLOPs of each phase and bytes read by sampling, for the rollout `seq`, as the engine runs it."""
    import torch

    policy = trainer.unwrapped_policy
    config = policy.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d_attn = heads * head_dim
    body, head, trained = linear_weights(policy)
    B, Lq = seq.query_ids.shape
    T = seq.response_ids.shape[1]
    bf16 = trainer.cfg.mixed_precision == "bf16"

    def attention(queries_by_keys: float) -> float:  # QK^T and AV: 2 matmuls, 2 FLOPs per multiply-add
        return 4 * d_attn * layers * queries_by_keys

    # sampling: prefill B x Lq (head at the last position), then T - 1 decode steps of B tokens;
    # p3o's decoding loop prefills each distinct prompt once (U of them)
    U = len(torch.unique(seq.query_ids, dim=0)) if own_loop(trainer) else B
    sampled_tokens = U * Lq + B * (T - 1)
    sampling = 2 * body * sampled_tokens + 2 * head * B * T
    sampling += attention(U * Lq * (Lq + 1) / 2 + B * sum(Lq + j for j in range(1, T)))
    kv_bytes = 2 if bf16 else 4
    kv = sum(B * (Lq + j) * layers * 2 * kv_heads * head_dim * kv_bytes for j in range(T))  # cache read per step
    sampling_bytes = T * weight_bytes(policy) + kv
    # one forward of the rollout (reference, old pass, the update's forward), logits at response positions
    k = trainer.packed_group(seq)
    if k > 1:  # one [prompt, y1, ..., yk] per group; each sees the prompt and itself
        tokens = B // k * (Lq + k * T)
        pairs = attention(B // k * Lq * (Lq + 1) / 2 + B * sum(Lq + t for t in range(1, T + 1)))
    else:
        tokens = B * (Lq + T)
        pairs = attention(B * (Lq + T) * (Lq + T + 1) / 2)
    forward = 2 * body * tokens + 2 * head * B * T + pairs
    head_trained = policy.get_output_embeddings().weight.requires_grad
    weight_grads = 2 * (trained - head * head_trained) * tokens + 2 * head * B * T * head_trained
    update = 2 * forward + pairs + weight_grads  # forward; input gradients (attention's twice); weight gradients
    return {"sampling": sampling, "old pass": forward, "reference": forward, "update": update,
            "sampling_bytes": sampling_bytes, "params": sum(p.numel() for p in policy.parameters()),
            "B": B, "Lq": Lq, "T": T}


def run_one(args) -> dict:
    """Steps of one model in one precision; the median of each phase and its work."""
    import types

    import torch

    import p3o.rl.engine as engine

    torch.set_num_threads(args.threads)
    engine.time = types.SimpleNamespace(perf_counter=CLOCK)  # the engine's own phase timers
    with tempfile.TemporaryDirectory(prefix="phases-") as workdir:
        trainer = build(args.model, args.precision, args.steps, args.new_tokens, workdir)
        runs = []
        for step in range(args.steps + 1):
            rollout, _, timings = trainer.collect_rollout(step)
            t0 = CLOCK()
            trainer.update(rollout, step)
            timings["time_update"] = CLOCK() - t0
            if step:
                runs.append({**timings, **work(trainer, rollout)})
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


# --- the driver -------------------------------------------------------------------------------------

def main(argv=None) -> None:
    global CLOCK
    args = parse_args(argv)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.steps = 1
    if args.one:
        Path(args.one).write_text(json.dumps(run_one(args)))
        return
    import torch

    torch.set_num_threads(args.threads)
    sizes, reps, megabytes = ((512, 1024), 3, 64) if args.quick else ((1024, 2048), 5, 256)
    peaks = {"no": matmul_peak(torch.float32, sizes, reps), "bf16": matmul_peak(torch.bfloat16, sizes, reps)}
    bandwidth = copy_bandwidth(megabytes, reps)
    print(f"machine: {torch.get_num_threads()} threads, {args.clock} seconds; matmul peak {peaks['no'] / 1e9:.0f} GFLOP/s float32, "
          f"{peaks['bf16'] / 1e9:.0f} GFLOP/s bf16; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    results = []
    for model in args.models:
        for precision in args.precisions:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", out.name, "--model", model,
                       "--precision", precision, "--steps", str(args.steps), "--new_tokens", str(args.new_tokens),
                       "--threads", str(args.threads), "--clock", args.clock]
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode:
                    print(f"{model} {precision}: failed\n{done.stderr[-2000:]}")
                    continue
                results.append({"model": model, "precision": precision, **json.loads(Path(out.name).read_text())})
    dtype = {"no": "float32", "bf16": "bf16"}
    print(f"\nmedian of {args.steps} step(s) after a warm-up; % of the matmul peak in the dtype the matmuls ran in\n")
    print("| model | params | dtype | phase | s | GFLOP | GFLOP/s | % of matmul peak | GB/s | % of copy bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for phase, key in PHASES.items():
            if key not in r:
                continue
            seconds, flops = r[key], r[phase]
            rate = flops / seconds
            memory = ["", ""]
            if phase == "sampling":
                memory = [f"{r['sampling_bytes'] / seconds / 1e9:.1f}", f"{100 * r['sampling_bytes'] / seconds / bandwidth:.0f}%"]
            print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {dtype[r['precision']]} | {phase} | {seconds:.3f} | "
                  f"{flops / 1e9:.1f} | {rate / 1e9:.1f} | {100 * rate / peaks[r['precision']]:.1f}% | "
                  f"{memory[0]} | {memory[1]} |")
    print("\nThe floor: each phase at this machine's limits (sampling: its FLOPs at the matmul peak or its bytes at "
          "the copy bandwidth, whichever takes longer; the other phases: their FLOPs at the matmul peak), against "
          "the measured phases\n")
    print("| model | dtype | floor s | measured s | floor / measured |")
    print("|---|---|---|---|---|")
    for r in results:
        phases, peak = [phase for phase, key in PHASES.items() if key in r], peaks[r["precision"]]
        floor = sum(max(r[phase] / peak, r["sampling_bytes"] / bandwidth) if phase == "sampling" else r[phase] / peak
                    for phase in phases)
        measured = sum(r[PHASES[phase]] for phase in phases)
        print(f"| {r['model']} | {dtype[r['precision']]} | {floor:.2f} | {measured:.2f} | {floor / measured:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "copy_bandwidth": bandwidth, "results": results,
                                               "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
