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

The optimiser, the micro-batch step, the non-finite guard and the checkpoint's training state are
the core's, shared with `p3o train` (`p3o.core.optimizer`, `.step`, `.skips`, `.checkpoint`); the
command around `fit` (run directory, LoRA, the saved model) is `p3o.core.supervised_run`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from p3o.core.checkpoint import RESUMABLE_RUN_SETTINGS, load_training_checkpoint, save_training_checkpoint
from p3o.core.optimizer import adamw, lr_scheduler
from p3o.core.skips import count_skip
from p3o.core.step import accumulate_and_step
from p3o.errors import UsageError
from p3o.models.lora import load_adapter, save_adapter_state
from p3o.options import hints_unknown_options, option
from p3o.utils.distributed import (
    configure_for_updates,
    is_deepspeed,
    is_sharded,
    load_module_state,
    sum_across_processes,
)
from p3o.utils.io import save_pretrained_atomically
from p3o.utils.seeding import generator
from p3o.utils.tracking import joined_names


@hints_unknown_options
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
    num_train_epochs: float | None = option(None, "Passes over the training data (default 1); a fraction takes that share of a pass's steps (rounded up), as in transformers. Given with --max_steps, max_steps wins, as in transformers.")
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
    lora_target_modules: str = option("all-linear", "Modules that get adapters: all-linear (every linear layer but the output head) or comma-separated names such as q_proj,v_proj (with --use_peft).", comma_list=True)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass instead of storing them: less memory for longer sequences and bigger batches, at about one more forward's time; the same gradient.")
    report_to: str = option("none", "Also log metrics to: none, tensorboard, wandb, ... (comma-separated).", comma_list=True,
                             none_is="none")
    overwrite: bool = option(False, "Allow a non-empty output_dir: files of the same name are replaced, and the checkpoints of the run that was there removed (other files are kept).")
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
                 "prompt_column", "completion_column", "assistant_turns", "completion_only_loss", "chosen_column",
                 "rejected_column", "group_by_prompt"),
        "optimisation": ("num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                         "warmup_steps", "weight_decay", "max_grad_norm", "center_rewards_coefficient",
                         "max_consecutive_skips", "seed"),
        "logging": ("logging_steps", "eval_steps", "report_to", "disable_progress_bar"),
        "checkpoints": ("output_dir", "overwrite", "save_steps", "save_total_limit", "resume"),
    }

    def __post_init__(self) -> None:
        if not self.output_dir:  # the model and the data may come as objects (the Python API)
            raise UsageError("--output_dir is required")
        self.report_to = joined_names(self.report_to)  # TRL's list of trackers
        if self.max_steps == -1:  # transformers' "unset" (TRL's configs carry it): the epochs decide
            self.max_steps = None
        if self.max_steps is not None and self.num_train_epochs is not None:
            logging.getLogger("p3o").warning("--max_steps %d and --num_train_epochs %g: max_steps wins (as in "
                                             "transformers)", self.max_steps, self.num_train_epochs)
            self.num_train_epochs = None
        elif self.max_steps is None and self.num_train_epochs is None:
            self.num_train_epochs = 1
        if self.num_train_epochs is not None and not 0 < self.num_train_epochs < math.inf:
            raise UsageError(f"--num_train_epochs must be > 0 and finite, got {self.num_train_epochs}")
        for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_length", "logging_steps", "max_consecutive_skips", "lora_r"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        checks = [
            (0 < self.eval_fraction < 1, "--eval_fraction must be in (0, 1)"),
            (self.learning_rate > 0, "--learning_rate must be > 0"),
            (0 <= self.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
            (self.warmup_steps >= 0, "--warmup_steps must be >= 0"),
            (self.weight_decay >= 0, "--weight_decay must be >= 0"),
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
# the global batch stays the same; `run_stage` checks that.
RESUMABLE_CHANGES = RESUMABLE_RUN_SETTINGS | {"per_device_eval_batch_size", "per_device_train_batch_size",
                                              "gradient_accumulation_steps"}


@dataclass
class Stage:
    """What a supervised stage plugs into `fit`."""

    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    units: Callable[[list[dict]], float]
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
    eval_totals: Callable[[torch.nn.Module, list[dict]], dict[str, float]]  # sums, added up over processes
    eval_metrics: Callable[[dict[str, float]], dict[str, float]]
    # The training examples' order for one epoch from its generator; None: a uniform shuffle.
    order: Callable[[list[dict], torch.Generator], list[int]] | None = None


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
    if cfg.max_steps is not None:
        return steps_per_epoch, cfg.max_steps
    return steps_per_epoch, max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))  # 0.5: half a pass


def fit(cfg: SupervisedConfig, model, train: list[dict], held_out: list[dict], stage: Stage, accelerator,
        on_log: Callable[[dict], None], out=None, checkpoint=None, stop=None, peft_model=None, saved_model=None,
        tokenizer=None) -> tuple[list[dict], object]:
    """Train `model` in place; `on_log` gets every step's metrics and each evaluation; returns the
    evaluations (after each epoch, at the last step and every `eval_steps`), and the model as prepared
    (under DeepSpeed an engine around it). With `out`, checkpoints go there every `save_steps` and
    when `stop` is requested; with `checkpoint`, training continues from it exactly. `peft_model`:
    the LoRA model inside `model`, whose adapter the checkpoints hold instead of the whole weights.
    A checkpoint's weights are a model transformers loads: `saved_model` (the transformers model inside
    `model`, if not `model` itself) with `tokenizer`."""
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes  # global
    steps_per_epoch, total = total_steps(cfg, len(train), accelerator.num_processes)
    optimizer = adamw(model, cfg.learning_rate, cfg.weight_decay)
    configure_for_updates(accelerator, cfg.per_device_train_batch_size, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = lr_scheduler(cfg.lr_scheduler_type, optimizer, total, cfg.warmup_steps, cfg.warmup_ratio)
    state = (_load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler, peft_model, saved_model)
             if checkpoint else FitState())
    state.examples_per_step = batch
    start = time.perf_counter()

    def save_if_due() -> None:  # after the step's evaluation, which the checkpoint then holds
        finishing = state.step >= total  # then the final save follows
        stopping = stop is not None and stop.agreed(accelerator.device) and not finishing
        # With --save_steps, the last step too (as transformers): a finished run extends with --resume.
        due = (cfg.save_steps and (state.step % cfg.save_steps == 0 or finishing)) or stopping
        if out is None or not due:
            return
        path = _save_checkpoint(out, cfg, state, accelerator, model, optimizer, scheduler, peft_model,
                                (saved_model, tokenizer))
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
        shuffle = generator(cfg.seed, "supervised-shuffle", epoch)
        order = stage.order(train, shuffle) if stage.order else torch.randperm(len(train), generator=shuffle).tolist()
        for index, first in enumerate(range(0, len(train), batch)):
            position = epoch * steps_per_epoch + index
            if position >= total:
                break
            if position < state.step:
                continue  # taken before the checkpoint this run resumed from
            examples = [train[i] for i in order[first:first + batch]]
            lr = scheduler.get_last_lr()[0]  # the rate this step applies, as transformers logs it
            stats = _optimizer_step(cfg, model, optimizer, scheduler, examples, stage, accelerator, state)
            state.step += 1
            on_log({"step": state.step, "epoch": state.step / steps_per_epoch, "lr": lr,
                    "elapsed": time.perf_counter() - start, **stats})
            if index == steps_per_epoch - 1:
                evaluate(epoch + 1)
            elif state.step == total or (cfg.eval_steps and state.step % cfg.eval_steps == 0):
                evaluate(state.step / steps_per_epoch)
            save_if_due()
    return state.evaluations, model


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


def _save_checkpoint(out, cfg, state: FitState, accelerator, model, optimizer, scheduler, peft_model=None,
                     as_model=(None, None)):
    """checkpoint-<step>: the weights as a loadable model (`as_model`: the transformers model inside
    `model`, or None for `model` itself, and the tokenizer), or under LoRA the adapter; then the
    optimiser, scheduler, RNG and `state`."""
    # FSDP, ZeRO-3: gathered whole (a collective); ZeRO-2: cloned. LoRA (never sharded): the adapter only.
    weights = accelerator.get_state_dict(model) if peft_model is None else None
    trained, (saved, tokenizer) = accelerator.unwrap_model(model), as_model

    def write_weights(tmp) -> None:
        if peft_model is not None:  # the frozen base is the model the run started from
            save_adapter_state(peft_model, tmp)
        else:
            hf_model = saved if saved is not None else trained
            save_pretrained_atomically(hf_model, tokenizer, tmp, state_dict=part_state(trained, hf_model, weights))

    return save_training_checkpoint(out, state.step, dataclasses.asdict(state), accelerator, model, optimizer,
                                    scheduler, write_weights, cfg.save_total_limit)


def part_state(trained, part, state_dict: dict) -> dict:
    """The entries of `trained`'s `state_dict` that belong to its submodule `part`, named as in `part`
    (a reward model's classifier inside the scorer that trains it)."""
    if part is trained:
        return state_dict
    prefix = next(name for name, module in trained.named_modules() if module is part) + "."
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def _load_checkpoint(path, accelerator, model, optimizer, scheduler, peft_model=None, saved_model=None) -> FitState:
    from safetensors.torch import load_file

    if peft_model is not None:  # onto the base the run started from, as the checkpoint's was
        load_adapter(peft_model, path)
    else:
        state = {k: v for file in sorted(path.glob("model*.safetensors")) for k, v in load_file(str(file)).items()}
        trained = accelerator.unwrap_model(model)
        if saved_model is not None and saved_model is not trained and state.keys() <= saved_model.state_dict().keys():
            prefix = next(name for name, module in trained.named_modules() if module is saved_model) + "."
            state = {prefix + k: v for k, v in state.items()}  # the saved model's names, back into the trainer's
            # (checkpoints written before 2026-12-07 hold the trainer's own names)
        names = {n for n, _ in trained.named_parameters()}
        tied = {n for n, _ in trained.named_parameters(remove_duplicate=False)} - names  # saved once
        if missing := sorted(set(trained.state_dict()) - set(state) - tied):
            raise UsageError(f"{path} lacks weights for {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; "
                             "resume from another checkpoint (or start again with --overwrite)")
        load_module_state(accelerator, model, state)  # each process its shard; DeepSpeed its fp32 master copy too
    return FitState(**load_training_checkpoint(path, accelerator, model, optimizer, scheduler))


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

    def part_loss(weighted):
        part, weight = weighted
        loss_sum, part_stats = stage.loss(model, {k: v.to(accelerator.device) for k, v in stage.collate(part).items()})
        return loss_sum * (weight / normaliser), {n: weight * v * len(part) for n, v in part_stats.items()}

    step = accumulate_and_step(accelerator, model, optimizer, scheduler, parts, part_loss, cfg.max_grad_norm)
    stats = {}
    for part_stats in step.extras:  # weighted by examples, summed
        for name, value in part_stats.items():
            stats[name] = stats.get(name, 0.0) + value
    # The loss (each process holds its share) and the statistics (weighted by examples), summed.
    names = sorted(stats)
    summed = sum_across_processes(torch.tensor([step.loss, len(local), *(stats[n] for n in names)], dtype=torch.float64,
                                               device=accelerator.device)).tolist()
    total, counted = summed[0] / processes, summed[1]
    stats = {n: v / counted for n, v in zip(names, summed[2:])}
    count_skip(state, step.stepped, cfg.max_consecutive_skips, state.step + 1)
    return {"loss": total, "grad_norm": step.grad_norm, "skipped_updates": state.skipped_updates, **stats}
