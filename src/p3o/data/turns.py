"""Where a reply ends: the tokens that stop sampling, and the same cut on given completions.

A response ends at its first stop token, which is part of it (the policy learns to stop). The stop
tokens are the tokenizer's EOS and the special token its chat template writes right after an
assistant reply: `<|im_end|>` (ChatML: Qwen, SmolLM2), `<|eot_id|>` (Llama 3), `<end_of_turn>`
(Gemma), `<|end|>` (Phi-3). Templates write more after it (`<|im_end|>\\n`); sampling never produces
that, so SFT labels and DPO's given replies stop at the same token sampling stops at.
"""
from __future__ import annotations

from dataclasses import dataclass

from p3o.errors import UsageError

_PROBE = "p3oreply"  # a reply whose text the template cannot confuse with its own markup


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, the added ones marked special included."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant reply (only whitespace
    between them), or None: no template, or one that ends turns with ordinary text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _PROBE}], tokenize=False)
    except Exception:  # a template with rules of its own (roles, alternation): no end of turn to read
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    after = text[at + len(_PROBE):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = special_ids(tokenizer)
    first = next((i for i, token in enumerate(ids) if token in special), None)
    if first is None or tokenizer.decode(ids[:first]).strip():
        return None
    return ids[first]


def opens_with_bos(tokenizer, ids: list[int]) -> bool:
    """Whether `ids` open with a BOS that opens the whole sequence, to keep when a prompt loses its
    start: BOS first, and not a token the chat template writes at every turn (SmolLM2's `bos_token`
    is `<|im_start|>`: kept alone, it would open a turn with no role) unless the tokenizer itself
    starts every text with it, or it is EOS too (GPT-2's `<|endoftext|>`, written after replies)."""
    bos = tokenizer.bos_token_id
    if bos is None or not ids or ids[0] != bos:
        return False
    return bos not in ids[1:] or bos == tokenizer.eos_token_id or tokenizer("a")["input_ids"][:1] == [bos]


def stop_token_ids(tokenizer, extra: list[int] = ()) -> list[int]:
    """The tokenizer's EOS and the chat template's end of turn, plus `extra` (the model's own); a
    UsageError if there are none, since a response could then never end."""
    return _stops(tokenizer, end_of_turn_id(tokenizer), extra)


def _stops(tokenizer, turn: int | None, extra=()) -> list[int]:
    ids = {i for i in (tokenizer.eos_token_id, turn, *extra) if i is not None}
    if not ids:
        raise UsageError("the tokenizer has no EOS token and no chat template that ends a turn with a special "
                         "token, so a response could never end; set its eos_token (e.g. tokenizer.eos_token = "
                         "'</s>' before saving it, or \"eos_token\" in tokenizer_config.json)")
    return sorted(ids)


def cut_at_stop(completion_ids: list[int], stop_ids: list[int], ending: int) -> list[int]:
    """The completion up to and including its first stop token; `ending` appended if it has none."""
    stops = set(stop_ids)
    for i, token in enumerate(completion_ids):
        if token in stops:
            return completion_ids[:i + 1]
    return [*completion_ids, ending]


@dataclass(frozen=True)
class ReplyEnds:
    """A tokenizer's stop ids, and the token appended to a reply written without one: the end of
    turn for chat (where the template has one), else EOS."""

    stop_ids: list[int]
    chat: int
    text: int

    @classmethod
    def of(cls, tokenizer) -> "ReplyEnds":
        turn, eos = end_of_turn_id(tokenizer), tokenizer.eos_token_id  # the template read once
        stops = _stops(tokenizer, turn)
        text = eos if eos is not None else stops[0]
        return cls(stops, turn if turn is not None else text, text)
