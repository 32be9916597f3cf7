"""One supervised command (`p3o sft`, `p3o rm`) around `p3o.core.supervised.fit`: the run directory
(config.yaml, metrics.jsonl, checkpoints, resume), gradient checkpointing and LoRA on the model,
the progress bar and trackers, and the trained model saved as a plain `save_pretrained` directory.

`run_supervised` is the whole command from its config; a stage (`p3o.sft.train`,
`p3o.reward.train`) supplies how to load and tokenize its rows, build its model and its `Stage`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from typing import Callable

from transformers.utils import logging as transformers_logging

from p3o.core.supervised import RESUMABLE_CHANGES, Stage, SupervisedConfig, fit, part_state, total_steps
from p3o.data.formats import WHERE
from p3o.data.turns import stop_token_ids
from p3o.errors import UsageError
from p3o.models.loading import _check_exists, context_length, load_tokenizer, prepare_tokenizer
from p3o.models.lora import ADAPTER_DIR, add_lora, is_lora, merged_lora_state_dict
from p3o.utils.checkpoints import STATE_FILE, StopRequest, check_resumable, resume_point
from p3o.utils.distributed import check_supported, is_deepspeed, is_sharded, make_accelerator
from p3o.utils.io import JsonlWriter, run_directory, save_pretrained_atomically, truncate_jsonl, write_yaml
from p3o.utils.model_card import write_stage_card
from p3o.utils.tracking import check_trackers, finish_trackers, start_trackers


def run_supervised(cfg: SupervisedConfig, title: str, load_rows: Callable, tokenize: Callable, build_model: Callable,
                   make_stage: Callable[[object, int], Stage], tokenizer=None, data_name: str | None = None) -> list[dict]:
    """One supervised command from its config: check the output directory, load the tokenizer and
    the (train, held-out) rows, tokenize them, build the model, and `run_stage`.

    load_rows(cfg) -> (train rows, held-out rows); tokenize(tokenizer, row, where) -> example;
    build_model(cfg, tokenizer) -> (module to train, model to save). `tokenizer`: one given in
    Python (else loaded from the config); `data_name`: how errors name data given as an object."""
    import yaml
    from accelerate.utils import set_seed

    inputs = {"model_name_or_path": cfg.model_name_or_path, "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
              "dataset": cfg.dataset, "eval_dataset": cfg.eval_dataset}
    # Checked against the settings now (a finished run too); once the model is loaded, again against
    # the ones it will use (--max_length capped to its context).
    checkpoint = (resume_point(cfg.output_dir, dataclasses.asdict(cfg), RESUMABLE_CHANGES | {"max_length"})
                  if cfg.resume else None)
    if cfg.disable_progress_bar:  # transformers' own bars too (loading and saving weights), as `p3o` does
        transformers_logging.disable_progress_bar()
    with run_directory(cfg.output_dir, cfg.overwrite or cfg.resume or checkpoint is not None, inputs,
                       clean_up=checkpoint is None, fresh=checkpoint is None) as out:
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
        train = [tokenize(tokenizer, row, row.get(WHERE, f"{name}: row {i + 1}")) for i, row in enumerate(train_rows)]
        held_out = [tokenize(tokenizer, row, row.get(WHERE, f"held-out row {i + 1}"))
                    for i, row in enumerate(eval_rows)]
        lost = Counter(example.pop("cut") for example in train + held_out if "cut" in example)
        for what, count in sorted(lost.items()):  # what the stage's examples lost, in its own words
            logging.getLogger("p3o").warning("%d of %d examples are longer than --max_length %d and lose %s", count,
                                             len(train) + len(held_out), cfg.max_length, what)
        stage = make_stage(tokenizer, cfg.per_device_eval_batch_size)
        return run_stage(cfg, model, tokenizer, train, held_out, stage, out, title, saved_model=saved,
                         checkpoint=checkpoint, data_name=str(name))


def run_stage(cfg: SupervisedConfig, model, tokenizer, train: list[dict], held_out: list[dict], stage: Stage, out,
              title: str, saved_model=None, checkpoint=None, data_name: str | None = None) -> list[dict]:
    """Everything around `fit` for one command: accelerate, gradient checkpointing and LoRA as asked
    for, config.yaml, metrics.jsonl (every `logging_steps` steps and every evaluation), a progress
    bar, and the saved model and tokenizer (LoRA: merged, the adapter under adapter/)."""
    from tqdm.auto import tqdm

    if not train:
        raise UsageError(f"{cfg.dataset or 'train_dataset'} leaves no training examples after the held-out split")
    trackers = check_trackers(cfg.report_to)
    acc = make_accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers or None, project_dir=str(out))
    check_supported(acc)
    if cfg.use_peft and (is_sharded(acc) or is_deepspeed(acc)):
        raise UsageError("--use_peft is not supported under FSDP or DeepSpeed yet; launch with --accelerate_config ddp")
    model, peft_model = prepare_model(cfg, model, saved_model)
    _stop_where_replies_end(saved_model if saved_model is not None else model, tokenizer)  # checkpoints' too
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
    with stop.installed():  # through the final save: a signal then waits for it, and the run is complete
        try:
            evaluations, prepared = fit(cfg, model, train, held_out, stage, acc, on_log, out=out, checkpoint=checkpoint,
                                        stop=stop, peft_model=peft_model, saved_model=saved_model, tokenizer=tokenizer)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            finish_trackers(acc)
        acc.wait_for_everyone()
        _save_final(cfg, acc, prepared, peft_model, saved_model, tokenizer, out, title, evaluations, data_name)
        acc.wait_for_everyone()  # until the main process has saved, every process keeps its signal handler
        #   and stays in the stage (a pipeline's next stage loads this model)
    if stop.requested:  # the run is complete; a pipeline stops before its next stage
        stop.finished_anyway(out)
    return evaluations


def _save_final(cfg, acc, prepared, peft_model, saved_model, tokenizer, out, title: str, evaluations: list[dict],
                data_name: str | None) -> None:
    """The trained model and tokenizer into `out` (LoRA: merged, the adapter under adapter/), and its card."""
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
        save_pretrained_atomically(model, tokenizer, out, state_dict=state_dict)
        base = cfg.model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None) or None
        write_stage_card(out, cfg, title, evaluations[-1] if evaluations else {}, base, data_name or str(cfg.dataset))


def prepare_model(cfg: SupervisedConfig, model, saved=None):
    """--gradient_checkpointing and --use_peft on the module to train (`model`) whose transformers
    model is `saved` (a reward model's classifier inside its scorer) or `model` itself. Returns the
    module to train (a causal LM: its peft model) and the peft model (None without LoRA). A
    classifier's adapters go on its trunk; its head (`score`) is trained whole, as peft's
    `modules_to_save`."""
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


def _stop_where_replies_end(model, tokenizer) -> None:
    """`generate` on the saved model stops where the data's replies end (the chat template's end of turn)."""
    config = getattr(model, "generation_config", None)
    if config is not None:
        stops = stop_token_ids(tokenizer)
        config.eos_token_id = stops[0] if len(stops) == 1 else stops
        config.pad_token_id = tokenizer.pad_token_id


def _check_same_global_batch(saved: int, cfg: SupervisedConfig, processes: int, checkpoint) -> None:
    """A run resumes on any number of processes if its optimiser steps keep their size (`saved`)."""
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    if saved and saved != batch:
        raise UsageError(
            f"{checkpoint} was written with {saved} examples per optimiser step, but --per_device_train_batch_size "
            f"{cfg.per_device_train_batch_size} x --gradient_accumulation_steps {cfg.gradient_accumulation_steps} x "
            f"{processes} processes make {batch}; set the two flags so that they make {saved} on {processes} processes")


def _gathered_weights(acc, model, saved) -> dict:
    """The whole state dict of `saved` (the trained module or a part of it, as the reward model's
    classifier inside its scorer), gathered from the shards under FSDP and ZeRO-3 (a collective: all
    call it) and copied out of DeepSpeed's flat buffers under ZeRO-2."""
    return part_state(acc.unwrap_model(model), saved, acc.get_state_dict(model) or {})  # ZeRO-3: the main process's


def _fit_context(cfg: SupervisedConfig, model) -> None:
    """--max_length beyond the model's context would crash the forward pass: cap it in `cfg` (which
    the stage's tokenizer reads), and say so: a warning for a length the user asked for, a note for
    the default (the examples it then cuts get a warning of their own)."""
    config = getattr(model, "config", None)
    context = context_length(config) if config is not None else None
    if context is None or cfg.max_length <= context:
        return
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == "max_length")
    logging.getLogger("p3o").log(logging.INFO if cfg.max_length == default else logging.WARNING,
                                 "--max_length %d exceeds the model's context of %d tokens; using %d: examples longer "
                                 "than that lose the start of their prompt", cfg.max_length, context, context)
    cfg.max_length = context
