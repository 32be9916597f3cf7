"""`p3o sft`: supervised fine-tuning on prompt-completion data; the loss covers completion tokens only.

Prompt and completion are tokenized separately and concatenated, exactly as the RL stage later sees
them (prompt tokens, then the policy's own continuation), and the completion ends with EOS so the
model learns to stop. Run directory: the model and tokenizer, config.yaml, metrics.jsonl.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from p3o.core.supervised import Stage, SupervisedConfig
from p3o.core.supervised_run import run_supervised
from p3o.data.files import as_dataset_spec
from p3o.data.formats import earlier_replies, example_token_ids, load_completions, load_with_held_out
from p3o.data.prompts import is_conversational
from p3o.data.turns import ReplyEnds, opens_with_bos
from p3o.errors import UsageError
from p3o.models.loading import disable_dropout, load_causal_lm, load_tokenizer
from p3o.options import hints_unknown_options, option, refuse_trl_arguments
from p3o.utils.ops import masked_sum, selective_log_softmax

log = logging.getLogger("p3o")
IGNORE = -100  # label of a position that is not trained on (prompt, padding)


@hints_unknown_options
@dataclass
class SFTConfig(SupervisedConfig):
    prompt_column: str = option("prompt", "Column holding the prompt: plain text or chat messages.")
    completion_column: str = option("completion", "Column holding the completion: plain text or assistant messages.")
    assistant_turns: str = option("all", "In a conversation (`messages`, or a chat prompt holding earlier assistant turns): all (learn every assistant reply, as TRL's assistant_only_loss; where the chat template renders earlier turns differently once later ones follow, as Qwen3's drops their reasoning, the final reply only, with a warning) or last (the final reply only; the earlier ones are context, as before this option).", choices=("all", "last"))
    completion_only_loss: bool = option(True, "Learn the completion's (assistant replies') tokens only, TRL's default for prompt/completion data; false: every token, the prompt's and the template's too, TRL's default for messages data (assistant_only_loss=False).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.assistant_turns not in ("all", "last"):
            raise UsageError(f"--assistant_turns must be all or last, got {self.assistant_turns!r}")


def tokenize_example(tokenizer, prompt, completion, max_length: int, where: str, ends=None,
                     all_turns: bool = False) -> dict[str, list[int]]:
    """input_ids = prompt tokens + completion tokens up to their first stop token (EOS or end of
    turn, as sampling stops; `example_token_ids`); labels = IGNORE on the prompt, except, with
    `all_turns`, on a conversation's earlier assistant replies (`earlier_replies`). A completion of
    several messages ends with its last; the others join the prompt. An example that had to be cut
    to `max_length` says what it lost under "cut" (for the run's count)."""
    ends = ends or ReplyEnds.of(tokenizer)
    if is_conversational(completion) and len(completion) > 1:
        prompt, completion = prompt + completion[:-1], completion[-1:]
    prompt_ids, completion_ids = example_token_ids(tokenizer, prompt, completion, where, ends)
    trained = [False] * len(prompt_ids)  # which prompt tokens are replies to learn
    if all_turns and (found := earlier_replies(tokenizer, prompt, where, ends)) is not None:
        prompt_ids, trained = found
    elif all_turns and _CANNOT_CUT not in _SAID:  # this conversation learns its final reply only
        _SAID.add(_CANNOT_CUT)
        log.warning("%s: %s", where, _CANNOT_CUT)
    # An over-long completion gives up its end, never all of its prompt: a quarter of the budget
    # (or the whole prompt, if shorter) stays for the prompt's last tokens.
    budget = max_length - min(len(prompt_ids), max(1, max_length // 4))
    lost = ["the end of their completion (and its EOS)"] if len(completion_ids) > budget else []
    completion_ids = completion_ids[:budget]
    keep = max_length - len(completion_ids)  # prompt tokens that fit: the last ones, and BOS
    if len(prompt_ids) > keep:
        lost.insert(0, "the start of their prompt")
        bos = prompt_ids[:1] if keep and opens_with_bos(tokenizer, prompt_ids) else []
        start = len(prompt_ids) - keep + len(bos)
        prompt_ids, trained = (bos + prompt_ids[start:], [False] * len(bos) + trained[start:]) if keep else ([], [])
    labels = [token if learn else IGNORE for token, learn in zip(prompt_ids, trained)] + completion_ids
    example = {"input_ids": prompt_ids + completion_ids, "labels": labels}
    return {**example, "cut": " and ".join(lost)} if lost else example


_CANNOT_CUT = ("the chat template renders a conversation's earlier turns differently once later turns follow (or "
               "the tokenizer gives no character offsets), so its earlier assistant replies cannot be cut out: such "
               "conversations learn their final reply only (--assistant_turns last says so for all)")
_SAID: set[str] = set()  # warnings given once a process


def sft_stage(tokenizer, eval_batch_size: int = 16) -> Stage:
    def collate(examples):
        width = max(len(e["input_ids"]) for e in examples)
        pad = tokenizer.pad_token_id

        def right(seq, fill):
            return seq + [fill] * (width - len(seq))

        return {"input_ids": torch.tensor([right(e["input_ids"], pad) for e in examples]),
                "attention_mask": torch.tensor([right([1] * len(e["input_ids"]), 0) for e in examples]),
                "labels": torch.tensor([right(e["labels"], IGNORE) for e in examples])}

    def units(examples):
        return float(sum(sum(label != IGNORE for label in e["labels"]) for e in examples))

    def loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (b, L-1, V)
        targets = batch["labels"][:, 1:]  # (b, L-1): position t predicts token t+1
        mask = targets != IGNORE
        logps = selective_log_softmax(logits, targets.clamp(min=0))  # (b, L-1)
        return -masked_sum(logps, mask), {}

    def eval_totals(model, examples):
        total, tokens = 0.0, 0.0
        for first in range(0, len(examples), eval_batch_size):
            part = examples[first:first + eval_batch_size]
            batch = {k: v.to(next(model.parameters()).device) for k, v in collate(part).items()}
            loss_sum, _ = loss(model, batch)
            total, tokens = total + loss_sum.item(), tokens + units(part)
        return {"loss": total, "tokens": tokens}

    def eval_metrics(totals):
        mean = totals["loss"] / max(totals["tokens"], 1.0)
        return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}

    return Stage(collate, units, loss, eval_totals, eval_metrics)


class SFTTrainer:
    """`p3o sft` from Python: `SFTTrainer(model, args=SFTConfig(output_dir=...), train_dataset=...)`.

    model: a hub name, a directory, a .gguf file or a causal LM in memory (default:
    `args.model_name_or_path`); train_dataset, eval_dataset: a `datasets.Dataset`, a list of dicts
    or a path, with `prompt`/`completion` (or `messages`) columns; processing_class: the tokenizer.
    `train()` writes the run directory `p3o sft` writes and returns the held-out evaluations. With
    `args.use_peft`, a model given in memory gets its LoRA adapters in place (peft's way)."""

    def __init__(self, model=None, args: SFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None, formatting_func=None, optimizers=None):
        refuse_trl_arguments("SFTTrainer", {"peft_config": peft_config, "callbacks": callbacks,
                                            "formatting_func": formatting_func, "optimizers": optimizers})
        self.args, self.model, self.data, self.tokenizer = _api_inputs(args, model, train_dataset, eval_dataset,
                                                                       processing_class, "SFTConfig")

    def train(self) -> list[dict]:
        return run_sft(self.args, self.model, self.tokenizer, *self.data)


def _api_inputs(args, model, train_dataset, eval_dataset, processing_class, config_name: str):
    """(args with paths folded in, the model object or None, (train, eval) data specs, tokenizer):
    what the stage trainers take, checked before anything loads."""
    import dataclasses
    from pathlib import Path

    if args is None:
        raise UsageError(f"the trainer needs args={config_name}(output_dir=...): where the run is written")
    if isinstance(model, (str, Path)):
        args, model = dataclasses.replace(args, model_name_or_path=str(model)), None
    if model is None and args.model_name_or_path is None:
        raise UsageError("give the model: --model_name_or_path (Python: model=)")
    if train_dataset is None and args.dataset is None:
        raise UsageError("give the data: --dataset (Python: train_dataset=)")
    if model is not None and processing_class is None and not getattr(model.config, "name_or_path", ""):
        raise UsageError("processing_class is required when the model has no name_or_path to load a tokenizer from")
    train = as_dataset_spec(train_dataset, "train_dataset") if train_dataset is not None else args.dataset
    held_out = as_dataset_spec(eval_dataset, "eval_dataset") if eval_dataset is not None else args.eval_dataset
    return args, model, (train, held_out), processing_class


def run_sft(cfg: SFTConfig, model=None, tokenizer=None, dataset=None, eval_dataset=None) -> list[dict]:
    """`p3o sft`; the arguments after `cfg` are what `SFTTrainer` takes as objects."""
    dataset = dataset if dataset is not None else cfg.dataset
    eval_dataset = eval_dataset if eval_dataset is not None else cfg.eval_dataset
    if tokenizer is None and model is not None and cfg.tokenizer_name_or_path is None:
        tokenizer = load_tokenizer(model.config.name_or_path, cfg.trust_remote_code)

    def load_rows(cfg):  # the loaders rename the configured columns to `prompt` and `completion`
        return load_with_held_out(load_completions, dataset, eval_dataset, cfg.eval_fraction, cfg.seed,
                                  split=cfg.dataset_split, config=cfg.dataset_config,
                                  prompt_column=cfg.prompt_column, completion_column=cfg.completion_column)

    ends = {}  # the tokenizer's ReplyEnds, read off its chat template once

    def tokenize(tokenizer, row, where):
        if "ends" not in ends:
            ends["ends"] = ReplyEnds.of(tokenizer)
        example = tokenize_example(tokenizer, row["prompt"], row["completion"], cfg.max_length, where, ends["ends"],
                                   all_turns=cfg.assistant_turns == "all")
        return example if cfg.completion_only_loss else {**example, "labels": list(example["input_ids"])}

    def build_model(cfg, tokenizer):
        if model is not None:
            disable_dropout(model)
            return model, None
        return load_causal_lm(cfg.model_name_or_path, cfg.trust_remote_code, cfg.torch_dtype), None

    return run_supervised(cfg, "p3o sft", load_rows, tokenize, build_model, sft_stage, tokenizer, str(dataset))
