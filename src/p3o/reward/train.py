"""`p3o rm`: a reward model from preference data (prompt, chosen, rejected) with the Bradley-Terry
loss -log sigmoid(r(x, y_w) - r(x, y_l)) (docs/p3o.md section 1).

The model is `AutoModelForSequenceClassification` with one label on the given trunk (usually the
SFT model), read at the last real token exactly as `p3o train --reward_model` reads it. Held-out
pairwise accuracy and mean margin are reported after every epoch.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from p3o.core.supervised import Stage, SupervisedConfig
from p3o.core.supervised_run import run_supervised
from p3o.data.formats import load_preferences, load_with_held_out
from p3o.errors import UsageError
from p3o.models.loading import (
    _check_exists,
    adapter_base,
    as_plain_model,
    disable_dropout,
    gguf_model_kwargs,
    load_tokenizer,
    one_line,
    pretrained_source,
)
from p3o.options import hints_unknown_options, option, refuse_trl_arguments
from p3o.reward.model import LastTokenReward, model_kind, pad_right, reward_input_ids
from p3o.sft.train import _api_inputs


@hints_unknown_options
@dataclass
class RewardConfig(SupervisedConfig):
    prompt_column: str = option("prompt", "Column holding the prompt (absent: taken from the shared start of chosen/rejected).")
    chosen_column: str = option("chosen", "Column holding the preferred completion.")
    rejected_column: str = option("rejected", "Column holding the other completion.")
    center_rewards_coefficient: float | None = option(None, "Add this times the mean of (r_chosen + r_rejected)^2 to the loss, which keeps scores centred on 0 (TRL's option; Eisenstein et al. use 0.01). Unset: none.")
    group_by_prompt: bool = option(False, "Keep each prompt's pairs together in the shuffled batches, so that a response compared several times (all pairs of k responses per prompt) is scored once per batch: with k = 4 and a batch of 6 pairs, 4 forwards instead of 12. The loss is the same sum; only which pairs share a batch changes.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.center_rewards_coefficient is not None and not self.center_rewards_coefficient >= 0:
            raise UsageError(f"--center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


def tokenize_pair(tokenizer, row: dict, max_length: int, where: str = "row") -> dict[str, list[int]]:
    """Both sides' reward-model inputs; a pair with a side over `max_length` (which keeps its end) says
    so under "cut" (for the run's count)."""
    full = {side: reward_input_ids(tokenizer, row["prompt"], row[side], None, where) for side in ("chosen", "rejected")}
    pair = {side: ids[-max_length:] for side, ids in full.items()}
    pair["group"] = json.dumps(row["prompt"], sort_keys=True)  # which pairs share a prompt (--group_by_prompt)
    if "margin" in row:  # TRL's column: how much higher chosen must score (the loss's offset)
        margin = row["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise UsageError(f"{where}: margin must be a finite number, got {margin!r:.40}")
        pair["margin"] = float(margin)
    cut = any(len(ids) > max_length for ids in full.values())
    return {**pair, "cut": "their start (the score is read at their end, which is kept)"} if cut else pair


def scored_once(examples: list[dict]) -> tuple[list[list[int]], list[int], list[int]]:
    """Each distinct sequence of the batch once, and where each pair's chosen and rejected sides are
    in that list: a response in several pairs costs one forward, and the margins are unchanged."""
    where: dict[tuple, int] = {}
    for e in examples:
        for side in ("chosen", "rejected"):
            where.setdefault(tuple(e[side]), len(where))
    return ([list(ids) for ids in where], [where[tuple(e["chosen"])] for e in examples],
            [where[tuple(e["rejected"])] for e in examples])


def prompt_grouped_order(examples: list[dict], generator: torch.Generator) -> list[int]:
    """A shuffle of whole prompt groups (each group's pairs kept together, in file order)."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e["group"], []).append(i)
    blocks = list(groups.values())
    return [i for g in torch.randperm(len(blocks), generator=generator).tolist() for i in blocks[g]]


def rm_stage(tokenizer, eval_batch_size: int = 16, group_by_prompt: bool = False,
             center_rewards_coefficient: float | None = None) -> Stage:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - m) summed over pairs, m the row's `margin`
    (0 without one), plus, with `center_rewards_coefficient` c, c (r_chosen + r_rejected)^2."""
    def collate(examples):
        sequences, chosen, rejected = scored_once(examples)
        ids, mask = pad_right(tokenizer, sequences)  # (u, L): the batch's u <= 2b distinct sequences
        return {"input_ids": ids, "attention_mask": mask, "chosen": torch.tensor(chosen),  # (b,) rows of ids
                "rejected": torch.tensor(rejected), "offset": torch.tensor([e.get("margin", 0.0) for e in examples])}

    def units(examples):
        return float(len(examples))

    def pair_losses(scorer, batch):
        scores = scorer(batch["input_ids"], batch["attention_mask"])  # (u,)
        chosen, rejected = scores[batch["chosen"]], scores[batch["rejected"]]  # (b,) each
        losses = -F.logsigmoid(chosen - rejected - batch["offset"].to(scores))  # (b,)
        if center_rewards_coefficient:
            losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
        return losses, chosen - rejected

    def loss(scorer, batch):
        losses, margin = pair_losses(scorer, batch)
        return losses.sum(), {"accuracy": (margin > 0).float().mean().item()}

    def eval_totals(scorer, examples):
        device = next(scorer.parameters()).device
        parts = [pair_losses(scorer, {k: v.to(device) for k, v in collate(examples[i:i + eval_batch_size]).items()})
                 for i in range(0, len(examples), eval_batch_size)]
        losses, all_margins = (torch.cat(x) for x in zip(*parts)) if parts else (torch.zeros(0), torch.zeros(0))
        return {"loss": losses.sum().item(), "correct": (all_margins > 0).sum().item(),
                "margin": all_margins.sum().item(), "pairs": float(len(all_margins))}

    def eval_metrics(totals):
        pairs = max(totals["pairs"], 1.0)
        return {"eval_loss": totals["loss"] / pairs, "eval_accuracy": totals["correct"] / pairs,
                "eval_margin": totals["margin"] / pairs}

    return Stage(collate, units, loss, eval_totals, eval_metrics, prompt_grouped_order if group_by_prompt else None)


def load_reward_trunk(cfg: RewardConfig, tokenizer):
    """A one-label sequence classifier on the model's trunk; a new score head is seeded by --seed."""
    from transformers import AutoModelForSequenceClassification

    _check_exists(cfg.model_name_or_path, "model")
    if adapter_base(cfg.model_name_or_path) is not None:
        raise UsageError(f"{cfg.model_name_or_path} is a LoRA adapter: a reward model starts from a whole model; "
                         "give the SFT run's output directory (merged), or merge the adapter and save that")
    source, extra = pretrained_source(cfg.model_name_or_path)
    dtype = cfg.torch_dtype if cfg.torch_dtype == "auto" else getattr(torch, cfg.torch_dtype)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **gguf_model_kwargs(extra))
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError) as exc:  # the last: weights_only refused
        raise UsageError(f"could not load {cfg.model_name_or_path} as a sequence classifier: {one_line(exc)}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    return as_plain_model(model)


RMConfig = RewardConfig  # its name before the Python API took TRL's


class RewardTrainer:
    """`p3o rm` from Python: `RewardTrainer(model, args=RewardConfig(output_dir=...), train_dataset=...)`.

    model: a hub name, a directory, a .gguf file (a one-label score head is added on its trunk), or a
    one-label `...ForSequenceClassification` model in memory; train_dataset, eval_dataset: a
    `datasets.Dataset`, a list of dicts or a path with `prompt`/`chosen`/`rejected` (or implicit-prompt
    `chosen`/`rejected`); processing_class: the tokenizer. `train()` writes the run directory
    `p3o rm` writes and returns the held-out evaluations. With `args.use_peft`, a model given in
    memory gets its LoRA adapters and its head's trained copy in place (peft's way)."""

    def __init__(self, model=None, args: RewardConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None, optimizers=None):
        refuse_trl_arguments("RewardTrainer", {"peft_config": peft_config, "callbacks": callbacks,
                                               "optimizers": optimizers})
        self.args, self.model, self.data, self.tokenizer = _api_inputs(args, model, train_dataset, eval_dataset,
                                                                       processing_class, "RewardConfig")
        if self.model is not None and (not type(self.model).__name__.endswith("ForSequenceClassification")
                                       or self.model.config.num_labels != 1):
            raise UsageError(f"model must be a one-label sequence-classification model or a path, got "
                             f"{model_kind(self.model)}")

    def train(self) -> list[dict]:
        return run_rm(self.args, self.model, self.tokenizer, *self.data)


def run_rm(cfg: RewardConfig, model=None, tokenizer=None, dataset=None, eval_dataset=None) -> list[dict]:
    """`p3o rm`; the arguments after `cfg` are what `RewardTrainer` takes as objects."""
    dataset = dataset if dataset is not None else cfg.dataset
    eval_dataset = eval_dataset if eval_dataset is not None else cfg.eval_dataset
    if tokenizer is None and model is not None and cfg.tokenizer_name_or_path is None:
        tokenizer = load_tokenizer(model.config.name_or_path, cfg.trust_remote_code)

    def load_rows(cfg):  # the loaders rename the configured columns to `prompt`, `chosen`, `rejected`
        return load_with_held_out(load_preferences, dataset, eval_dataset, cfg.eval_fraction, cfg.seed,
                                  split=cfg.dataset_split, config=cfg.dataset_config, prompt_column=cfg.prompt_column,
                                  chosen_column=cfg.chosen_column, rejected_column=cfg.rejected_column)

    def tokenize(tokenizer, row, where):
        return tokenize_pair(tokenizer, row, cfg.max_length, where)

    def build_model(cfg, tokenizer):
        if model is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
            disable_dropout(model)
            trunk = as_plain_model(model)
        else:
            trunk = load_reward_trunk(cfg, tokenizer)
        return LastTokenReward(trunk), trunk  # train the last-token scorer, save the classifier

    stage = partial(rm_stage, group_by_prompt=cfg.group_by_prompt,
                    center_rewards_coefficient=cfg.center_rewards_coefficient)
    return run_supervised(cfg, "p3o rm", load_rows, tokenize, build_model, stage, tokenizer, str(dataset))
