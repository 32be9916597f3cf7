"""The RL stage: `P3OTrainer`, the Python API that `p3o train` is a thin layer over.

`P3OTrainer(model, reward_funcs, args=P3OConfig(...), train_dataset=...)` takes paths or objects,
builds the engine (`p3o.rl.engine.Trainer`) and `train()` runs it into the run directory:
config.yaml (the resolved config), metrics.jsonl (one line a step), completions.jsonl, eval.jsonl,
checkpoint-N/ and the final policy and tokenizer (`save_pretrained`, safetensors). Only the main
process writes. Callbacks with `transformers.TrainerCallback`'s hooks see every step and may stop
the run, which then ends cleanly with its outputs written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path

from transformers.utils import logging as transformers_logging

from p3o.data.files import as_dataset_spec
from p3o.data.prompts import load_preference_pairs, load_prompts
from p3o.errors import UsageError
from p3o.eval.policy import evaluate_policy, summarise
from p3o.eval.watch import Block, OverOptimisationWatch
from p3o.models.loading import load_causal_lm, load_tokenizer, prepare_tokenizer
from p3o.models.lora import ADAPTER_DIR, in_saved_dtypes, is_lora, merged_lora_state_dict, get_peft_model_quietly
from p3o.models.value_head import VALUE_HEAD_FILE, split_state_dict
from p3o.options import refuse_trl_arguments
from p3o.reward import build_rewards, score_in
from p3o.rl.algorithms import get_algorithm
from p3o.rl.checkpoint import load_policy_weights, load_training_state, resumable_changes, save_checkpoint
from p3o.rl.config import P3OConfig, TrainConfig, check_reward_sources, derive_sizes
from p3o.rl.engine import Trainer
from p3o.utils.callbacks import CallbackHandler, instantiated, trainer_state
from p3o.utils.checkpoints import StopRequest, given_checkpoint, resumable, resume_point
from p3o.utils.distributed import any_process, gathered, loading_whole, make_accelerator
from p3o.utils.io import (
    JsonlWriter,
    check_output_dir,
    run_directory,
    save_pretrained_atomically,
    truncate_jsonl,
    write_yaml,
)
from p3o.utils.model_card import write_model_card
from p3o.utils.tracking import check_trackers, finish_trackers, log_completions, start_trackers

log = logging.getLogger("p3o")


class P3OTrainer:
    """RL fine-tuning with P3O-V2 by default; `args.algo` selects P3O-V1 or any baseline (ppo, rloo,
    grpo, remax, online-dpo, dpo), all on the same engine.

    model: a hub name, a local directory, a .gguf file, or a `PreTrainedModel`/`PeftModel` in memory
        (default: `args.model_name_or_path`).
    reward_funcs: a function `fn(prompts, completions, **kwargs)`, a function spec (`module:fn`,
        `file.py:fn`), a reward-model path or a loaded sequence-classification model, or a list of
        them, used after `args.reward_fn`, `args.reward_model` and `args.reward_url` and summed with
        them under `args.reward_weights` (in that order). config.yaml records the args' own rewards
        only: give paths and specs in `args` for a run its config.yaml replays.
    train_dataset, eval_dataset: a `datasets.Dataset`, an iterable dataset or a list of dicts (read
        whole), or a path or hub name; the columns and formats `p3o train` reads.
    processing_class: the tokenizer (default: the model's).
    peft_config: a `peft.LoraConfig` (or `args.use_peft` for p3o's default LoRA).
    callbacks: objects with `transformers.TrainerCallback` hooks (`on_train_begin`, `on_step_begin`, `on_step_end`,
        `on_log`, `on_evaluate`, `on_save`, `on_train_end`); `state.global_step` counts
        rollout-and-update steps; `control.should_training_stop` ends the run cleanly.
    ref_model: the frozen reference, a model or a path (default: `args.ref_model_name_or_path`, else the
        initial policy, a `PeftModel` given with trained adapters included).
    """

    def __init__(self, model=None, reward_funcs=None, args: P3OConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, callbacks=None, ref_model=None,
                 judge=None, reward_processing_classes=None, optimizers=None):
        refuse_trl_arguments("P3OTrainer", {"judge": judge, "reward_processing_classes": reward_processing_classes,
                                            "optimizers": optimizers})
        if args is None:
            raise UsageError("P3OTrainer needs args=P3OConfig(output_dir=...): where the run is written")
        if isinstance(model, (str, Path)):  # a path is recorded in config.yaml like the flag
            args, model = dataclasses.replace(args, model_name_or_path=str(model)), None
        if isinstance(ref_model, (str, Path)):  # and so is a reference's
            args, ref_model = dataclasses.replace(args, ref_model_name_or_path=str(ref_model)), None
        self.callbacks = [instantiated(c) for c in callbacks or []]
        checkpoint = _resume_point(args, resolved=False) if args.resume else None
        # A directory --resume would take may be resumed by train(resume_from_checkpoint=...); train()
        # refuses it otherwise (`p3o train` checks before building: run_train).
        check_output_dir(args.output_dir, args.overwrite or args.resume or resumable(Path(args.output_dir)),
                         _input_paths(args))
        self.engine = _build_engine(args, model, processing_class, train_dataset, eval_dataset,
                                    _as_list(reward_funcs), peft_config, ref_model)
        self.args = self.engine.cfg  # as resolved (e.g. max_steps from num_train_epochs)
        if checkpoint is not None and args.num_train_epochs is not None:  # its length, now known
            checkpoint = _resume_point(self.args)
        self._checkpoint, self._metrics = checkpoint, {}
        self._base_model = args.model_name_or_path or _name_of(model, required=False)
        self.state = trainer_state(self.args, self.engine.accelerator, self.engine.state.step)  # then train()'s

    @property
    def model(self):
        """The policy being trained (a `PeftModel` under LoRA)."""
        return self.engine.unwrapped_policy

    @property
    def processing_class(self):
        return self.engine.tokenizer

    @property
    def accelerator(self):
        """The run's `accelerate.Accelerator` (TRL scripts call `trainer.accelerator.print`)."""
        return self.engine.accelerator

    def train(self, resume_from_checkpoint: bool | str | None = None) -> dict:
        """Run to `args.max_steps` (or until a callback stops it) into `args.output_dir`; return the
        last step's metrics, with the last held-out evaluation as `eval_*`. `resume_from_checkpoint`:
        True for the latest checkpoint in output_dir, or a checkpoint directory."""
        checkpoint = self._checkpoint
        if resume_from_checkpoint is True:  # as --resume: a start with no checkpoint yet starts over
            checkpoint = _resume_point(self.args)
        elif resume_from_checkpoint:
            checkpoint = given_checkpoint(resume_from_checkpoint, dataclasses.asdict(self.args),
                                          resumable_changes(self.args))
        if checkpoint is not None:
            load_policy_weights(self.engine, checkpoint)
            load_training_state(self.engine, checkpoint)
        resuming = checkpoint is not None
        allowed = self.args.overwrite or self.args.resume or resume_from_checkpoint is True or resuming
        with run_directory(self.args.output_dir, allowed, _input_paths(self.args), clean_up=not resuming,
                           fresh=not resuming) as out:
            self._metrics = _run(self, out, resuming)
            return self._metrics

    def evaluate(self, eval_dataset=None) -> dict:
        """The held-out evaluation of the policy as it is now, on `eval_dataset` (else the trainer's):
        KL to the reference, the rewards and the length with their standard errors, as `eval_*`
        metrics (added to `state.log_history`, as transformers' Trainer does). Writes no file."""
        engine, pairs = self.engine, self.engine.eval_pairs
        prompts = engine.eval_prompts
        if eval_dataset is not None:
            spec = as_dataset_spec(eval_dataset, "eval_dataset")
            prompts = _eval_prompts(self.args, spec, engine.tokenizer)
            pairs = _eval_pairs(self.args, engine.algorithm, spec, engine.tokenizer, prompts)
        if prompts is None or len(prompts) == 0:
            raise UsageError("evaluate() needs held-out prompts: give eval_dataset= here or to P3OTrainer")
        _, point = HeldOutEvaluator(engine, None, prompts=prompts, pairs=pairs)(engine.state.step)
        metrics = {f"eval_{k}": v for k, v in point.items() if k != "step"}
        self.state.log_history.append({**metrics, "step": point["step"]})
        CallbackHandler(self.callbacks, self.args, engine, state=self.state).fire("on_evaluate", metrics=dict(metrics))
        return metrics

    def add_callback(self, callback) -> None:
        """Add a callback (an instance, or a class to instantiate) for the next train()."""
        self.callbacks.append(instantiated(callback))

    def pop_callback(self, callback):
        """Remove and return the first callback that is `callback` or an instance of that class (None if none is)."""
        for i, c in enumerate(self.callbacks):
            if c is callback or (isinstance(callback, type) and isinstance(c, callback)):
                return self.callbacks.pop(i)
        return None

    def remove_callback(self, callback) -> None:
        """Remove the first callback that is `callback` or an instance of that class."""
        self.pop_callback(callback)

    def save_model(self, output_dir: str | None = None) -> Path:
        """The policy and tokenizer as `p3o train` writes them at the end: a plain causal LM
        (LoRA merged, the adapter under adapter/), PPO's value head beside it."""
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _save_policy(self.engine, out)
        if self.engine.accelerator.is_main_process:
            write_model_card(out, self.args, self._base_model, self._metrics)
        return out


def build_trainer(cfg: P3OConfig, checkpoint: Path | None = None) -> Trainer:
    """The engine for `cfg` alone (paths only), with `checkpoint`'s state loaded: for tests and
    scripts that drive the engine directly."""
    engine = _build_engine(cfg)
    if checkpoint is not None:
        load_policy_weights(engine, checkpoint)
        load_training_state(engine, checkpoint)
    return engine


def run_train(cfg: P3OConfig) -> Path:
    """`p3o train`: the API on the config's paths."""
    check_output_dir(cfg.output_dir, cfg.overwrite or cfg.resume, _input_paths(cfg))  # before loading anything
    P3OTrainer(args=cfg).train()
    return Path(cfg.output_dir)


def _build_engine(cfg: P3OConfig, model=None, tokenizer=None, train_dataset=None, eval_dataset=None,
                  reward_funcs=(), peft_config=None, ref_model=None) -> Trainer:
    """Everything cheap is checked before anything expensive is loaded."""
    from accelerate.utils import set_seed

    algorithm = get_algorithm(cfg.algo)
    if cfg.disable_progress_bar:  # transformers' own bars too (loading and saving weights), as `p3o` does
        transformers_logging.disable_progress_bar()
    trackers = check_trackers(cfg.report_to)
    train_spec = as_dataset_spec(train_dataset, "train_dataset") if train_dataset is not None else cfg.dataset
    eval_spec = as_dataset_spec(eval_dataset, "eval_dataset") if eval_dataset is not None else cfg.eval_dataset
    if train_spec is None:
        raise UsageError("give the prompts: --dataset (Python: train_dataset=)")
    if model is None and cfg.model_name_or_path is None:
        raise UsageError("give the policy: --model_name_or_path (Python: model=)")
    sources = [*(cfg.reward_fn or []), *(cfg.reward_model or []), *(cfg.reward_url or []), *reward_funcs]
    check_reward_sources(cfg, [_source_name(s) for s in sources], eval_spec is not None)
    unused_eval = [f"--{n}" for n in ("eval_steps", "eval_max_prompts") if getattr(cfg, n) not in (0, None)]
    if unused_eval and eval_spec is None:
        log.warning("%s %s no effect without --eval_dataset (Python: eval_dataset=)", " and ".join(unused_eval),
                    "has" if len(unused_eval) == 1 else "have")
    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision, log_with=trackers or None,
                                   project_dir=cfg.output_dir)
    derive_sizes(cfg, accelerator.num_processes)
    set_seed(cfg.seed)
    tokenizer = (prepare_tokenizer(tokenizer) if tokenizer is not None else
                 load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path or _name_of(model),
                                cfg.trust_remote_code))
    if algorithm.offline:
        prompts = load_preference_pairs(train_spec, tokenizer, cfg.dataset_split, cfg.dataset_config, cfg.prompt_column,
                                        cfg.chosen_column, cfg.rejected_column, cfg.max_new_tokens)
    else:
        prompts = load_prompts(train_spec, tokenizer, cfg.dataset_split, cfg.dataset_config, cfg.prompt_column)
    eval_prompts = _eval_prompts(cfg, eval_spec, tokenizer)
    eval_pairs = _eval_pairs(cfg, algorithm, eval_spec, tokenizer, eval_prompts)
    reward = build_rewards(sources, cfg.reward_weights, cfg.trust_remote_code, cfg.reward_batch_size,
                           accelerator.device, (cfg.reward_url_timeout, cfg.reward_url_retries))  # dpo: for eval only
    if reward is not None:
        score_in(reward, cfg.mixed_precision)  # a reward model runs in the policy's precision
    if cfg.num_train_epochs is not None:  # the run's length in passes over the data
        steps = max(1, math.ceil(cfg.num_train_epochs * len(prompts) / cfg.pairs_per_step))
        cfg = dataclasses.replace(cfg, max_steps=steps, num_train_epochs=None)  # as it was: no "max_steps wins"
    if cfg.algo == "grpo" and cfg.num_generations == 2:
        log.warning("grpo with --num_generations 2 keeps only the sign of r1 - r2: the reward advantages are "
                    "+-1/sqrt(2) whatever the gap (and 0 for a tie); use k >= 4, or rloo / p3o for pairs")
    with loading_whole(accelerator):  # ZeRO-3: partitioned by `prepare`, not while loading
        policy = (_checked_model(model, "model") if model is not None else
                  load_causal_lm(cfg.model_name_or_path, cfg.trust_remote_code, cfg.torch_dtype, what="policy"))
        ref = (_checked_model(ref_model, "ref_model") if ref_model is not None else
               load_causal_lm(cfg.ref_model_name_or_path, cfg.trust_remote_code, cfg.torch_dtype, what="reference model")
               if cfg.ref_model_name_or_path else None)
    if peft_config is not None:
        policy = _with_peft(policy, peft_config, cfg)
    monitor = build_rewards([cfg.monitor_reward_fn]) if cfg.monitor_reward_fn else None
    return Trainer(cfg, policy, tokenizer, reward, prompts, ref_policy=ref, accelerator=accelerator,
                   monitor_reward=monitor, eval_prompts=eval_prompts, eval_pairs=eval_pairs)


def _eval_prompts(cfg: P3OConfig, spec, tokenizer):
    if spec is None:
        return None
    prompts = load_prompts(spec, tokenizer, column=cfg.prompt_column)
    return _subset(prompts, range(min(len(prompts), cfg.eval_max_prompts or len(prompts))))


def _eval_pairs(cfg: P3OConfig, algorithm, spec, tokenizer, eval_prompts):
    """An offline algorithm's (DPO's) held-out preference pairs, where the held-out rows have the
    chosen and rejected columns (else None: the held-out prompts alone are evaluated)."""
    if not algorithm.offline or eval_prompts is None or not len(eval_prompts):
        return None
    row = eval_prompts.rows[0]
    if cfg.chosen_column not in row or cfg.rejected_column not in row:
        return None
    pairs = load_preference_pairs(spec, tokenizer, cfg.dataset_split, cfg.dataset_config, cfg.prompt_column,
                                  cfg.chosen_column, cfg.rejected_column, cfg.max_new_tokens)
    return _subset(pairs, range(min(len(pairs), cfg.eval_max_prompts or len(pairs))))  # the first, as for prompts


def _checked_model(model, name: str):
    """A model object the engine can train: a causal LM whose weights exist (not on the meta device)."""
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate"):
        raise UsageError(f"{name} must be a causal language model (a PreTrainedModel or PeftModel) or a path, got "
                         f"{type(model).__name__}")
    devices = {p.device.type for p in model.parameters()}
    if "meta" in devices:
        raise UsageError(f"{name} has weights on the meta device (loaded without them); load it with its weights")
    if len(devices) > 1:
        raise UsageError(f"{name} is spread over devices {sorted(devices)}; give it on one device (p3o places it "
                         "where accelerate trains)")
    return model


def _with_peft(policy, peft_config, cfg: P3OConfig):
    if is_lora(policy):
        raise UsageError("peft_config: the model already has LoRA adapters; give a plain model or no peft_config")
    if cfg.use_peft:
        raise UsageError("give LoRA once: peft_config or args.use_peft, not both")
    return get_peft_model_quietly(policy, peft_config)  # its dropout is switched off with the policy's


def _name_of(model, required: bool = True) -> str:
    name = getattr(getattr(model, "config", None), "name_or_path", "") or getattr(model, "name_or_path", "")
    if not name and required:
        raise UsageError("processing_class is required when the model has no name_or_path to load a tokenizer from")
    return name or type(model).__name__


def _source_name(source) -> str:
    return source if isinstance(source, str) else getattr(source, "__name__", type(source).__name__)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _input_paths(cfg: P3OConfig) -> dict[str, str | None]:
    paths = {f: getattr(cfg, f) for f in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path",
                                          "dataset", "eval_dataset")}
    for i, path in enumerate(cfg.reward_model or []):
        paths[f"reward_model {i + 1}" if i else "reward_model"] = path
    return paths


def _resume_point(cfg: P3OConfig, resolved: bool = True) -> Path | None:
    """The checkpoint --resume continues from, its run's settings checked against `cfg`. Before the
    data is read (`resolved` False), --num_train_epochs is not yet a number of steps (the saved run's
    max_steps): the run's length is compared once it is."""
    changeable = resumable_changes(cfg)
    if not resolved and cfg.num_train_epochs is not None:
        changeable = changeable | {"num_train_epochs", "max_steps"}
    return resume_point(cfg.output_dir, dataclasses.asdict(cfg), changeable)


def _run(api: P3OTrainer, out: Path, resuming: bool) -> dict:
    trainer = api.engine
    cfg, acc = trainer.cfg, trainer.accelerator
    acc.wait_for_everyone()  # every process has checked the output directory before anything is written
    writers, resumed_at = {}, trainer.state.step
    if acc.is_main_process:
        if resuming:  # drop what the run wrote after its checkpoint
            for name in ("metrics.jsonl", "completions.jsonl", "eval.jsonl"):
                truncate_jsonl(out / name, resumed_at)
        write_yaml(out / "config.yaml", dataclasses.asdict(cfg))
        writers = {name: JsonlWriter(out / f"{name}.jsonl", append=resuming) for name in ("metrics", "completions")}
        log.info(_start_line(trainer))
        _warn_about_inputs(trainer)
    start_trackers(acc, cfg)
    callbacks = CallbackHandler(api.callbacks, cfg, trainer, resumed_at)
    api.state = callbacks.state  # log_history: every step's metrics and every held-out evaluation
    evaluator = HeldOutEvaluator(trainer, out / "eval.jsonl", append=resuming) if trainer.eval_prompts else None
    watch, stop, last = OverOptimisationWatch(), StopRequest(), {}
    bar = _progress_bar(cfg, disable=not acc.is_main_process, initial=resumed_at)

    def evaluate(step: int) -> str:
        line, point = evaluator(step)
        metrics = {f"eval_{k}": v for k, v in point.items() if k != "step"}  # named as transformers names them
        last.update(metrics)
        callbacks.state.log_history.append({**metrics, "step": step})
        callbacks.fire("on_evaluate", metrics=dict(metrics))  # a copy: what a callback does to it is not logged
        return line

    def on_step(metrics, texts) -> bool:
        shown = {name: f"{metrics[name]:.3f}" for name in ("reward", "kl", "reward_accuracy") if name in metrics}
        bar.set_postfix(**shown, pairs_s=f"{metrics['pairs_per_s']:.1f}", refresh=False)  # drawn by update, at its pace
        bar.update(1)
        acc.log(metrics, step=metrics["step"])
        step = metrics["step"]
        last.update(metrics)
        control = callbacks.step_end(metrics)
        finishing = step == cfg.max_steps or any_process(control.should_training_stop, acc.device)
        evaluation = (evaluate(step) if evaluator is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0)
                                                                  or finishing) else None)
        if evaluation is not None and not finishing:  # stopped from on_evaluate: after this step, as transformers
            finishing = any_process(callbacks.control.should_training_stop, acc.device)
        logged = step % cfg.logging_steps == 0 or step == cfg.max_steps
        if logged and acc.num_processes > 1 and cfg.log_completions > len(texts.prompts):  # more than this process has
            texts = _all_texts(texts)  # a collective: every process has as many prompts, so all know it is due
        if writers:
            _write_step(metrics, texts, evaluation, logged)
        stopping = stop.agreed(acc.device) and not finishing  # at the last step the final save follows
        # With --save_steps, the last step too (as transformers): a finished run extends with --resume.
        if (cfg.save_steps and (step % cfg.save_steps == 0 or finishing)) or stopping:
            path = save_checkpoint(trainer, out, cfg.save_total_limit)
            callbacks.fire("on_save", checkpoint=path)
            if stopping:
                raise stop.interrupted(step, path)
        if finishing and step < cfg.max_steps:
            log.info("a callback stopped the run after step %d", step)
        return finishing

    def _write_step(metrics, texts, evaluation: str | None, logged: bool):
        writers["metrics"].write(metrics)
        if "monitor_reward" in metrics and (warning := watch.update(metrics["reward"], metrics["monitor_reward"])):
            bar.write(f"WARNING step {metrics['step']}: {warning}")
        if evaluation is not None:
            bar.write(evaluation)
        if logged:
            bar.write(_summary_line(metrics))
            records = list(_completion_records(metrics["step"], texts, cfg.log_completions))
            for record in records:
                writers["completions"].write(record)
            log_completions(acc, metrics["step"], records)

    callbacks.fire("on_train_begin")
    with stop.installed():  # through the final save: a signal then waits for it, and the run is complete
        try:
            if evaluator is not None and not resuming:
                evaluate(0)  # the starting point: KL 0, the initial policy's rewards
            trainer.train(on_step, before_step=lambda: callbacks.fire("on_step_begin"))
        finally:
            bar.close()
            for writer in writers.values():
                writer.close()
            if evaluator is not None:
                evaluator.close()
            finish_trackers(acc)
        acc.wait_for_everyone()
        _save_policy(trainer, out)
        if acc.is_main_process:
            write_model_card(out, cfg, api._base_model, last or _last_line(out / "metrics.jsonl"))
        acc.wait_for_everyone()  # until the main process has saved, every process keeps its signal handler
        #   and stays in the stage (a pipeline's next stage loads this model)
    callbacks.fire("on_train_end")
    if stop.requested:  # the run is complete; a pipeline stops before its next stage
        stop.finished_anyway(out)
    return last


def _last_line(path: Path) -> dict:
    """The last record of a jsonl file ({} if none): a resumed run that had no step left to take
    still describes its last step in the model card."""
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _save_policy(trainer: Trainer, out: Path) -> None:
    """The policy as a plain causal LM (a LoRA policy merged, out of place: the adapters stay
    trainable and the base untouched), PPO's value head beside it, a LoRA adapter under adapter/."""
    acc = trainer.accelerator
    lora = is_lora(trainer.unwrapped_policy)
    state_dict = None if lora else (acc.get_state_dict(trainer.policy) or {})  # a collective under FSDP/ZeRO-3
    if not acc.is_main_process:
        return
    _record_generation_ids(trainer)
    extra = {}
    if lora:
        peft_model = trainer.unwrapped_policy
        (out / ADAPTER_DIR).mkdir(exist_ok=True)
        save_pretrained_atomically(peft_model, None, out / ADAPTER_DIR)
        model, state_dict = peft_model.get_base_model(), merged_lora_state_dict(peft_model)
        if trainer.with_values:
            extra[VALUE_HEAD_FILE] = trainer.trained_module.value_head.state_dict()
    else:
        model = trainer.unwrapped_policy
        if trainer.with_values:  # the policy directory stays a plain causal LM; the critic sits beside it
            state_dict, extra[VALUE_HEAD_FILE] = split_state_dict(state_dict)
    with in_saved_dtypes(trainer.unwrapped_policy, state_dict) if lora else contextlib.nullcontext():  # loaded dtype
        save_pretrained_atomically(model, trainer.tokenizer, out, state_dict=state_dict, extra_tensors=extra)
    log.info("saved the trained policy%s to %s", " (LoRA merged; adapter under adapter/)" if lora else "", out)


class HeldOutEvaluator:
    """Evaluates the policy on --eval_dataset (KL to the reference, the reward, the monitor reward,
    length, with standard errors) and appends one line per evaluation to eval.jsonl. Every evaluation
    draws from the same seeded stream, so points along a run and across runs are comparable. Every
    process evaluates its share of the prompts (a collective: all call it); the main one writes."""

    SEED = 0

    def __init__(self, trainer: Trainer, path: Path | None, append: bool = False, prompts=None, pairs=None):
        """`path`: eval.jsonl (None: write nothing); `prompts`: else the trainer's held-out prompts, and
        with them `pairs` (DPO's held-out preference pairs, or None) else the trainer's."""
        acc = trainer.accelerator
        self.trainer = trainer
        self.writer = JsonlWriter(path, append) if acc.is_main_process and path is not None else None
        self.watch = OverOptimisationWatch(patience=2)  # held-out points are few and each already averaged
        self.rewards = {name: r for name, r in (("reward", trainer.reward), ("monitor_reward", trainer.monitor_reward))
                        if r is not None}
        prompts, self.pairs = (trainer.eval_prompts, trainer.eval_pairs) if prompts is None else (prompts, pairs)
        self.first, indices, self.real = _share(len(prompts), acc, trainer.sharded)
        self.prompts = _subset(prompts, indices)
        self.pair_indices, self.real_pairs = ([], 0) if self.pairs is None else _share(len(self.pairs), acc,
                                                                                       trainer.sharded)[1:]

    def __call__(self, step: int) -> tuple[str, dict]:
        """(the summary line, the point written to eval.jsonl)."""
        from accelerate.utils import gather_object

        t, names = self.trainer, ["kl", "length", *self.rewards]
        samples = []
        if len(self.prompts):
            # Under autocast as in training, so the initial policy's KL is exactly 0 under bf16 too.
            with t.accelerator.autocast(), gathered(t.trained_module):
                samples = evaluate_policy(t.unwrapped_policy, t.ref_policy, t.tokenizer, self.prompts, self.rewards,
                                          t.cfg.max_new_tokens, seed=self.SEED, temperature=t.cfg.temperature,
                                          first_index=self.first, synced=t.sharded,
                                          max_prompt_length=t.max_prompt_length,
                                          reward_context=t.reward_context(logged=False))["samples"][:self.real]
        if t.accelerator.num_processes > 1:
            samples = gather_object([{name: sample[name] for name in names} for sample in samples])
        point = {"step": step, **summarise(samples, names), "n": len(samples)}
        shown = ["kl", *self.rewards]
        if self.pairs is not None:  # DPO's loss and implicit rewards on the held-out pairs, as in training
            pairs = t.pair_evaluation(self.pairs, self.pair_indices)[:self.real_pairs]
            if t.accelerator.num_processes > 1:
                pairs = gather_object(pairs)
            point.update(**summarise(pairs, list(t.PAIR_METRICS)), pairs=len(pairs))
            shown += ["loss", "reward_accuracy"]
        line = f"eval  step {step:>5}  " + "  ".join(
            f"{name} {point[name]:+.4f} ± {point[name + '_stderr']:.4f}" for name in shown)
        if "monitor_reward" in point and "reward" in point and (warning := self.watch.update_block(Block(
                point["reward"], point["reward_stderr"], point["monitor_reward"], point["monitor_reward_stderr"]))):
            line += f"\nWARNING on the held-out prompts: {warning}"
        if self.writer is not None:
            self.writer.write(point)
        return line, point

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _share(n: int, acc, sharded: bool) -> tuple[int, list[int], int]:
    """This process's contiguous share of n held-out items: (its first index, its indices, how many are
    real). A sharded model's every forward is a collective, so each process then gets as many
    (padded with item 0, whose results are dropped)."""
    share = math.ceil(n / acc.num_processes)
    first = min(n, acc.process_index * share)
    real = min(n, first + share) - first
    return first, [*range(first, first + real), *([0] * (share - real) if sharded else [])], real


def _subset(prompts, rows: list[int]):
    """The prompts at `rows` (a PromptDataset; preference pairs keep their responses)."""
    responses = None if prompts.responses is None else [prompts.responses[i] for i in rows]
    return dataclasses.replace(prompts, rows=[prompts.rows[i] for i in rows], texts=[prompts.texts[i] for i in rows],
                               token_ids=[prompts.token_ids[i] for i in rows], responses=responses)


def _warn_about_inputs(trainer: Trainer) -> None:
    tokenizer, eos = trainer.tokenizer, trainer.eos_ids
    if eos:
        log.info("responses end at %s", ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in eos))
    else:
        log.warning("the tokenizer has no EOS token: every response runs to --max_new_tokens %d",
                    trainer.cfg.max_new_tokens)
    if trainer.cfg.compile_sampling and trainer.vllm is None:
        from p3o.rl.kv_cache import supports_static_cache  # imports transformers' cache classes

        model = trainer.unwrapped_policy
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        if trainer.sharded or not supports_static_cache(model):
            log.warning("--compile_sampling: sampling stays eager (%s)", "the weights are sharded" if trainer.sharded
                        else "this model's KV cache cannot be static: sliding windows or non-attention layers")
    if trainer.long_prompts:
        log.warning("%d of %d prompts are longer than %d tokens (--max_prompt_length, by default the context "
                    "minus --max_new_tokens); they keep their last tokens (and a BOS that opens the sequence)",
                    trainer.long_prompts, len(trainer.prompts), trainer.max_prompt_length)


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
    algorithm = trainer.algorithm
    critic = " with a value head" if trainer.with_values else ""
    greedy = " (+1 greedy)" if algorithm.extend_rollout is not None else ""
    given = " from the data" if algorithm.offline else ""
    lora = f" ({trained:,} in LoRA adapters trained)" if trained < params else ""
    shared = f" ({sizes.local_groups} in each of {sizes.processes} processes)" if sizes.processes > 1 else ""
    return (f"{cfg.algo}: {params:,}-parameter policy{lora}{critic}, {len(trainer.prompts)} prompts; per step "
            f"{sizes.groups_per_step} prompts{shared} x {sizes.num_generations}{greedy} responses{given}, "
            f"{cfg.epochs} epochs of {sizes.minibatches_per_epoch} "
            f"minibatches of {sizes.minibatch_groups} prompts; {sizes.optimizer_steps} optimiser steps in all")


def _all_texts(texts):
    """Every process's prompts, completions, rewards and logged columns, in process order."""
    from accelerate.utils import gather_object

    parts = gather_object([texts])
    columns = set.intersection(*(set(part.extra) for part in parts))  # a column some process lacks is left out
    return dataclasses.replace(
        texts, prompts=[x for part in parts for x in part.prompts],
        completions=[x for part in parts for x in part.completions],
        rewards=None if texts.rewards is None else [x for part in parts for x in part.rewards],
        extra={column: [x for part in parts for x in part.extra[column]] for column in sorted(columns)})


def _completion_records(step: int, texts, count: int):
    """The first `count` prompts of the step with their responses and raw rewards."""
    k = len(texts.completions) // len(texts.prompts)
    for g, prompt in enumerate(texts.prompts[:count]):
        record = {"step": step, "prompt": prompt, "completions": texts.completions[g * k:(g + 1) * k]}
        if texts.rewards is not None:
            record["rewards"] = texts.rewards[g * k:(g + 1) * k]
        record.update({column if column not in record else f"log_extra/{column}": values[g * k:(g + 1) * k]
                       for column, values in texts.extra.items()})  # log_extra, beside the record's own fields
        yield record


def _summary_line(m: dict) -> str:
    shown = [("reward", "+.4f"), ("kl", "+.4f"), ("loss", "+.4f"), ("clipfrac", ".3f"), ("reward_accuracy", ".3f"),
             ("value_loss", ".4f"), ("pairs_per_s", ".1f")]
    return f"step {m['step']:>5}  " + "  ".join(f"{name} {m[name]:{spec}}" for name, spec in shown if name in m)
