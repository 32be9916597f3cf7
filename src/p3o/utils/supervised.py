"""The supervised loop shared by `p3o sft` and `p3o rm`: epochs of shuffled minibatches, gradient
accumulation, AdamW with a schedule, a held-out evaluation after every epoch, on `accelerate`.

A stage supplies its examples (pre-tokenized dicts), `collate` (examples -> tensors), `units`
(examples -> how many loss terms they hold: completion tokens for SFT, pairs for RM), `loss`
(model, batch -> summed loss and stats), `eval_totals` (model, examples -> additive totals) and
`eval_metrics` (totals -> metrics).

On several processes (torchrun, accelerate launch) each optimiser step takes one global batch of
per_device_train_batch_size x gradient_accumulation_steps x processes examples, each process its
block of it, and the loss is divided by the whole batch's units, so the step is the one a single
process would take on that batch. The held-out examples are split between the processes too.

With --use_peft only LoRA adapters train (and a reward model's score head, whole); checkpoints hold
the adapter, and the run directory the merged model with the adapter under adapter/, as in
`p3o train`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from p3o.errors import UsageError
from p3o.options import option
from p3o.utils.distributed import (
    backward,
    check_supported,
    clip_and_step,
    configure_for_updates,
    full_optimizer_state,
    is_deepspeed,
    is_sharded,
    load_module_state,
    load_optimizer_state,
    make_accelerator,
    micro_batch,
    sum_across_processes,
)
from p3o.utils.seeding import generator


@dataclass
class SupervisedConfig:
    """Options shared by `p3o sft` and `p3o rm` (Hugging Face Trainer names where one exists)."""

    model_name_or_path: str | None = option(None, "Model to start from: a local directory, a hub name or a .gguf file. Python: or pass the model to the trainer.", required=True)
    dataset: str | None = option(None, "Training data: a .jsonl/.json/.parquet/.csv file or a `datasets` name. Python: or pass train_dataset to the trainer.", required=True)
    output_dir: str = option(None, "Run directory: final model, config.yaml, metrics.jsonl.", required=True)
    eval_dataset: str | None = option(None, "Held-out data; default: --eval_fraction of --dataset, set aside.")
    eval_fraction: float = option(0.05, "Share of --dataset held out when --eval_dataset is not given.")
    dataset_split: str = option("train", "Split to read from a `datasets` name.")
    dataset_config: str | None = option(None, "Configuration name of a `datasets` dataset.")
    tokenizer_name_or_path: str | None = option(None, "Tokenizer; defaults to the model's.")
    num_train_epochs: int | None = option(None, "Passes over the training data (default 1). Given with --max_steps, max_steps wins, as in transformers.")
    max_steps: int | None = option(None, "Optimiser steps to take in all (passing over the data as often as that needs); overrides --num_train_epochs, and the learning-rate schedule spans it.")
    per_device_train_batch_size: int = option(8, "Examples per forward/backward pass in each process (an optimiser step takes this x gradient_accumulation_steps x processes).")
    per_device_eval_batch_size: int = option(16, "Examples per evaluation forward pass.")
    gradient_accumulation_steps: int = option(1, "Forward/backward passes per optimiser step.")
    max_length: int = option(512, "Tokens per example; longer ones lose the start of the prompt.")
    learning_rate: float = option(5e-5, "AdamW learning rate (tiny models trained from scratch want ~1e-3).")
    lr_scheduler_type: str = option("linear", "A transformers scheduler name: linear, cosine, constant, ...")
    warmup_ratio: float = option(0.0, "Warm-up as a fraction of all optimiser steps.")
    warmup_steps: int = option(0, "Optimiser steps of linear warm-up (overrides --warmup_ratio when > 0).")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only).")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm; 0 disables it.")
    seed: int = option(42, "Seed for the held-out split, shuffling and any new weights.")
    logging_steps: int = option(10, "Write metrics every N optimiser steps.")
    eval_steps: int = option(0, "Also evaluate on the held-out set every N optimiser steps (0: only at each epoch's end and at the last step); into metrics.jsonl.")
    torch_dtype: str = option("float32", "Weights: float32, bfloat16, float16 or auto (as saved).")
    mixed_precision: str = option("no", "no, bf16 or fp16 (passed to accelerate).")
    trust_remote_code: bool = option(False, "Allow model repositories to run their own code. Off unless asked for.")
    use_peft: bool = option(False, "Train LoRA adapters (peft) instead of every weight; `p3o rm` trains the score head whole beside them. Saves the merged model (a plain model), and the adapter under adapter/. Not under FSDP or DeepSpeed.")
    lora_r: int = option(16, "LoRA rank (with --use_peft).")
    lora_alpha: float = option(32.0, "LoRA scale numerator: updates are scaled by lora_alpha / lora_r (with --use_peft).")
    lora_target_modules: str = option("all-linear", "Modules that get adapters: all-linear (every linear layer but the output head) or comma-separated names such as q_proj,v_proj (with --use_peft).")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass instead of storing them: less memory for longer sequences and bigger batches, at about one more forward's time; the same gradient.")
    report_to: str = option("none", "Also log metrics to: none, tensorboard, wandb, ... (comma-separated).")
    overwrite: bool = option(False, "Allow a non-empty output_dir; files of the same name are replaced.")
    disable_progress_bar: bool = option(False, "Hide the progress bar.")
    save_steps: int = option(0, "Write a checkpoint (weights, optimiser, scheduler, RNG, position) every N optimiser steps into output_dir/checkpoint-N; 0: only on Ctrl-C/SIGTERM.")
    save_total_limit: int | None = option(None, "Keep only the newest N checkpoints (default: all).")
    resume: bool = option(False, "Continue from the latest complete checkpoint in --output_dir, exactly as if never stopped (same settings required).")
    max_consecutive_skips: int = option(5, "Stop when this many optimiser steps in a row are skipped for a non-finite loss or gradient.")

    # `--help` groups the flags by these sections (a subclass's own fields go under "data").
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("model_name_or_path", "tokenizer_name_or_path", "torch_dtype", "mixed_precision",
                  "trust_remote_code", "use_peft", "lora_r", "lora_alpha", "lora_target_modules",
                  "gradient_checkpointing"),
        "data": ("dataset", "eval_dataset", "eval_fraction", "dataset_split", "dataset_config", "max_length",
                 "prompt_column", "completion_column", "chosen_column", "rejected_column"),
        "optimisation": ("num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                         "warmup_steps", "weight_decay", "max_grad_norm", "max_consecutive_skips", "seed"),
        "logging": ("logging_steps", "eval_steps", "report_to", "disable_progress_bar"),
        "checkpoints": ("output_dir", "overwrite", "save_steps", "save_total_limit", "resume"),
    }

    def __post_init__(self) -> None:
        if not self.output_dir:  # the model and the data may come as objects (the Python API)
            raise UsageError("--output_dir is required")
        if self.max_steps is not None and self.num_train_epochs is not None:
            logging.getLogger("p3o").warning("--max_steps %d and --num_train_epochs %g: max_steps wins (as in "
                                             "transformers)", self.max_steps, self.num_train_epochs)
            self.num_train_epochs = None
        elif self.max_steps is None and self.num_train_epochs is None:
            self.num_train_epochs = 1
        for name in ("num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_length", "logging_steps", "max_consecutive_skips", "lora_r"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        checks = [
            (0 < self.eval_fraction < 1, "--eval_fraction must be in (0, 1)"),
            (self.learning_rate > 0, "--learning_rate must be > 0"),
            (0 <= self.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
            (self.warmup_steps >= 0, "--warmup_steps must be >= 0"),
            (self.eval_steps >= 0, "--eval_steps must be >= 0 (0: evaluate at each epoch's end only)"),
            (self.lora_alpha > 0, "--lora_alpha must be > 0"),
            (self.max_grad_norm >= 0, "--max_grad_norm must be >= 0 (0 disables clipping)"),
            (self.torch_dtype in ("float32", "bfloat16", "float16", "auto"), "--torch_dtype must be float32, bfloat16, float16 or auto"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "--mixed_precision must be no, bf16 or fp16"),
            (self.save_steps >= 0, "--save_steps must be >= 0"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "--save_total_limit must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


# Settings a resumed run may change; any other difference would change its course.
# The per-process batch settings may change (to resume on another number of processes) as long as
# the global batch stays the same; `fit` checks that.
RESUMABLE_CHANGES = {"output_dir", "save_steps", "save_total_limit", "resume", "overwrite", "logging_steps", "disable_progress_bar",
                     "report_to", "max_consecutive_skips", "per_device_eval_batch_size", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "eval_steps"}


@dataclass
class Stage:
    """What a supervised stage plugs into `fit`."""

    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    units: Callable[[list[dict]], float]
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
    eval_totals: Callable[[torch.nn.Module, list[dict]], dict[str, float]]  # sums, added up over processes
    eval_metrics: Callable[[dict[str, float]], dict[str, float]]


@dataclass
class FitState:
    """Where a supervised run is: saved in every checkpoint as trainer_state.json."""

    step: int = 0  # optimiser steps taken (including skipped ones): the data position
    examples_per_step: int = 0  # the global batch, which a resumed run must keep (0: not recorded)
    skipped_updates: int = 0
    consecutive_skips: int = 0
    evaluations: list = dataclasses.field(default_factory=list)


def total_steps(cfg: SupervisedConfig, examples: int, processes: int) -> tuple[int, int]:
    """(optimiser steps per pass over `examples`, optimiser steps of the whole run)."""
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes  # global
    steps_per_epoch = math.ceil(examples / batch)
    return steps_per_epoch, cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.num_train_epochs


def fit(cfg: SupervisedConfig, model, train: list[dict], held_out: list[dict], stage: Stage, accelerator,
        on_log: Callable[[dict], None], out=None, checkpoint=None, stop=None, peft_model=None) -> tuple[list[dict], object]:
    """Train `model` in place; `on_log` gets every step's metrics and each evaluation; returns the
    evaluations (after each epoch, at the last step and every `eval_steps`), and the model as prepared
    (under DeepSpeed an engine around it). With `out`, checkpoints go there every `save_steps` and
    when `stop` is requested; with `checkpoint`, training continues from it exactly. `peft_model`:
    the LoRA model inside `model`, whose adapter the checkpoints hold instead of the whole weights."""
    from transformers import get_scheduler

    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes  # global
    steps_per_epoch, total = total_steps(cfg, len(train), accelerator.num_processes)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.learning_rate)
    configure_for_updates(accelerator, cfg.per_device_train_batch_size, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    state = (_load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler, peft_model) if checkpoint
             else FitState())
    state.examples_per_step = batch
    start = time.perf_counter()

    def save_if_due() -> None:  # after the step's evaluation, which the checkpoint then holds
        stopping = stop is not None and stop.agreed(accelerator.device)
        due = (cfg.save_steps and state.step % cfg.save_steps == 0) or stopping
        if out is None or not due or state.step >= total:
            return
        path = _save_checkpoint(out, cfg, state, accelerator, model, optimizer, scheduler, peft_model)
        if stopping:
            raise stop.interrupted(state.step, path)

    def evaluate(epoch) -> None:
        model.eval()
        metrics = _evaluate(stage, accelerator, model, held_out)
        model.train()
        state.evaluations.append({"step": state.step, "epoch": epoch, **metrics})
        on_log(state.evaluations[-1])

    for epoch in range(math.ceil(total / steps_per_epoch)):
        model.train()
        order = torch.randperm(len(train), generator=generator(cfg.seed, "supervised-shuffle", epoch)).tolist()
        for index, first in enumerate(range(0, len(train), batch)):
            position = epoch * steps_per_epoch + index
            if position >= total:
                break
            if position < state.step:
                continue  # taken before the checkpoint this run resumed from
            examples = [train[i] for i in order[first:first + batch]]
            stats = _optimizer_step(cfg, model, optimizer, scheduler, examples, stage, accelerator, state)
            state.step += 1
            on_log({"step": state.step, "epoch": state.step / steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                    "elapsed": time.perf_counter() - start, **stats})
            if index == steps_per_epoch - 1:
                evaluate(epoch + 1)
            elif state.step == total or (cfg.eval_steps and state.step % cfg.eval_steps == 0):
                evaluate(state.step / steps_per_epoch)
            save_if_due()
    return state.evaluations, model


def _check_same_global_batch(saved: int, cfg: SupervisedConfig, processes: int, checkpoint) -> None:
    """A run resumes on any number of processes if its optimiser steps keep their size (`saved`)."""
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    if saved and saved != batch:
        raise UsageError(
            f"{checkpoint} was written with {saved} examples per optimiser step, but --per_device_train_batch_size "
            f"{cfg.per_device_train_batch_size} x --gradient_accumulation_steps {cfg.gradient_accumulation_steps} x "
            f"{processes} processes make {batch}; set the two flags so that they make {saved} on {processes} processes")


def _share(examples: list, part: int, parts: int) -> list:
    """The `part`-th of `parts` near-equal contiguous blocks of `examples`."""
    size = math.ceil(len(examples) / parts)
    return examples[part * size:(part + 1) * size]


@torch.no_grad()
def _evaluate(stage: Stage, accelerator, model, held_out: list[dict]) -> dict[str, float]:
    """Each process its share of the held-out examples; totals added up over the processes. Under
    FSDP every forward is a collective, so every process evaluates all of them instead."""
    if is_sharded(accelerator):
        return stage.eval_metrics(stage.eval_totals(accelerator.unwrap_model(model), held_out))
    share = _share(held_out, accelerator.process_index, accelerator.num_processes)
    totals = stage.eval_totals(accelerator.unwrap_model(model), share)  # zeros for an empty share
    summed = sum_across_processes(torch.tensor(list(totals.values()), dtype=torch.float64, device=accelerator.device))
    return stage.eval_metrics(dict(zip(totals, summed.tolist())))


def _save_checkpoint(out, cfg, state: FitState, accelerator, model, optimizer, scheduler, peft_model=None):
    from safetensors.torch import save_file

    from p3o.models.lora import save_adapter_state
    from p3o.utils.checkpoints import STATE_FILE, rng_state, write_checkpoint
    from p3o.utils.io import atomic_write_text, without_aliases

    # FSDP, ZeRO-3: gathered whole (a collective); ZeRO-2: cloned. LoRA (never sharded): the adapter only.
    weights = accelerator.get_state_dict(model) if peft_model is None else None
    optimizer_state = full_optimizer_state(accelerator, model, optimizer)

    def write(tmp) -> None:
        if peft_model is not None:  # the frozen base is the model the run started from
            save_adapter_state(peft_model, tmp)
        else:
            save_file(without_aliases(accelerator.unwrap_model(model), weights), str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        atomic_write_text(tmp / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=1))  # last: marks it complete

    path = out / f"checkpoint-{state.step}"
    if accelerator.is_main_process:
        path = write_checkpoint(out, state.step, write, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return path


def _load_checkpoint(path, accelerator, model, optimizer, scheduler, peft_model=None) -> FitState:
    from safetensors.torch import load_file, load_model

    from p3o.models.lora import load_adapter
    from p3o.utils.checkpoints import STATE_FILE, set_rng_state

    if peft_model is not None:  # onto the base the run started from, as the checkpoint's was
        load_adapter(peft_model, path)
    elif is_sharded(accelerator) or is_deepspeed(accelerator):  # each its shard; DeepSpeed its fp32 master copy too
        load_module_state(accelerator, model, load_file(str(path / "model.safetensors")))
    else:
        load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"))
    load_optimizer_state(accelerator, model, optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return FitState(**json.loads((path / STATE_FILE).read_text()))


def _optimizer_step(cfg, model, optimizer, scheduler, examples: list[dict], stage: Stage, accelerator,
                    state: FitState) -> dict[str, float]:
    """One optimiser step over the global batch `examples`: this process takes its block, in
    micro-batches. The loss is divided by the units (tokens or pairs) of the whole global batch (DDP
    averages over processes, hence the factor), so accumulation and processes equal one large batch.
    A non-finite loss or gradient on any process skips the step on all; `max_consecutive_skips` of
    them in a row stop the run."""
    processes, size = accelerator.num_processes, cfg.per_device_train_batch_size
    local = _share(examples, accelerator.process_index, processes)
    counted = [(local[i:i + size], 1.0) for i in range(0, len(local), size)]
    # Every process runs as many micro-batches (under FSDP each forward is a collective): one left
    # short (the epoch's last batch) adds weight-0 ones, a zero gradient.
    most = math.ceil(math.ceil(len(examples) / processes) / size)
    parts = counted + [(examples[:1], 0.0)] * (most - len(counted))
    normaliser = stage.units(examples) / processes
    total, stats = 0.0, {}
    for i, (part, weight) in enumerate(parts):
        last = i == len(parts) - 1
        with micro_batch(accelerator, model, last):
            with accelerator.autocast():
                loss_sum, part_stats = stage.loss(model, {k: v.to(accelerator.device) for k, v in stage.collate(part).items()})
                loss = loss_sum * (weight / normaliser)
            backward(accelerator, model, loss, last)
        total += loss.item()
        for name, value in part_stats.items():
            stats[name] = stats.get(name, 0.0) + weight * value * len(part)
    grad_norm, stepped = clip_and_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, math.isfinite(total))
    # The loss (each process holds its share) and the statistics (weighted by examples), summed.
    names = sorted(stats)
    summed = sum_across_processes(torch.tensor([total, len(local), *(stats[n] for n in names)], dtype=torch.float64,
                                               device=accelerator.device)).tolist()
    total, counted = summed[0] / processes, summed[1]
    stats = {n: v / counted for n, v in zip(names, summed[2:])}
    if stepped:
        state.consecutive_skips = 0
    else:
        state.skipped_updates += 1
        state.consecutive_skips += 1
        if state.consecutive_skips >= cfg.max_consecutive_skips:
            raise UsageError(f"{state.consecutive_skips} optimiser steps in a row had a non-finite loss or gradient "
                             f"(step {state.step + 1}); training has diverged. Lower --learning_rate, then resume from "
                             "the last good checkpoint with --resume (or start again)")
    return {"loss": total, "grad_norm": grad_norm, "skipped_updates": state.skipped_updates, **stats}


def run_stage(cfg: SupervisedConfig, model, tokenizer, train: list[dict], held_out: list[dict], stage: Stage, out,
              title: str, saved_model=None, checkpoint=None) -> list[dict]:
    """Everything around `fit` for one command: accelerate, gradient checkpointing and LoRA as asked
    for, config.yaml, metrics.jsonl (every `logging_steps` steps and every evaluation), a progress
    bar, and the saved model and tokenizer (LoRA: merged, the adapter under adapter/)."""
    from tqdm.auto import tqdm

    from p3o.models.lora import ADAPTER_DIR, merged_lora_state_dict
    from p3o.utils.checkpoints import STATE_FILE, StopRequest
    from p3o.utils.io import (
        JsonlWriter,
        save_pretrained_atomically,
        truncate_jsonl,
        write_yaml,
    )
    from p3o.utils.tracking import check_trackers, finish_trackers, start_trackers

    if not train:
        raise UsageError(f"{cfg.dataset or 'train_dataset'} leaves no training examples after the held-out split")
    trackers = check_trackers(cfg.report_to)
    acc = make_accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers or None, project_dir=str(out))
    check_supported(acc)
    if cfg.use_peft and (is_sharded(acc) or is_deepspeed(acc)):
        raise UsageError("--use_peft is not supported under FSDP or DeepSpeed yet; launch with configs/accelerate/ddp.yaml")
    model, peft_model = prepare_model(cfg, model, saved_model)
    acc.wait_for_everyone()
    saved = json.loads((checkpoint / STATE_FILE).read_text()) if checkpoint else {}
    _check_same_global_batch(saved.get("examples_per_step", 0), cfg, acc.num_processes, checkpoint)  # before any write
    writer, done = None, saved.get("step", 0)
    if acc.is_main_process:
        if checkpoint is not None:
            truncate_jsonl(out / "metrics.jsonl", done)  # what the run wrote after its checkpoint goes
        write_yaml(out / "config.yaml", dataclasses.asdict(cfg))
        writer = JsonlWriter(out / "metrics.jsonl", append=checkpoint is not None)
    start_trackers(acc, cfg)
    total = total_steps(cfg, len(train), acc.num_processes)[1]
    bar = tqdm(total=total, initial=done, desc=title, unit="step", mininterval=0.5, dynamic_ncols=True,
               disable=not acc.is_main_process or cfg.disable_progress_bar)

    def on_log(metrics):
        acc.log(metrics, step=metrics["step"])
        if "loss" in metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)  # drawn by update, at its pace
            bar.update(1)
        if writer is not None and ("loss" not in metrics or metrics["step"] % cfg.logging_steps == 0):
            writer.write(metrics)
        if "loss" not in metrics and acc.is_main_process:  # an evaluation
            bar.write(f"{title} step {metrics['step']} (epoch {metrics['epoch']:.3g}): " + "  ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_")))

    stop = StopRequest()
    try:
        with stop.installed():
            evaluations, prepared = fit(cfg, model, train, held_out, stage, acc, on_log, out=out, checkpoint=checkpoint,
                                        stop=stop, peft_model=peft_model)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        finish_trackers(acc)
    acc.wait_for_everyone()
    if peft_model is not None:  # a plain model: the adapters merged (out of place), the head's trained copy
        model, state_dict = peft_model.get_base_model(), merged_lora_state_dict(peft_model) if acc.is_main_process else {}
    else:
        trained = acc.unwrap_model(prepared)
        state_dict = _gathered_weights(acc, prepared, saved_model or trained)
        model = saved_model if saved_model is not None else trained
    if acc.is_main_process:
        if peft_model is not None:
            (out / ADAPTER_DIR).mkdir(exist_ok=True)
            save_pretrained_atomically(peft_model, None, out / ADAPTER_DIR)
        if getattr(model, "generation_config", None) is not None:  # generate stops where the data's replies end
            from p3o.data.turns import stop_token_ids

            stops = stop_token_ids(tokenizer)
            model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        save_pretrained_atomically(model, tokenizer, out, state_dict=state_dict)
    return evaluations


def prepare_model(cfg: SupervisedConfig, model, saved=None):
    """--gradient_checkpointing and --use_peft on the module to train (`model`) whose transformers
    model is `saved` (a reward model's classifier inside its scorer) or `model` itself. Returns the
    module to train (a causal LM: its peft model) and the peft model (None without LoRA). A
    classifier's adapters go on its trunk; its head (`score`) is trained whole, as peft's
    `modules_to_save`."""
    from p3o.models.lora import add_lora, is_lora

    hf_model = saved if saved is not None else model
    if cfg.gradient_checkpointing:  # acts in training mode only: evaluation keeps its activations
        kwargs = {"use_reentrant": False}
        if hasattr(hf_model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not cfg.use_peft:
        return model, None
    if is_lora(hf_model):
        raise UsageError("the model already has LoRA adapters; give a plain model or drop --use_peft")
    if saved is None:
        model = peft_model = add_lora(hf_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules)
    else:
        heads = [name for name, child in hf_model.named_children()
                 if name != hf_model.base_model_prefix and any(True for _ in child.parameters())]
        if not heads:
            raise UsageError(f"{type(hf_model).__name__} has no head beside its trunk for --use_peft to train")
        # In place: the scorer around the classifier now runs its adapters and the head's trained copy.
        peft_model = add_lora(hf_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, task_type="SEQ_CLS",
                              modules_to_save=heads)
    if cfg.gradient_checkpointing:  # the frozen embeddings' output must carry a gradient through the recompute
        hf_model.enable_input_require_grads()
    return model, peft_model


def _gathered_weights(acc, model, saved) -> dict:
    """The whole state dict of `saved` (the trained module or a part of it, as the reward model's
    classifier inside its scorer), gathered from the shards under FSDP and ZeRO-3 (a collective: all
    call it) and copied out of DeepSpeed's flat buffers under ZeRO-2."""
    state_dict = acc.get_state_dict(model) or {}  # ZeRO-3: on the main process only
    trained = acc.unwrap_model(model)
    if saved is trained:
        return state_dict
    prefix = next(name for name, module in trained.named_modules() if module is saved) + "."
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def _fit_context(cfg: SupervisedConfig, model) -> None:
    """--max_length beyond the model's context would crash the forward pass: cap it in `cfg` (which
    the stage's tokenizer reads), and say so."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context is None or cfg.max_length <= context:
        return
    logging.getLogger("p3o").warning("--max_length %d exceeds the model's context of %d tokens; using %d: examples "
                                     "longer than that lose the start of their prompt", cfg.max_length, context, context)
    cfg.max_length = context


def run_supervised(cfg: SupervisedConfig, title: str, load_rows: Callable, tokenize: Callable, build_model: Callable,
                   make_stage: Callable[[object, int], Stage], tokenizer=None, data_name: str | None = None) -> list[dict]:
    """One supervised command from its config: check the output directory, load the tokenizer and
    the (train, held-out) rows, tokenize them, build the model, and `run_stage`.

    load_rows(cfg) -> (train rows, held-out rows); tokenize(tokenizer, row, where) -> example;
    build_model(cfg, tokenizer) -> (module to train, model to save). `tokenizer`: one given in
    Python (else loaded from the config); `data_name`: how errors name data given as an object."""
    import yaml
    from accelerate.utils import set_seed

    from p3o.models.loading import _check_exists, load_tokenizer, prepare_tokenizer
    from p3o.utils.checkpoints import check_resumable, resume_point
    from p3o.utils.io import run_directory

    inputs = {"model_name_or_path": cfg.model_name_or_path, "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
              "dataset": cfg.dataset, "eval_dataset": cfg.eval_dataset}
    checkpoint = resume_point(cfg.output_dir, None, RESUMABLE_CHANGES) if cfg.resume else None  # checked below
    with run_directory(cfg.output_dir, cfg.overwrite or checkpoint is not None, inputs, clean_up=checkpoint is None) as out:
        set_seed(cfg.seed)  # also seeds any new weights, such as a reward head
        if tokenizer is None:
            _check_exists(cfg.model_name_or_path, "model")  # named as the model, not as its tokenizer
            tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code)
        else:
            tokenizer = prepare_tokenizer(tokenizer)
        train_rows, eval_rows = load_rows(cfg)
        model, saved = build_model(cfg, tokenizer)
        _fit_context(cfg, saved if saved is not None else model)
        if checkpoint is not None and (out / "config.yaml").is_file():  # against the settings as the run used them
            check_resumable(yaml.safe_load((out / "config.yaml").read_text()), dataclasses.asdict(cfg), RESUMABLE_CHANGES)
        name = data_name or cfg.dataset
        train = [tokenize(tokenizer, row, f"{name}: row {i + 1}") for i, row in enumerate(train_rows)]
        held_out = [tokenize(tokenizer, row, f"held-out row {i + 1}") for i, row in enumerate(eval_rows)]
        if cut := sum(bool(example.pop("cut", False)) for example in train + held_out):
            logging.getLogger("p3o").warning("%d of %d examples are longer than --max_length %d and lose the start of "
                                             "their prompt (SFT keeps at least a quarter of the budget for it)", cut,
                                             len(train) + len(held_out), cfg.max_length)
        stage = make_stage(tokenizer, cfg.per_device_eval_batch_size)
        return run_stage(cfg, model, tokenizer, train, held_out, stage, out, title, saved_model=saved,
                         checkpoint=checkpoint)
