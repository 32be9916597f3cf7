"""One speed lever on and off, in one process: two trainers built alike but for the lever (A: off,
B: on), their steps alternated (A B, B A, ...) so drift of the machine hits both, and the median of
each engine phase printed with the ratio A / B.

    python benchmarks/levers.py --lever bf16_base              # SmolLM2-135M + LoRA, bf16, 8 x 2 x 32
    python benchmarks/levers.py --lever logprobs --clock cpu --threads 1

Levers (see docs/performance.md):
  bf16_base  LoRA under --mixed_precision bf16: the frozen base held in bf16 (off: float32 weights,
             re-cast by autocast at every forward)
  logprobs   log-probabilities a block of rows at a time from the bf16 logits (off: the float32
             logits accelerate's wrapper copied out, and the plain float32 log-softmax)
  cache_blocks  on a CPU those blocks 2 MiB of float32, in the cores' L2 caches (off: 8 MiB blocks)
  cpu_attention  attention's backward in float32 under CPU bf16 autocast (off: autocast's bf16 backward)
  attention_grads  that float32 backward written out: probabilities and four matmuls, grouped heads
             (off: SDPA's float32 flash kernel run forward and backward again)
  (merged_sampling, inverse_cdf and sampling act on `generate`'s path: both sides run --decoding_loop transformers)
  merged_sampling  sampling with the LoRA adapters merged into copies of the weights, prepacked for
             oneDNN in bf16 on a CPU (off: peft's layers, three matmuls each, at every token)
  inverse_cdf  each token drawn by inverse CDF (off: `torch.multinomial`, an exponential draw per
             vocabulary entry)
  sampling   merged_sampling and inverse_cdf together
  lean_lora  the training passes' LoRA layers cast their input once and scale at rank r (off: peft's
             forward: two casts, the scale on the full-width output)
  kept_less  less kept for the backward pass: one bf16 cast shared by layers fed one input (q, k, v;
             gate, up) and silu(gate) recomputed in the MLP's backward (off: a cast per layer, and
             the three MLP activations kept)
  bf16_cache  under bf16 autocast the sampling KV cache holds keys and values in bf16 (off: the
             keys in float32 as rotary embeddings leave them, cast to bf16 by attention at every token)
  decoding_loop  --decoding_loop p3o: p3o's own sampling loop for Llama-style models (off:
             --decoding_loop transformers, `generate` over the merged, prepacked weights)
  shared_prompt  each group's k responses in one packed [prompt, y1, ..., yk] forward (off: a
             sequence per response; pairs are packed this way since before, so use it with --algo grpo --k 4)
  compiled_sampling  --compile_sampling: each decoding step one torch.compile'd forward over a
             static KV cache (off: the eager step). Not part of `all`: a flag, off by default. The
             compilation falls in the warm-up step; its time is printed apart.
  bf16_weights  --torch_dtype bfloat16: the norms, the embedding and so the residual stream in bf16
             too (peft keeps the adapters in float32; off: the default float32 model, its frozen base
             held in bf16). Not part of `all`: a choice of precision rather than a speed lever.
  all        every lever above together (off: none of them)

`--clock cpu` times phases in CPU seconds of this process instead of wall seconds: on cores that
other processes share, use it with `--threads 1` (a 2-thread job's threads wait on each other when a
core is taken; one thread's CPU time is its work). `--only A` / `--only B` runs one side alone in the
process, so the peak RSS printed is that side's (run it twice for the memory a lever saves).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / ".cache" / "smollm2-0.1.2-transformers-5.23.0"  # `p3o fetch-model smollm2` (tests/conftest.py)
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "What colour is the sky?", "Say hello.",
             "Write a haiku about the sea.", "Why do cats purr?", "Give me a tip for sleeping well.", "What is 2 + 2?",
             "Describe a rainy day.", "Tell me a joke.", "What is photosynthesis?", "Name three rivers.",
             "How do I boil an egg?", "What is a prime number?", "Suggest a name for a dog.", "Why is the sea salty?"]
REWARD = "def short(prompts, completions, **kwargs):\n    return [-float(len(c[-1]['content'])) for c in completions]\n"
GENERATE_LEVERS = ("merged_sampling", "inverse_cdf", "sampling")
PHASES = ("time_generate", "time_old_logprobs", "time_reference", "time_update", "step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lever", choices=["bf16_base", "logprobs", "cache_blocks", "cpu_attention", "attention_grads", "merged_sampling",
                                       "inverse_cdf", "sampling", "lean_lora", "kept_less", "bf16_cache", "decoding_loop",
                                       "shared_prompt", "compiled_sampling", "bf16_weights", "all"],
                   required=True)
    p.add_argument("--model", default=str(SMOLLM2), help="A causal LM directory (default: the cached SmolLM2-135M-Instruct).")
    p.add_argument("--algo", default="rloo")
    p.add_argument("--pairs", type=int, default=8, help="Prompts per step (k responses each).")
    p.add_argument("--k", type=int, default=2, help="Responses per prompt (--num_generations; grpo wants k >= 2).")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="Measured steps of each trainer, after one warm-up step.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--only", choices=["A", "B"], help="Build and run one side alone, for its peak RSS (memory).")
    p.add_argument("--json", help="Also write the medians here.")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More TrainConfig flags for both trainers.")
    return p.parse_args(argv)


def build(args, workdir: Path, on: bool = True):
    from p3o.cli.args import config_from_argv
    from p3o.rl.config import TrainConfig
    from p3o.rl.train import build_trainer

    workdir.mkdir(parents=True, exist_ok=True)
    prompts, rewards = workdir / "prompts.jsonl", workdir / "rewards.py"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    rewards.write_text(REWARD)
    argv = ["--model_name_or_path", args.model, "--dataset", str(prompts), "--output_dir", str(workdir / "run"),
            "--algo", args.algo, "--reward_fn", f"{rewards}:short", "--max_steps", "1000",
            "--pairs_per_step", str(args.pairs), "--minibatch_pairs", str(args.pairs), "--num_generations", str(args.k),
            "--epochs", "1", "--max_new_tokens", str(args.new_tokens), "--learning_rate", "1e-5", "--seed", "0",
            "--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "all-linear",
            "--mixed_precision", "bf16", "--disable_progress_bar", *args.extra]
    if on and args.lever == "compiled_sampling":  # a flag, not a default: B alone asks for it
        argv.append("--compile_sampling")
    if on and args.lever == "bf16_weights":
        argv += ["--torch_dtype", "bfloat16"]
    if not on and args.lever in ("decoding_loop", "all"):  # an option: A asks for generate
        argv += ["--decoding_loop", "transformers"]
    if args.lever in GENERATE_LEVERS:  # levers of `generate`'s path: both sides sample through it
        argv += ["--decoding_loop", "transformers"]
    return build_trainer(config_from_argv(TrainConfig, argv))


def plain_selective_log_softmax(logits, index, temperature=1.0):
    """The log-probabilities before the `logprobs` lever: a float32 copy of the logits, whole."""
    import torch

    logits = logits / temperature
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@contextlib.contextmanager
def lever_off(lever: str):
    """The engine as it was without `lever`, for the block (building trainer A and running its steps)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import p3o.rl.engine as engine
    import p3o.rl.rollout as rollout

    restore = []

    def replace(owner, name, value):
        old = getattr(owner, name)
        restore.append(lambda: setattr(owner, name, old))
        setattr(owner, name, value)

    if lever in ("bf16_base", "all"):
        replace(engine, "hold_frozen_base_in", lambda *args, **kwargs: 0)
    if lever in ("logprobs", "all"):
        replace(rollout, "selective_log_softmax", plain_selective_log_softmax)
        replace(engine, "_without_float32_outputs", lambda module: None)
    if lever in ("cache_blocks", "all"):
        import p3o.utils.ops as ops
        replace(ops, "_block_elements", lambda device: 1 << 21)
    if lever in ("cpu_attention", "all"):
        replace(engine, "float32_attention_backward_on_cpu", lambda: None)
        installed = ALL_ATTENTION_FUNCTIONS["sdpa"]
        if hasattr(installed, "wrapped"):  # B's build installed it: A runs on the plain sdpa
            ALL_ATTENTION_FUNCTIONS["sdpa"] = installed.wrapped
            restore.append(lambda: ALL_ATTENTION_FUNCTIONS.__setitem__("sdpa", installed))
    if lever == "attention_grads":  # in `all`, cpu_attention above removes the whole wrapper
        import p3o.models.attention as attention
        replace(attention, "_float32_grads", lambda *args: None)
    if lever in ("merged_sampling", "sampling", "all"):
        import p3o.models.sampling_weights as weights
        replace(weights, "sampling_weights", lambda model, **kw: contextlib.nullcontext())
    if lever in ("inverse_cdf", "sampling", "all"):
        import p3o.rl.sampling as sampling
        replace(sampling, "as_inverse_cdf", lambda gen_config: (gen_config, None))
    if lever in ("shared_prompt", "all"):
        replace(engine, "worth_sharing_prompts", lambda *args: False)
    if lever in ("bf16_cache", "all"):
        import p3o.rl.kv_cache as kv_cache
        replace(kv_cache, "storage_dtype", lambda key_states: key_states.dtype)
    if lever in ("lean_lora", "all"):
        replace(engine, "lean_lora_forward", lambda model: 0)
    if lever in ("kept_less", "all"):
        import p3o.models.lean_lora as lean_lora
        replace(engine, "lean_gated_mlp", lambda model: 0)
        replace(lean_lora, "_cast", lambda x, dtype: x.detach().to(dtype))  # a cast of its own per layer
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


def one_step(trainer, step: int, clock) -> dict[str, float]:
    start = clock()
    rollout, _, timings = trainer.collect_rollout(step)
    t0 = clock()
    trainer.update(rollout, step)
    timings["time_update"] = clock() - t0
    timings["step"] = clock() - start
    timings["response_length"] = rollout.response_mask.sum(-1).float().mean().item()
    return timings


def main(argv=None) -> None:
    args = parse_args(argv)
    import resource

    import torch

    import p3o.rl.engine as engine

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    engine.time = types.SimpleNamespace(perf_counter=clock)  # the engine's own phase timers
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        sides = [args.only] if args.only else ["A", "B"]
        trainers = {}
        for name in sides:
            with lever_off(args.lever) if name == "A" else contextlib.nullcontext():
                trainers[name] = build(args, Path(tmp, name), on=name == "B")
        runs, warm_up = {name: [] for name in sides}, {}
        for step in range(args.steps + 1):
            for name in sides if step % 2 == 0 else sides[::-1]:
                with lever_off(args.lever) if name == "A" else contextlib.nullcontext():
                    timings = one_step(trainers[name], step, clock)
                if step:  # the first is a warm-up
                    runs[name].append(timings)
                else:
                    warm_up[name] = timings["step"]
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"lever {args.lever}: A off, B on; {Path(args.model).name}, {args.algo}, {args.pairs} prompts x {args.k} x "
          f"{args.new_tokens} new tokens, LoRA r16 all-linear, bf16; {args.threads} threads; {args.clock} seconds, "
          f"median of {args.steps} steps each (after a warm-up), alternated")
    for key in (*PHASES, "response_length"):
        if args.only and key in medians[args.only]:
            print(f"  {key:<18}{args.only} {medians[args.only][key]:8.3f}")
        elif key in medians.get("A", {}):
            a, b = medians["A"][key], medians["B"][key]
            print(f"  {key:<18}A {a:8.3f}   B {b:8.3f}   A/B {a / b if b else float('nan'):5.2f}")
    print("  warm-up step (compilation, first allocations): "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in warm_up.items()))
    print(f"  peak RSS of the process ({args.only or 'both trainers'}): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
