"""Config fields documented once (`option`), and how a value from a YAML file or a flag becomes a
field's type. The configs of every stage use these; `p3o.cli.args` turns the same fields into flags.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from pathlib import Path
from typing import Any

import yaml

from p3o.errors import UsageError

_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def option(default, help: str, **metadata):
    """A config field documented once: its `--flag` help, and `required=True` where it has no default."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _scalar_type(field: dataclasses.Field) -> type:
    """`int | None` -> int, `list[float] | None` -> float; the dataclasses use `from __future__ import
    annotations`, so types are strings."""
    name = str(field.type).replace(" ", "").replace("|None", "").replace("Optional[", "").rstrip("]")
    return _SCALARS[name.removeprefix("list[")]


def is_list(field: dataclasses.Field) -> bool:
    return str(field.type).replace(" ", "").startswith("list[")


# Counts that transformers (and so TRL) read as a share of the run when below 1; p3o counts steps.
FRACTIONS_OF_THE_RUN = {"warmup_steps": "give warmup_ratio for a share of the run",
                        "save_steps": "give a number of steps", "eval_steps": "give a number of steps",
                        "logging_steps": "give a number of steps"}


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # a numpy array or scalar, a tensor
        value = value.tolist()
    if value is None and "None" not in str(field.type):
        if "none_is" in field.metadata:  # report_to=None, as transformers takes it
            return field.metadata["none_is"]
        raise UsageError(f"{source}: {field.name} cannot be None (its default is {field.default!r})")
    if value is None or (value == "" and "None" in str(field.type)):  # `--reward_fn ""` means unset
        return None
    if field.metadata.get("comma_list") and isinstance(value, (list, tuple)):  # report_to: [a, b] as "a,b"
        value = ",".join(map(str, value))
    if is_list(field):  # one value or several; each checked like a scalar
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_coerce_scalar(field, v, source) for v in values if v != ""] or None
    return _coerce_scalar(field, value, source)


def _coerce_scalar(field: dataclasses.Field, value: Any, source: str) -> Any:
    kind = _scalar_type(field)
    if isinstance(value, bool) and kind is not bool:
        if "true_is" in field.metadata:  # log_completions=True, TRL's switch: p3o's default count
            return field.metadata["true_is"] if value else kind(0)
        raise UsageError(f"{source}: {field.name} must be {kind.__name__}, got {value!r}")
    if isinstance(value, enum.Enum):  # transformers' SchedulerType.COSINE: its value, "cosine"
        value = value.value
    if kind is str and not isinstance(value, (str, Path, int, float)):
        raise UsageError(f"{source}: {field.name} must be str, got a {type(value).__name__}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
    else:
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            pass
    fraction = (kind is int and isinstance(value, float) and 0 < value < 1 and field.name in FRACTIONS_OF_THE_RUN)
    hint = (f" (transformers reads a fraction below 1 as a share of the run; p3o counts steps: "
            f"{FRACTIONS_OF_THE_RUN[field.name]})" if fraction else "")
    raise UsageError(f"{source}: {field.name} must be {kind.__name__}, got {value!r}{hint}")


def read_yaml_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of option names to values")
    return data


# TRL's names for settings p3o names otherwise (name -> p3o's option, how it differs): an unknown
# option is looked up here before a near spelling, which for these would mislead (epsilon is not
# adam_epsilon). Each hint is given only where the config has that option.
TRL_NAMES = {
    "epsilon": ("clip_eps", "the clipping range"),
    "cliprange": ("clip_eps", "the clipping range"),
    "cliprange_value": ("value_clip_eps", "the value function's clipping range"),
    "num_iterations": ("epochs", "passes over each rollout; TRL's default is 1, p3o's 4"),
    "num_ppo_epochs": ("epochs", "passes over each rollout"),
    "per_device_train_batch_size": ("pairs_per_step", "prompts a step, each sampled num_generations times; "
                                    "TRL counts completions per device"),
    "generation_batch_size": ("pairs_per_step", "prompts a step, each sampled num_generations times"),
    "bf16": ("mixed_precision", "set it to bf16"),
    "fp16": ("mixed_precision", "set it to fp16"),
    "eval_strategy": ("eval_steps", "also evaluate every N steps"),
    "rloo_k": ("num_generations", "responses per prompt"),
    "kl_coef": ("beta", "the KL coefficient"),
    "lam": ("gae_lambda", "GAE's lambda"),
    "response_length": ("max_new_tokens", "the longest response sampled"),
    "use_vllm": ("generation_backend", "set it to vllm"),
    "assistant_only_loss": ("assistant_turns", "all (the default) learns every assistant reply"),
    "loss_type": ("loss_aggregation", "GRPO's 'dapo' is token-mean, 'grpo' group-mean; DPO's loss is the "
                  "sigmoid one, p3o's only"),
    "epsilon_high": ("clip_eps", "one symmetric clipping range"),
    "num_completions_to_print": ("log_completions", "prompts whose completions go to completions.jsonl"),
    "mask_truncated_completions": ("missing_eos_penalty", "a cut response is penalised rather than masked"),
    "model_init_kwargs": ("torch_dtype", "with trust_remote_code, what p3o passes when loading"),
    "max_length": ("max_new_tokens", "the prompt (max_prompt_length) and the response are capped apart"),
}
# TRL options with no counterpart here: what to do instead (an unknown option's hint; never ignored).
TRL_ONLY = {
    "use_cpu": "p3o trains where accelerate finds a device; hide the GPUs (CUDA_VISIBLE_DEVICES=) for the CPU",
    "remove_unused_columns": "every dataset column reaches the reward functions; leave it out",
    "push_to_hub": "upload the output directory with huggingface_hub's upload_folder after the run",
    "use_liger_kernel": "p3o takes log-probabilities a block of rows at a time without float32 logits itself",
    "repetition_penalty": "a penalised sampler is not the policy whose ratios are trained; not supported",
    "min_p": "use top_p or top_k",
    "rpo_alpha": "p3o's dpo is the sigmoid DPO loss alone",
    "loss_weights": "p3o's dpo is the sigmoid DPO loss alone",
    "delta": "GRPO's upper bound on the ratio has no counterpart; importance_clamp bounds it",
    "per_device_eval_batch_size": "held-out prompts are sampled 64 at a time on each process",
}


# Trainer arguments of TRL's that p3o's trainers do not take: what to do instead.
TRL_TRAINER_ARGUMENTS = {
    "peft_config": "set use_peft=True (with lora_r, lora_alpha, lora_target_modules) in the config",
    "callbacks": "P3OTrainer takes callbacks; for SFT and the reward model read metrics.jsonl",
    "formatting_func": "give prompt/completion or messages columns",
    "judge": "score with reward_funcs (a function or a reward model); p3o winrate judges after training",
    "reward_processing_classes": "p3o reads each reward model with its own tokenizer, from its directory",
    "optimizers": "p3o builds AdamW from the config (learning_rate, adam_beta2, weight_decay, ...)",
}


def refuse_trl_arguments(trainer: str, given: dict) -> None:
    """One line for the first of TRL's trainer arguments given that `trainer` does not take."""
    for name, value in given.items():
        if value is not None and not (isinstance(value, (list, tuple)) and not value):  # [] asks for nothing
            raise UsageError(f"{trainer} takes no {name} (TRL's): {TRL_TRAINER_ARGUMENTS[name]}")


def did_you_mean(key: str, known, value=None) -> str:
    """" (TRL's epsilon is 'clip_eps' here: ...)" or " (did you mean 'learning_rate'?)" for a near
    miss among `known`, else "". `value`: the one given, where known (TRL's bf16=False is the default)."""
    import difflib

    known = list(known)
    if key in ("bf16", "fp16") and value is False:
        return f" (TRL's {key}=False is p3o's default, mixed_precision 'no': leave it out)"
    if key == "assistant_only_loss" and value is False and "completion_only_loss" in known:
        return " (TRL's assistant_only_loss=False, every token of a conversation, is completion_only_loss=False here)"
    if key in TRL_NAMES and TRL_NAMES[key][0] in known:
        name, how = TRL_NAMES[key]
        return f" (TRL's {key} is {name!r} here: {how})"
    if key in TRL_ONLY:
        return f" (TRL's {key}: {TRL_ONLY[key]})"
    # A close spelling only: at difflib's default 0.6 use_cpu was "use_peft", rpo_alpha "lora_alpha".
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


class UnknownOption(UsageError, TypeError):
    """A config built in Python with an option it does not have: a TypeError, as a dataclass raises,
    that says what was meant."""


def hints_unknown_options(cls):
    """Class decorator (after @dataclass): `cls(unknown=...)` says which option was meant, TRL's
    names included, instead of the dataclass's bare TypeError; a value of the wrong type is one line."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in fields:
                raise UnknownOption(f"{cls.__name__} has no option {key!r}{did_you_mean(key, fields, kwargs[key])}")
        # Each value checked against its field's type as a flag or a YAML value is ("1e-5" is a
        # float, ["q_proj", "v_proj"] a comma list), so a wrong one is a line naming it, not a
        # TypeError deep in the run.
        init(self, *args, **{k: _coerce(fields[k], v, cls.__name__) for k, v in kwargs.items()})

    cls.__init__ = __init__
    return cls


def typed(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` (option names of the dataclass `cls`, as a YAML file gives them) each checked against
    its field's type; `where` names their source in an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {k: _coerce(fields[k], v, where) for k, v in values.items()}
