"""`p3o train`: load everything a TrainConfig names, run the engine, write the run directory.

Run directory: config.yaml (the resolved config), metrics.jsonl (one line a step), the final policy
and tokenizer (`save_pretrained`, safetensors). Only the main process writes.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from p3o.data.prompts import load_preference_pairs, load_prompts
from p3o.eval.watch import Block, OverOptimisationWatch
from p3o.models.loading import load_causal_lm, load_tokenizer
from p3o.models.lora import ADAPTER_DIR, is_lora
from p3o.models.value_head import VALUE_HEAD_FILE, split_state_dict
from p3o.reward import build_reward
from p3o.rl.algorithms import get_algorithm
from p3o.rl.checkpoint import RESUMABLE_CHANGES, load_training_state, save_checkpoint
from p3o.rl.config import TrainConfig, derive_sizes
from p3o.rl.engine import Trainer
from p3o.utils.checkpoints import StopRequest, resume_point
from p3o.utils.io import (
    JsonlWriter,
    run_directory,
    save_pretrained_atomically,
    truncate_jsonl,
    write_yaml,
)
from p3o.utils.distributed import gathered, loading_whole, make_accelerator
from p3o.utils.tracking import check_trackers, finish_trackers, start_trackers

log = logging.getLogger("p3o")


def build_trainer(cfg: TrainConfig, checkpoint: Path | None = None) -> Trainer:
    """Everything cheap is checked before anything expensive is loaded. With `checkpoint`, the policy
    and the whole training state come from it (the reference stays the initial policy)."""
    from accelerate.utils import set_seed

    algorithm = get_algorithm(cfg.algo)
    trackers = check_trackers(cfg.report_to)
    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers or None,
                                   project_dir=cfg.output_dir)
    derive_sizes(cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
    if algorithm.from_dataset:
        prompts = load_preference_pairs(cfg.dataset, tokenizer, cfg.dataset_split, cfg.dataset_config, cfg.prompt_column,
                                        cfg.chosen_column, cfg.rejected_column, cfg.max_new_tokens)
    else:
        prompts = load_prompts(cfg.dataset, tokenizer, cfg.dataset_split, cfg.dataset_config, cfg.prompt_column)
    eval_prompts = _eval_prompts(cfg, tokenizer)
    reward = (build_reward(cfg.reward_fn, cfg.reward_model, cfg.trust_remote_code, cfg.reward_batch_size,
                           accelerator.device) if cfg.reward_fn or cfg.reward_model else None)  # dpo: for eval only
    if cfg.num_train_epochs is not None:  # the run's length in passes over the data
        cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.num_train_epochs * len(prompts) / cfg.pairs_per_step)))
    if cfg.algo == "grpo" and cfg.num_generations == 2:
        log.warning("grpo with --num_generations 2 keeps only the sign of r1 - r2: the reward advantages are "
                    "+-1/sqrt(2) whatever the gap (and 0 for a tie); use k >= 4, or rloo / p3o for pairs")
    full_weights = checkpoint if checkpoint and not cfg.use_peft else None  # a LoRA checkpoint holds the adapter only
    with loading_whole(accelerator):  # ZeRO-3: partitioned by `prepare`, not while loading
        policy = load_causal_lm(str(full_weights or cfg.model_name_or_path), cfg.trust_remote_code, cfg.torch_dtype,
                                what="policy")
        ref_path = cfg.ref_model_name_or_path or (cfg.model_name_or_path if full_weights else None)
        ref = load_causal_lm(ref_path, cfg.trust_remote_code, cfg.torch_dtype, what="reference model") if ref_path else None
    monitor = build_reward(cfg.monitor_reward_fn, None) if cfg.monitor_reward_fn else None
    trainer = Trainer(cfg, policy, tokenizer, reward, prompts, ref_policy=ref, accelerator=accelerator,
                      monitor_reward=monitor)
    trainer.eval_prompts = eval_prompts
    if checkpoint is not None:
        load_training_state(trainer, checkpoint)
    return trainer


def _eval_prompts(cfg: TrainConfig, tokenizer):
    if cfg.eval_dataset is None:
        return None
    prompts = load_prompts(cfg.eval_dataset, tokenizer, column=cfg.prompt_column)
    return _subset(prompts, range(min(len(prompts), cfg.eval_max_prompts or len(prompts))))


def run_train(cfg: TrainConfig) -> Path:
    inputs = {f: getattr(cfg, f) for f in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path",
                                          "reward_model", "dataset", "eval_dataset")}
    checkpoint = _resume_point(cfg) if cfg.resume else None
    resuming = checkpoint is not None
    with run_directory(cfg.output_dir, cfg.overwrite or resuming, inputs, clean_up=not resuming) as out:
        return _train_into(cfg, out, checkpoint)


def _resume_point(cfg: TrainConfig) -> Path | None:
    return resume_point(cfg.output_dir, dataclasses.asdict(cfg), RESUMABLE_CHANGES)


def _train_into(cfg: TrainConfig, out: Path, checkpoint: Path | None = None) -> Path:
    trainer = build_trainer(cfg, checkpoint)
    cfg, acc = trainer.cfg, trainer.accelerator  # the config as resolved (e.g. max_steps from --num_train_epochs)
    acc.wait_for_everyone()  # every process has checked the output directory before anything is written
    writers, resumed_at = {}, trainer.state.step
    if acc.is_main_process:
        if checkpoint is not None:  # drop what the run wrote after its checkpoint
            for name in ("metrics.jsonl", "completions.jsonl", "eval.jsonl"):
                truncate_jsonl(out / name, resumed_at)
        write_yaml(out / "config.yaml", dataclasses.asdict(cfg))
        writers = {name: JsonlWriter(out / f"{name}.jsonl", append=checkpoint is not None)
                   for name in ("metrics", "completions")}
        log.info(_start_line(trainer))
        _warn_about_inputs(trainer)
    start_trackers(acc, cfg)
    evaluator = (HeldOutEvaluator(trainer, out / "eval.jsonl", append=checkpoint is not None)
                 if trainer.eval_prompts else None)
    if evaluator is not None and checkpoint is None:
        evaluator(step=0)  # the starting point: KL 0, the initial policy's rewards
    watch, stop = OverOptimisationWatch(), StopRequest()
    bar = _progress_bar(cfg, disable=not acc.is_main_process, initial=resumed_at)

    def on_step(metrics, texts):
        shown = {name: f"{metrics[name]:.3f}" for name in ("reward", "kl", "reward_accuracy") if name in metrics}
        bar.set_postfix(**shown, pairs_s=f"{metrics['pairs_per_s']:.1f}", refresh=False)  # drawn by update, at its pace
        bar.update(1)
        acc.log(metrics, step=metrics["step"])
        step = metrics["step"]
        evaluation = (evaluator(step) if evaluator is not None
                      and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps) else None)
        if writers:
            _write_step(metrics, texts, evaluation)
        stopping = stop.agreed(acc.device)
        if step < cfg.max_steps and ((cfg.save_steps and step % cfg.save_steps == 0) or stopping):
            path = save_checkpoint(trainer, out, cfg.save_total_limit)
            if stopping:
                raise stop.interrupted(step, path)

    def _write_step(metrics, texts, evaluation: str | None):
        writers["metrics"].write(metrics)
        if "monitor_reward" in metrics and (warning := watch.update(metrics["reward"], metrics["monitor_reward"])):
            bar.write(f"WARNING step {metrics['step']}: {warning}")
        if evaluation is not None:
            bar.write(evaluation)
        if metrics["step"] % cfg.logging_steps == 0 or metrics["step"] == cfg.max_steps:
            bar.write(_summary_line(metrics))
            for record in _completion_records(metrics["step"], texts, cfg.log_completions):
                writers["completions"].write(record)

    try:
        with stop.installed():
            trainer.train(on_step)
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()
        if evaluator is not None:
            evaluator.close()
        finish_trackers(acc)
    acc.wait_for_everyone()
    if is_lora(trainer.unwrapped_policy):
        _save_lora_policy(trainer, out)
    else:
        _save_policy(trainer, out)
    return out


def _save_policy(trainer: Trainer, out: Path) -> None:
    acc = trainer.accelerator
    state_dict = acc.get_state_dict(trainer.policy) or {}  # a collective under FSDP/ZeRO-3 (None off the main process)
    extra = {}
    if trainer.algorithm.value_head:  # the policy directory stays a plain causal LM; the critic sits beside it
        state_dict, extra[VALUE_HEAD_FILE] = split_state_dict(state_dict)
    if acc.is_main_process:
        _record_generation_ids(trainer)
        save_pretrained_atomically(trainer.unwrapped_policy, trainer.tokenizer, out, state_dict=state_dict,
                                   extra_tensors=extra)
        log.info("saved the trained policy to %s", out)


def _save_lora_policy(trainer: Trainer, out: Path) -> None:
    """The adapter under adapter/, then the merged model as the run's policy (a plain causal LM).
    Merging changes the weights in place, so this is the last thing a run does."""
    if not trainer.accelerator.is_main_process:
        return
    peft_model = trainer.unwrapped_policy
    _record_generation_ids(trainer)
    (out / ADAPTER_DIR).mkdir(exist_ok=True)
    save_pretrained_atomically(peft_model, None, out / ADAPTER_DIR)
    extra = {VALUE_HEAD_FILE: trainer.trained_module.value_head.state_dict()} if trainer.algorithm.value_head else {}
    save_pretrained_atomically(peft_model.merge_and_unload(), trainer.tokenizer, out, extra_tensors=extra)
    log.info("saved the trained policy (LoRA merged) to %s and its adapter to %s", out, out / ADAPTER_DIR)


class HeldOutEvaluator:
    """Evaluates the policy on --eval_dataset (KL to the reference, the reward, the monitor reward,
    length, with standard errors) and appends one line per evaluation to eval.jsonl. Every evaluation
    draws from the same seeded stream, so points along a run and across runs are comparable. Every
    process evaluates its share of the prompts (a collective: all call it); the main one writes."""

    SEED = 0

    def __init__(self, trainer: Trainer, path: Path, append: bool = False):
        acc = trainer.accelerator
        self.trainer = trainer
        self.writer = JsonlWriter(path, append) if acc.is_main_process else None
        self.watch = OverOptimisationWatch(patience=2)  # held-out points are few and each already averaged
        self.rewards = {name: r for name, r in (("reward", trainer.reward), ("monitor_reward", trainer.monitor_reward))
                        if r is not None}
        n, share = len(trainer.eval_prompts), math.ceil(len(trainer.eval_prompts) / acc.num_processes)
        self.first = min(n, acc.process_index * share)  # this process's contiguous share of the prompts
        self.prompts = _subset(trainer.eval_prompts, range(self.first, min(n, self.first + share)))
        self.real = len(self.prompts)
        if trainer.sharded:  # every forward is a collective: each process evaluates as many prompts (padded)
            self.prompts = _subset(trainer.eval_prompts, [*range(self.first, self.first + self.real),
                                                          *[0] * (share - self.real)])

    def __call__(self, step: int) -> str:
        from accelerate.utils import gather_object

        from p3o.eval.policy import evaluate_policy, summarise

        t, names = self.trainer, ["kl", "length", *self.rewards]
        samples = []
        if len(self.prompts):
            # Under autocast as in training, so the initial policy's KL is exactly 0 under bf16 too.
            with t.accelerator.autocast(), gathered(t.trained_module):
                samples = evaluate_policy(t.unwrapped_policy, t.ref_policy, t.tokenizer, self.prompts, self.rewards,
                                          t.cfg.max_new_tokens, seed=self.SEED, temperature=t.cfg.temperature,
                                          first_index=self.first, synced=t.sharded,
                                          max_prompt_length=t.max_prompt_length)["samples"][:self.real]
        if t.accelerator.num_processes > 1:
            samples = gather_object([{name: sample[name] for name in names} for sample in samples])
        point = {"step": step, **summarise(samples, names), "n": len(samples)}
        line = f"eval  step {step:>5}  " + "  ".join(
            f"{name} {point[name]:+.4f} ± {point[name + '_stderr']:.4f}" for name in ("kl", *self.rewards))
        if "monitor_reward" in point and "reward" in point and (warning := self.watch.update_block(Block(
                point["reward"], point["reward_stderr"], point["monitor_reward"], point["monitor_reward_stderr"]))):
            line += f"\nWARNING on the held-out prompts: {warning}"
        if self.writer is not None:
            self.writer.write(point)
        return line

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _subset(prompts, rows: list[int]):
    """The prompts at `rows` (a PromptDataset)."""
    return dataclasses.replace(prompts, rows=[prompts.rows[i] for i in rows], texts=[prompts.texts[i] for i in rows],
                               token_ids=[prompts.token_ids[i] for i in rows])


def _warn_about_inputs(trainer: Trainer) -> None:
    tokenizer, eos = trainer.tokenizer, trainer.eos_ids
    if eos:
        log.info("responses end at %s", ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in eos))
    else:
        log.warning("the tokenizer has no EOS token: every response runs to --max_new_tokens %d",
                    trainer.cfg.max_new_tokens)
    if trainer.long_prompts:
        log.warning("%d of %d prompts are longer than %d tokens (--max_prompt_length, by default the context "
                    "minus --max_new_tokens); they keep their last tokens, and their BOS", trainer.long_prompts,
                    len(trainer.prompts), trainer.max_prompt_length)


def _record_generation_ids(trainer: Trainer) -> None:
    """The saved model stops where training's responses stopped, under plain `generate` too."""
    config = trainer.unwrapped_policy.generation_config
    if trainer.eos_ids:
        config.eos_token_id = trainer.eos_ids[0] if len(trainer.eos_ids) == 1 else list(trainer.eos_ids)
    config.pad_token_id = trainer.tokenizer.pad_token_id


def _progress_bar(cfg: TrainConfig, disable: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, desc=f"p3o train {cfg.algo}", unit="step", mininterval=0.5,
                disable=disable or cfg.disable_progress_bar, dynamic_ncols=True)


def _start_line(trainer: Trainer) -> str:
    cfg, sizes = trainer.cfg, trainer.sizes
    params = sum(p.numel() for p in trainer.unwrapped_policy.parameters())
    trained = sum(p.numel() for p in trainer.unwrapped_policy.parameters() if p.requires_grad)
    extras = {"value_head": " with a value head", "greedy_baseline": " (+1 greedy)",
              "from_dataset": " from the data"}
    critic, greedy, given = (extras[f] if getattr(trainer.algorithm, f) else "" for f in extras)
    lora = f" ({trained:,} in LoRA adapters trained)" if trained < params else ""
    shared = f" ({sizes.local_pairs} in each of {sizes.processes} processes)" if sizes.processes > 1 else ""
    return (f"{cfg.algo}: {params:,}-parameter policy{lora}{critic}, {len(trainer.prompts)} prompts; per step "
            f"{sizes.pairs_per_step} prompts{shared} x {sizes.samples_per_prompt}{greedy} responses{given}, "
            f"{cfg.epochs} epochs of {sizes.minibatches_per_epoch} "
            f"minibatches of {sizes.minibatch_pairs} prompts; {sizes.optimizer_steps} optimiser steps in all")


def _completion_records(step: int, texts, count: int):
    """The first `count` prompts of the step with their responses and raw rewards."""
    k = len(texts.completions) // len(texts.prompts)
    for g, prompt in enumerate(texts.prompts[:count]):
        record = {"step": step, "prompt": prompt, "completions": texts.completions[g * k:(g + 1) * k]}
        if texts.rewards is not None:
            record["rewards"] = texts.rewards[g * k:(g + 1) * k]
        yield record


def _summary_line(m: dict) -> str:
    shown = [("reward", "+.4f"), ("kl", "+.4f"), ("loss", "+.4f"), ("clipfrac", ".3f"), ("reward_accuracy", ".3f"),
             ("value_loss", ".4f"), ("pairs_per_s", ".1f")]
    return f"step {m['step']:>5}  " + "  ".join(f"{name} {m[name]:{spec}}" for name, spec in shown if name in m)
