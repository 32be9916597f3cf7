"""A Hugging Face sequence-classification reward model, scored at the last real token."""
from __future__ import annotations

import torch

from p3o.errors import UsageError
from p3o.models.loading import _check_exists, load_tokenizer
from p3o.reward.functions import check_rewards


class RewardModelScorer:
    """r(x, y) = the one-label head read at the last real token of prompt + completion.

    Inputs are right-padded; the last real token is found from the attention mask. `config.pad_token_id`
    is set too, so the plain `transformers` forward (used for heads not called `score`) agrees.
    """

    def __init__(self, model, tokenizer, name: str, batch_size: int = 64, device=None):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        self.device = device or next(model.parameters()).device

    @classmethod
    def load(cls, name: str, trust_remote_code: bool = False, batch_size: int = 64, device=None):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        _check_exists(name, "reward model")
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UsageError(f"reward model {name} is not a transformers model: {str(exc).splitlines()[0]}") from None
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or config.num_labels != 1:
            raise UsageError(f"reward model {name} must be a sequence-classification model with one label "
                             f"(found {', '.join(config.architectures or ['no architecture'])} with "
                             f"{config.num_labels} labels); train one with `p3o rm`")
        tokenizer = load_tokenizer(name, trust_remote_code)
        tokenizer.truncation_side = "left"  # an over-long text loses prompt, never the completion being scored
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, trust_remote_code=trust_remote_code, output_loading_info=True)
        if info["missing_keys"]:
            raise UsageError(f"reward model {name} lacks weights for {', '.join(sorted(info['missing_keys'])[:3])}: "
                             "its score head would be random")
        model.config.pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False).eval()
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, name, batch_size, device)

    def _render(self, prompt, completion) -> str:
        """Plain text is concatenated; a conversation goes through the reward model's chat template."""
        if isinstance(prompt, str):
            return prompt + completion
        messages = prompt + completion
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs) -> torch.Tensor:
        texts = [self._render(p, c) for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", truncation=True).to(self.device)
            scores.extend(self._last_token_scores(batch["input_ids"], batch["attention_mask"]).tolist())
        return check_rewards(scores, len(completions), f"model {self.name}")


    def _last_token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(b, L) right-padded -> (b,) scores at each row's last attended position."""
        head = getattr(self.model, "score", None)
        if not isinstance(head, torch.nn.Linear):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        trunk = getattr(self.model, self.model.base_model_prefix)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, L, H)
        last = attention_mask.sum(-1) - 1  # (b,)
        return head(hidden[torch.arange(len(last), device=last.device), last])[:, 0].float()  # (b,)
