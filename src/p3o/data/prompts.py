"""Prompt-only data: `prompt` as plain text or as chat messages rendered with the chat template."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p3o.data.files import read_rows, require_columns
from p3o.errors import UsageError


@dataclass
class PromptDataset:
    """Rows of a prompt-only dataset; `texts[i]` is row i's prompt rendered for the policy and
    `token_ids[i]` its tokens (special tokens added once: a chat template already has its own)."""

    rows: list[dict[str, Any]]
    texts: list[str]
    token_ids: list[list[int]]
    prompt_column: str

    def __len__(self) -> int:
        return len(self.rows)


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def render_prompt(prompt: Any, tokenizer, where: str, add_generation_prompt: bool = True) -> str:
    """Plain text is used as is; chat messages go through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if is_conversational(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{where}: the prompt is a list of chat messages but the tokenizer has no chat "
                             "template; give plain-text prompts or a tokenizer with a chat_template")
        try:
            return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises its own errors, e.g. "System role not supported"
            raise UsageError(f"{where}: the tokenizer's chat template refused these messages "
                             f"({type(exc).__name__}: {exc})") from None
    raise UsageError(f"{where}: a prompt must be text or a list of {{'role', 'content'}} messages, "
                     f"got {type(prompt).__name__}")


def load_prompts(spec: str, tokenizer, split: str = "train", config: str | None = None,
                 column: str = "prompt") -> PromptDataset:
    rows = read_rows(spec, split, config)
    require_columns(rows, [column], spec)
    texts, token_ids = [], []
    chat = is_conversational(rows[0][column])
    for i, row in enumerate(rows):
        where = f"{spec}: row {i + 1}"
        if is_conversational(row[column]) != chat:
            raise UsageError(f"{where}: mixes plain-text and chat-message prompts; use one format in a dataset")
        texts.append(render_prompt(row[column], tokenizer, where))
        if not texts[-1].strip():
            raise UsageError(f"{where}: the prompt is empty; remove the row or give it text")
        templated = not isinstance(row[column], str)  # the chat template wrote BOS (if any) itself
        token_ids.append(tokenizer(texts[-1], add_special_tokens=not templated)["input_ids"])
    return PromptDataset(rows=rows, texts=texts, token_ids=token_ids, prompt_column=column)
