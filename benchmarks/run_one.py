"""One training job, p3o or TRL, on the benchmark's task; meant to run in its own process, timed
and measured by its parent (vs_trl.py). Writes a JSON summary (mean response length, steps run)
to --out so the two sides' generation work can be compared.

    python benchmarks/run_one.py --impl p3o --pairing rloo --size 1m --steps 12 --out r.json
    python benchmarks/run_one.py --impl trl --pairing grpo --size smollm2 --precision bf16 --steps 2 --pairs 8 --out r.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import build_assets, reward_fn

GROUP = {"rloo": 2, "grpo": 4, "ppo": 1}  # responses per prompt in each pairing, on both sides
LORA = dict(r=16, alpha=32)  # smollm2's adapters (issue 19's setting), on every linear layer but the head


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["p3o", "trl"], required=True)
    p.add_argument("--pairing", choices=list(GROUP), required=True,
                   help="rloo: p3o --algo p3o-v1 vs TRL RLOOTrainer (k=2); grpo: p3o --algo grpo vs TRL "
                        "GRPOTrainer (k=4); ppo: p3o --algo ppo vs TRL PPOTrainer")
    p.add_argument("--size", choices=["1m", "10m", "smollm2"], required=True,
                   help="1m, 10m: task.py's tiny Llamas, full fine-tune; smollm2: SmolLM2-135M-Instruct with "
                        "LoRA r 16 / alpha 32 on every linear layer, chat prompts")
    p.add_argument("--steps", type=int, required=True, help="Rollout-and-update iterations (optimizer steps).")
    p.add_argument("--pairs", type=int, default=16,
                   help="Prompts per step, each with its group of responses (rloo: 2, grpo: 4, ppo: 1).")
    p.add_argument("--new_tokens", type=int, default=32, help="Maximum new tokens per response.")
    p.add_argument("--grad_accum", type=int, default=1, help="Micro-batches per optimizer step (both sides).")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: p3o --mixed_precision bf16, TRL bf16=True (both over float32-loaded weights).")
    p.add_argument("--compile_sampling", action="store_true", help="p3o only: --compile_sampling.")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (TRL: beta / kl_coef).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="Where to write the JSON summary.")
    args = p.parse_args(argv)
    if args.compile_sampling and args.impl != "p3o":
        p.error("--compile_sampling is p3o's flag")
    if args.pairing == "ppo" and args.size == "smollm2":
        p.error("--pairing ppo needs a reward model of the policy's shape; task.py builds one for 1m and 10m only")
    return args


def run_p3o(args, assets: dict, workdir: str) -> dict:
    """The p3o CLI, in this process: one rollout of `pairs` prompts per step, used once (one epoch,
    one minibatch), as `p3o train` runs it for any user."""
    from p3o.cli import main

    out = Path(workdir) / "p3o"
    code = main(["train", "--model_name_or_path", assets["policy"], "--dataset", assets["prompts"],
                 "--output_dir", str(out), *p3o_algo(args, assets), *p3o_model(args), "--max_steps", str(args.steps),
                 "--pairs_per_step", str(args.pairs), "--minibatch_pairs", str(args.pairs),
                 "--gradient_accumulation_steps", str(args.grad_accum), "--epochs", "1",
                 "--max_new_tokens", str(args.new_tokens), "--temperature", "1.0", "--top_k", "0", "--top_p", "1.0",
                 "--beta", str(args.beta), "--learning_rate", str(args.lr), "--lr_scheduler_type", "constant",
                 "--adam_beta2", "0.95", "--weight_decay", "0", "--max_grad_norm", "1.0", "--seed", str(args.seed),
                 "--log_completions", "0", "--logging_steps", str(max(args.steps, 1)), "--disable_progress_bar"])
    if code:
        raise SystemExit(f"p3o train exited with {code}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"steps_run": len(rows), "mean_response_length": _mean([r["response_length"] for r in rows])}


def p3o_algo(args, assets: dict) -> list[str]:
    """The algorithm flags of each pairing. grpo's loss is averaged over the minibatch's response
    tokens (token-mean), as TRL GRPO's default loss_type "dapo" does, so both optimise the same loss."""
    reward = ["--reward_fn", f"{Path(__file__).parent / 'task.py'}:reward_fn"]
    if args.pairing == "ppo":
        return ["--algo", "ppo", "--num_generations", "1", "--reward_model", assets["reward_model"]]
    if args.pairing == "grpo":
        return ["--algo", "grpo", "--num_generations", str(GROUP["grpo"]), "--loss_aggregation", "token-mean",
                *reward]
    return ["--algo", "p3o-v1", *reward]


def p3o_model(args) -> list[str]:
    """LoRA on the real model; bf16 autocast when asked (p3o then also holds LoRA's frozen base in bf16);
    the compiled decoding step when asked."""
    flags = ["--mixed_precision", "bf16"] if args.precision == "bf16" else []
    flags += ["--compile_sampling"] if args.compile_sampling else []
    if args.size == "smollm2":
        flags += ["--use_peft", "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]),
                  "--lora_target_modules", "all-linear"]
    return flags


def trl_common(args, workdir: str) -> dict:
    """TrainingArguments every TRL trainer gets: CPU, fp32 or bf16 autocast as asked, no
    checkpointing, nothing saved or reported, and the optimiser/scheduler p3o is given."""
    bf16 = args.precision == "bf16"
    return dict(output_dir=str(Path(workdir) / "trl"), use_cpu=True, bf16=bf16, fp16=False,
                gradient_checkpointing=False,  # TRL's configs default to True; p3o does not checkpoint
                learning_rate=args.lr, lr_scheduler_type="constant", adam_beta2=0.95, weight_decay=0.0,
                max_grad_norm=1.0, seed=args.seed, report_to="none", save_strategy="no", logging_steps=1,
                disable_tqdm=True, dataloader_num_workers=0)


def run_trl_rloo(args, assets: dict, workdir: str) -> dict:
    """RLOOTrainer with k=2 (the same gradient as P3O-V1)."""
    from trl import RLOOConfig, RLOOTrainer

    return run_trl_group(args, assets, workdir, RLOOConfig, RLOOTrainer, {})


def run_trl_grpo(args, assets: dict, workdir: str) -> dict:
    """GRPOTrainer with k=4: beta set (its default is 0, which would skip the reference pass p3o
    runs), group-std advantages and clip 0.2 as p3o's grpo, loss_type "dapo" (token-mean)."""
    from trl import GRPOConfig, GRPOTrainer

    extra = dict(loss_type="dapo", scale_rewards="group", epsilon=0.2)
    return run_trl_group(args, assets, workdir, GRPOConfig, GRPOTrainer, extra)


def run_trl_group(args, assets: dict, workdir: str, config_cls, trainer_cls, extra: dict) -> dict:
    """A group trainer (RLOO, GRPO) with k responses per prompt: one generation batch of k*pairs
    completions per optimizer step. Their configs' __post_init__: generation_batch_size =
    per_device_train_batch_size * steps_per_generation, and steps_per_generation defaults to
    gradient_accumulation_steps, so per_device = k*pairs/accum; max_steps then counts generations."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    k = GROUP[args.pairing]
    config = config_cls(**trl_common(args, workdir), num_generations=k, num_iterations=1, beta=args.beta,
                        per_device_train_batch_size=k * args.pairs // args.grad_accum,
                        gradient_accumulation_steps=args.grad_accum, max_completion_length=args.new_tokens,
                        temperature=1.0, top_p=1.0, top_k=0, max_steps=args.steps, **extra)
    assert config.generation_batch_size == k * args.pairs and config.steps_per_generation == args.grad_accum
    trainer = trainer_cls(model=_trl_policy(assets), reward_funcs=[reward_fn], args=config,
                          train_dataset=load_dataset("json", data_files=assets["prompts"], split="train"),
                          processing_class=AutoTokenizer.from_pretrained(assets["policy"]),
                          peft_config=_trl_lora(args))
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"steps_run": trainer.state.global_step, "mean_response_length": _mean(lengths)}


def _trl_policy(assets: dict):
    """The policy in float32, as p3o loads it (bf16=True then autocasts over it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets["policy"], dtype="float32")


def _trl_lora(args):
    """smollm2's adapters as p3o's --use_peft makes them (p3o.models.lora: no dropout, every linear
    layer but the output head); None (full fine-tune) on the tiny sizes."""
    if args.size != "smollm2":
        return None
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def run_trl_ppo(args, assets: dict, workdir: str) -> dict:
    """trl.experimental.ppo.PPOTrainer: local_batch_size = per_device * grad_accum = pairs responses
    per update, one PPO epoch of one minibatch, total_episodes = steps * pairs. Its critic is a
    separate value model, a copy of the reward model, as in TRL's own PPO example."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    lengths = _record_ppo_lengths(ppo_trainer)
    tokenizer = AutoTokenizer.from_pretrained(assets["policy"])
    prompts = load_dataset("json", data_files=assets["prompts"], split="train")
    prompts = prompts.map(lambda row: {"input_ids": tokenizer(row["prompt"])["input_ids"]}, remove_columns=["prompt"])
    config = PPOConfig(**trl_common(args, workdir), per_device_train_batch_size=args.pairs // args.grad_accum,
                       gradient_accumulation_steps=args.grad_accum, num_mini_batches=1, num_ppo_epochs=1,
                       total_episodes=args.steps * args.pairs, response_length=args.new_tokens, stop_token="eos",
                       temperature=1.0, kl_coef=args.beta, local_rollout_forward_batch_size=args.pairs,
                       num_sample_generations=0)

    def policy():
        return AutoModelForCausalLM.from_pretrained(assets["policy"], dtype=torch.float32)

    def scorer():
        return AutoModelForSequenceClassification.from_pretrained(assets["reward_model"], num_labels=1,
                                                                  dtype=torch.float32)

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy(), ref_model=policy(),
                         reward_model=scorer(), value_model=scorer(), train_dataset=prompts)
    assert config.local_batch_size == args.pairs and config.num_total_batches == args.steps
    trainer.train()
    return {"steps_run": trainer.state.global_step, "mean_response_length": _mean(lengths)}


def _record_ppo_lengths(module) -> list[float]:
    """PPOTrainer computes no response-length metric; wrap its `truncate_response` (called once per
    rollout chunk) to record the mean length up to and including the first EOS, as p3o counts it."""
    import torch

    lengths, truncate = [], module.truncate_response

    def recording(stop_token_id, pad_token_id, responses):
        is_stop = responses == stop_token_id
        ended = is_stop.any(dim=1)
        length = torch.where(ended, is_stop.int().argmax(dim=1) + 1, responses.shape[1])
        lengths.append(float(length.float().mean()))
        return truncate(stop_token_id, pad_token_id, responses)

    module.truncate_response = recording
    return lengths


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


RUNNERS = {("p3o", "rloo"): run_p3o, ("p3o", "grpo"): run_p3o, ("p3o", "ppo"): run_p3o,
           ("trl", "rloo"): run_trl_rloo, ("trl", "grpo"): run_trl_grpo, ("trl", "ppo"): run_trl_ppo}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)  # the same intra-op threads for both implementations
    assets = build_assets(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        start = time.perf_counter()
        result = RUNNERS[args.impl, args.pairing](args, assets, workdir)
        result["train_seconds"] = time.perf_counter() - start  # in-process, a cross-check of the parent's timing
    result.update(impl=args.impl, pairing=args.pairing, size=args.size, precision=args.precision, steps=args.steps,
                  torch_threads=torch.get_num_threads())
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
