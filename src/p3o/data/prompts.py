"""Prompt-only data: `prompt` as plain text or as chat messages rendered with the chat template."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from p3o.data.files import read_rows, require_columns
from p3o.data.turns import ReplyEnds
from p3o.errors import UsageError
from p3o.options import did_you_mean


@dataclass
class PromptDataset:
    """Rows of a prompt-only dataset; `texts[i]` is row i's prompt rendered for the policy and
    `token_ids[i]` its tokens (special tokens added once: a chat template already has its own)."""

    rows: list[dict[str, Any]]
    texts: list[str]
    token_ids: list[list[int]]
    prompt_column: str
    responses: list[list[list[int]]] | None = None  # preference data: [chosen ids, rejected ids] per row

    def __len__(self) -> int:
        return len(self.rows)


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def text_contents(value: Any, where: str) -> Any:
    """`value` with every message's content as text: a list of text parts (OpenAI's layout,
    `[{"type": "text", "text": ...}]`) is joined into one string; content that is neither (a number,
    an image part) is refused in one line. Anything that is not a list of messages is returned as is."""
    if not is_conversational(value):
        return value
    out = []
    for i, message in enumerate(value):
        content = message["content"]
        if isinstance(content, list):
            kinds = sorted({str(part.get("type")) if isinstance(part, dict) else type(part).__name__
                            for part in content} - {"text"})
            if kinds or not all(isinstance(part.get("text"), str) for part in content):
                raise UsageError(f"{where}: message {i}'s content has parts p3o cannot train on "
                                 f"({', '.join(kinds) or 'a text part without text'}); give text, or text parts "
                                 "{'type': 'text', 'text': ...}")
            message = {**message, "content": "".join(part["text"] for part in content)}
        elif content is not None and not isinstance(content, str):  # None: a tool call's turn
            raise UsageError(f"{where}: message {i}'s content is {type(content).__name__} ({content!r:.40}); "
                             "give it as text")
        out.append(message)
    return out


def render_prompt(prompt: Any, tokenizer, where: str, add_generation_prompt: bool = True) -> str:
    """Plain text is used as is; chat messages go through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if is_conversational(prompt):
        _check_roles(prompt, where)
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{where}: the prompt is a list of chat messages but the tokenizer has no chat "
                             "template; give plain-text prompts or a tokenizer with a chat_template")
        try:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)
            if add_generation_prompt and tokenizer.chat_template not in _OPENS_REPLIES:  # once per template
                _check_generation_prompt(prompt, text, tokenizer, where)
                _OPENS_REPLIES.add(tokenizer.chat_template)
        except UsageError:
            raise
        except Exception as exc:  # jinja raises its own errors, e.g. "System role not supported"
            raise UsageError(f"{where}: the tokenizer's chat template refused these messages "
                             f"({type(exc).__name__}: {exc})") from None
        return text
    _check_messages(prompt, where)
    raise UsageError(f"{where}: a prompt must be text or a list of {{'role', 'content'}} messages, "
                     f"got {type(prompt).__name__}")


# Roles that chat templates know; another (a typo such as "usr") most templates would render silently.
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")


def _check_messages(prompt: Any, where: str) -> None:
    """A list of message dicts that is not quite one says which message and what it lacks."""
    if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
        return
    for i, message in enumerate(prompt):
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise UsageError(f"{where}: message {i} has no {' and no '.join(missing)}; each message needs "
                             "'role' and 'content'")


def _check_roles(prompt: list, where: str) -> None:
    """A role near a known one is a typo (refused); another may be a custom template's own (said once)."""
    for i, message in enumerate(prompt):
        role = str(message["role"])
        if role in ROLES or role in _UNKNOWN_ROLES:
            continue
        if near := did_you_mean(role, ROLES):
            raise UsageError(f"{where}: message {i} has role {role!r}{near}; roles are {', '.join(ROLES)}")
        _UNKNOWN_ROLES.add(role)
        logging.getLogger("p3o").warning("%s: role %r is none of %s; it goes to the chat template as it is", where,
                                         role, ", ".join(ROLES))


_UNKNOWN_ROLES: set[str] = set()  # roles already warned about


_OPENS_REPLIES: set[str] = set()  # chat templates whose generation prompt was checked (a template's property)


def _check_generation_prompt(prompt: list, text: str, tokenizer, where: str) -> None:
    """Refuse a template that ignores add_generation_prompt where the reply needs a header."""
    if text == tokenizer.apply_chat_template(prompt, tokenize=False) and _reply_needs_a_header(prompt, text, tokenizer):
        raise UsageError(f"{where}: the tokenizer's chat template writes no generation prompt (it ignores "
                         "add_generation_prompt), so the model would go on with the user's turn instead of "
                         "answering; use a template that opens the assistant's turn when add_generation_prompt "
                         "is true, or plain-text prompts")


def _reply_needs_a_header(prompt: list, rendered: str, tokenizer) -> bool:
    """Whether the template writes text between the prompt and an assistant reply (a header such as
    "assistant:") that the generation prompt left out. Templates like Mistral's need none: their
    user turn ends with `[/INST]`, which opens the reply, so add_generation_prompt has nothing to add."""
    probe = "p3oreply"
    try:
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": probe}], tokenize=False)
    except Exception:  # the template refuses this shape (e.g. two assistant turns in a row): no verdict
        return False
    return full.startswith(rendered) and bool(full[len(rendered):].split(probe)[0].strip())


def load_prompts(spec: str, tokenizer, split: str = "train", config: str | None = None,
                 column: str = "prompt") -> PromptDataset:
    rows = read_rows(spec, split, config)
    require_columns(rows, [column], spec)
    texts, token_ids = [], []
    chat = is_conversational(rows[0][column])
    for i, row in enumerate(rows):
        where = f"{spec}: row {i + 1}"
        rows[i] = row = {**row, column: text_contents(row[column], where)}
        if is_conversational(row[column]) != chat:
            raise UsageError(f"{where}: mixes plain-text and chat-message prompts; use one format in a dataset")
        texts.append(render_prompt(row[column], tokenizer, where))
        if not texts[-1].strip():
            raise UsageError(f"{where}: the prompt is empty; remove the row or give it text")
        templated = not isinstance(row[column], str)  # the chat template wrote BOS (if any) itself
        token_ids.append(tokenizer(texts[-1], add_special_tokens=not templated)["input_ids"])
    return PromptDataset(rows=rows, texts=texts, token_ids=token_ids, prompt_column=column)


def load_preference_pairs(spec: str, tokenizer, split: str = "train", config: str | None = None,
                          prompt_column: str = "prompt", chosen_column: str = "chosen",
                          rejected_column: str = "rejected", max_response_tokens: int | None = None) -> PromptDataset:
    """Preference rows as prompts plus their given responses: chosen and rejected token ids, each
    ending at its first stop token as a sampled response would (`example_token_ids`) and cut to
    `max_response_tokens` (the number cut is logged)."""
    import logging

    from p3o.data.formats import example_token_ids, load_preferences  # local: p3o.data.formats imports this module

    rows = load_preferences(spec, split, config, prompt_column, chosen_column, rejected_column)
    texts, token_ids, responses, cut, ends = [], [], [], 0, ReplyEnds.of(tokenizer)
    for i, row in enumerate(rows):
        where = f"{spec}: row {i + 1}"
        prompt_ids, chosen = example_token_ids(tokenizer, row["prompt"], row["chosen"], where, ends)
        _, rejected = example_token_ids(tokenizer, row["prompt"], row["rejected"], where, ends)
        if max_response_tokens is not None:
            cut += (len(chosen) > max_response_tokens) + (len(rejected) > max_response_tokens)
            chosen, rejected = chosen[:max_response_tokens], rejected[:max_response_tokens]
        texts.append(render_prompt(row["prompt"], tokenizer, where))
        token_ids.append(prompt_ids)
        responses.append([chosen, rejected])
    if cut:
        logging.getLogger("p3o").warning("%s: %d of %d completions are longer than %d tokens (--max_new_tokens) "
                                         "and were cut to it, losing their EOS", spec, cut, 2 * len(rows),
                                         max_response_tokens)
    return PromptDataset(rows=rows, texts=texts, token_ids=token_ids, prompt_column="prompt", responses=responses)
