"""A Hugging Face sequence-classification reward model, scored at the last real token.

`reward_input_ids` and `last_token_scores` are shared by scoring (`RewardModelScorer`) and by
training (`p3o rm`), so a reward model sees the same token layout in both.
"""
from __future__ import annotations

import pickle

import torch
from safetensors import SafetensorError

from p3o.data.prompts import render_prompt
from p3o.errors import UsageError
from p3o.models.loading import (
    _check_exists,
    as_plain_model,
    context_length,
    gguf_model_kwargs,
    load_tokenizer,
    one_line,
    pretrained_source,
)
from p3o.reward.functions import check_rewards


def reward_input_ids(tokenizer, prompt, completion, max_length: int | None = None, where: str = "reward input") -> list[int]:
    """Tokens of prompt + completion for a reward model. Plain text is concatenated as is; a
    conversation (message lists) goes through the chat template, which writes its own BOS.
    Over-long inputs keep their end, so the completion being scored is never cut."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt + completion)["input_ids"]
    else:  # rendered like every other conversation in p3o, with the same errors
        text = render_prompt(prompt + completion, tokenizer, where, add_generation_prompt=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids


def pad_right(tokenizer, sequences: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer.pad({"input_ids": sequences}, padding=True, return_tensors="pt", padding_side="right")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, L) right-padded -> (b,) the one-label head at each row's last real token (`last_real`)."""
    head = getattr(model, "score", None)
    # A LoRA run trains the head as a copy inside peft's wrapper, which calls it like the head itself.
    if not isinstance(getattr(head, "original_module", head), torch.nn.Linear):  # other heads: transformers finds the last non-pad token itself
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    trunk = getattr(model, model.base_model_prefix)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, L, H)
    last = last_real(input_ids, attention_mask, getattr(model.config, "pad_token_id", None))  # (b,)
    return head(hidden[torch.arange(len(last), device=last.device), last])[:, 0].float()  # (b,)


def last_real(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """(b, L) -> (b,) each row's last attended position that does not hold the pad token: where
    `transformers`' sequence classifiers read their score, so a saved reward model scores the same
    there. A text that ends with the pad token itself (EOS, where pad == EOS) is read before it; a row
    of nothing but pad tokens at its last attended position."""
    real = attention_mask.bool()  # (b, L)
    if pad_id is not None:
        not_pad = real & (input_ids != pad_id)
        real = torch.where(not_pad.any(-1, keepdim=True), not_pad, real)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * real).argmax(-1)  # (b,)


class LastTokenReward(torch.nn.Module):
    """`last_token_scores` as a module, so that accelerate/DDP can wrap the whole scoring forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP shards the model's blocks

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return last_token_scores(self.model, input_ids, attention_mask)


class RewardModelScorer:
    """r(x, y) = the one-label head read at the last real token of prompt + completion.

    Inputs are right-padded; the last real token is the last attended one that is not the pad token,
    as `transformers` reads it. `config.pad_token_id` is set too, so the plain `transformers` forward
    (used for heads not called `score`) agrees.
    """

    def __init__(self, model, tokenizer, name: str, batch_size: int = 64, device=None, max_length: int | None = None):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        self.device = device or next(model.parameters()).device
        self.max_length = max_length or context_length(model.config) or tokenizer.model_max_length
        self.autocast_dtype = None  # see `score_in`
        self.owns_model = False  # loaded here (not a model the caller passed in): its weights may be narrowed

    def score_in(self, dtype) -> "RewardModelScorer":
        """Score under `dtype` autocast (the run's --mixed_precision), as the policy runs: a float32
        reward model on a CPU or GPU with bf16 units then costs a third as much. A model loaded here
        also holds its linear weights in `dtype`, which is exactly what autocast would cast them to at
        every call; norms, embeddings and the scores stay float32."""
        self.autocast_dtype = dtype
        if self.owns_model:
            for module in self.model.modules():
                if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
                    module.weight.data = module.weight.data.to(dtype)
        return self

    @classmethod
    def load(cls, name: str, trust_remote_code: bool = False, batch_size: int = 64, device=None):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        _check_exists(name, "reward model")
        source, extra = pretrained_source(name, "reward model")
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        except (OSError, ValueError) as exc:
            raise UsageError(f"reward model {name} is not a transformers model: {str(exc).splitlines()[0]}") from None
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or config.num_labels != 1:
            raise UsageError(f"reward model {name} must be a sequence-classification model with one label "
                             f"(found {', '.join(config.architectures or ['no architecture'])} with "
                             f"{config.num_labels} labels); train one with `p3o rm`")
        tokenizer = load_tokenizer(name, trust_remote_code)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, trust_remote_code=trust_remote_code, output_loading_info=True, **gguf_model_kwargs(extra))
        except (OSError, SafetensorError, pickle.UnpicklingError) as exc:  # the last: weights_only refused
            raise UsageError(f"could not read the weights of reward model {name}: {one_line(exc)}") from None
        as_plain_model(model)
        if info["missing_keys"]:
            raise UsageError(f"reward model {name} lacks weights for {', '.join(sorted(info['missing_keys'])[:3])}: "
                             "its score head would be random")
        model.config.pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False).eval()
        if device is not None:
            model.to(device)
        scorer = cls(model, tokenizer, name, batch_size, device)
        scorer.owns_model = True
        return scorer

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> torch.Tensor:
        sequences = [reward_input_ids(self.tokenizer, p, c, self.max_length) for p, c in zip(prompts, completions)]
        scores = []
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            for start in range(0, len(sequences), self.batch_size):
                ids, mask = pad_right(self.tokenizer, sequences[start:start + self.batch_size], self.device)
                scores.extend(last_token_scores(self.model, ids, mask).tolist())
        return check_rewards(scores, len(completions), f"model {self.name}")


def model_kind(model) -> str:
    """A model's class, with its label count where it is a classifier (every config has num_labels)."""
    kind = type(model).__name__
    return f"{kind} with {model.config.num_labels} labels" if kind.endswith("ForSequenceClassification") else kind
