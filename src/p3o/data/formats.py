"""The ecosystem's standard dataset formats (as TRL uses them): prompt–completion and preference rows.

Each format comes plain or conversational:

- plain: `prompt`, `completion` (or `chosen`, `rejected`) are strings;
- conversational: `prompt` is a list of `{"role", "content"}` messages and every completion is a list of
  assistant messages, rendered with the tokenizer's chat template (`render_example`).

Two shorthand layouts are normalised on load, so the rest of the library sees only the explicit one:
`messages` (one conversation whose last turn is the completion) and the implicit-prompt preference
layout (`chosen`/`rejected` are whole conversations that share the prompt as a prefix).
Rows are numbered from 1 in errors, in the order `read_rows` returns them.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p3o.data.files import LOCAL_SUFFIXES, read_rows
from p3o.data.prompts import is_conversational, render_prompt, text_contents
from p3o.data.turns import ReplyEnds, cut_at_stop
from p3o.errors import UsageError

log = logging.getLogger(__name__)
Row = dict[str, Any]
EVAL_SPLITS = ("test", "validation")  # the held-out splits a `datasets` source may already have


def load_completions(spec: str, split: str = "train", config: str | None = None,
                     prompt_column: str = "prompt", completion_column: str = "completion") -> list[Row]:
    """Prompt–completion rows, each `{"prompt", "completion", **other columns}`.

    A `messages` column is split into prompt (all turns but the last) and completion (the last turn,
    which must be the assistant's) when the prompt and completion columns are both absent.
    """
    rows = [_with_text_contents(row, [prompt_column, completion_column, "messages"], f"{spec}: row {i}")
            for i, row in enumerate(read_rows(spec, split, config), start=1)]
    if prompt_column not in rows[0] and completion_column not in rows[0] and "messages" in rows[0]:
        rows = [_split_messages(row, f"{spec}: row {i}") for i, row in enumerate(rows, start=1)]
        prompt_column, completion_column = "prompt", "completion"
    if prompt_column not in rows[0] and completion_column not in rows[0] and "text" in rows[0]:
        raise UsageError(f"{spec} has a 'text' column but no {prompt_column!r}/{completion_column!r} (or 'messages'): "
                         "p3o sft learns replies to prompts, as the RL stage then samples them; split each text "
                         "into prompt and completion, or give chat messages")
    out, first_kind = [], None
    for i, row in enumerate(rows, start=1):
        where = f"{spec}: row {i}"
        _require(row, [prompt_column, completion_column], where)
        prompt, completion = row[prompt_column], row[completion_column]
        first_kind = _same_kind(first_kind, _check_example(prompt, completion, completion_column, where), where)
        out.append(_rename(row, {prompt_column: "prompt", completion_column: "completion"}))
    return out


def load_preferences(spec: str, split: str = "train", config: str | None = None, prompt_column: str = "prompt",
                     chosen_column: str = "chosen", rejected_column: str = "rejected") -> list[Row]:
    """Preference rows, each `{"prompt", "chosen", "rejected", **other columns}`.

    Without a prompt column, `chosen` and `rejected` are whole texts or conversations and their shared
    beginning becomes the prompt (`extract_prompt`). Rows with chosen == rejected are kept (they carry
    no preference but are part of the data) and counted in a warning.
    """
    rows = [_with_text_contents(row, [prompt_column, chosen_column, rejected_column], f"{spec}: row {i}")
            for i, row in enumerate(read_rows(spec, split, config), start=1)]
    implicit = prompt_column not in rows[0]
    out, first_kind = [], None
    for i, row in enumerate(rows, start=1):
        where = f"{spec}: row {i}"
        _require(row, [chosen_column, rejected_column] if implicit else [prompt_column, chosen_column, rejected_column],
                 where)
        if implicit:
            prompt, chosen, rejected = extract_prompt(row[chosen_column], row[rejected_column], where)
            row = {**row, prompt_column: prompt, chosen_column: chosen, rejected_column: rejected}
        kind = _check_example(row[prompt_column], row[chosen_column], chosen_column, where)
        _check_example(row[prompt_column], row[rejected_column], rejected_column, where)  # same prompt: same kind
        first_kind = _same_kind(first_kind, kind, where)
        out.append(_rename(row, {prompt_column: "prompt", chosen_column: "chosen", rejected_column: "rejected"}))
    ties = count_ties(out)
    if out and ties == len(out):
        raise UsageError(f"{spec}: every row has chosen == rejected, so there is no preference to learn; "
                         "check the chosen and rejected columns")
    if ties:
        log.warning("%s: %d of %d rows have chosen == rejected; they are kept but carry no preference",
                    spec, ties, len(out))
    return out


def count_ties(rows: list[Row]) -> int:
    """Rows whose chosen and rejected completions are identical."""
    return sum(row["chosen"] == row["rejected"] for row in rows)


def extract_prompt(chosen: Any, rejected: Any, where: str) -> tuple[Any, Any, Any]:
    """Split two whole texts or conversations into (shared prompt, chosen rest, rejected rest).

    Conversations: the prompt is the common leading messages, leaving at least the last message of
    each as its completion. Text: the common leading text, cut back to the end of the last whole word
    so the differing word and the space before it go with the completion (" yes" vs " no", as
    tokenizers that attach spaces to words expect).
    """
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if _is_blank(value):
            raise UsageError(f"{where}: {name} is empty; remove the row or give it text")
    if is_conversational(chosen) and is_conversational(rejected):
        shared = _common_prefix_length(chosen, rejected)
        shared = min(shared, len(chosen) - 1, len(rejected) - 1)  # keep the final turn as the completion
        if shared < 1:
            raise UsageError(f"{where}: chosen and rejected share no leading messages to use as the prompt; "
                             "add a prompt column")
        return chosen[:shared], chosen[shared:], rejected[shared:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = _common_prefix_length(chosen, rejected)
        if cut == len(chosen) == len(rejected):
            raise UsageError(f"{where}: chosen and rejected are identical text, so the prompt cannot be found; "
                             "add a prompt column")
        while cut > 0 and not chosen[cut - 1].isspace():  # back to the start of the differing word
            cut -= 1
        while cut > 0 and chosen[cut - 1].isspace():  # the space before it belongs to the completion
            cut -= 1
        if cut == 0:
            raise UsageError(f"{where}: chosen and rejected share no leading text to use as the prompt; "
                             "add a prompt column")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise UsageError(f"{where}: without a prompt column, chosen and rejected must both be text or both be "
                     f"lists of {{'role', 'content'}} messages; got {_describe(chosen)} and {_describe(rejected)}")


def split_held_out(rows: list[Row], eval_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic (train, eval) split; rows keep their order within each part.

    Rows sharing a prompt stay on the same side (one TL;DR post has many comparisons; splitting them
    would put the eval prompts in the training data), so the eval size is the target rounded up to a
    whole group. The target is `eval_fraction * len(rows)`, at least 1.
    """
    if not 0 < eval_fraction < 1:
        raise UsageError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        key = json.dumps(row["prompt"], sort_keys=True) if "prompt" in row else f"row {i}"
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    target = max(1, round(eval_fraction * len(rows)))
    eval_indices: set[int] = set()
    for group in order:
        if len(eval_indices) >= target:
            break
        eval_indices.update(group)
    if len(eval_indices) > 2 * target or len(eval_indices) == len(rows):
        # Too few distinct prompts to hold out whole ones at about the asked size: hold out rows.
        log.warning("only %d distinct prompts: holding out %d rows rather than whole prompts, so held-out "
                    "prompts also occur in training; give --eval_dataset for a clean split", len(groups), target)
        eval_indices = set(random.Random(seed).sample(range(len(rows)), target))
    if len(eval_indices) == len(rows):
        raise UsageError(f"cannot hold out {eval_fraction:g} of {len(rows)} rows ({len(groups)} distinct prompts) "
                         "and keep a training row; add rows, lower eval_fraction or give an eval dataset")
    train = [row for i, row in enumerate(rows) if i not in eval_indices]
    return train, [row for i, row in enumerate(rows) if i in eval_indices]


def load_with_held_out(loader: Callable[..., list[Row]], spec: str, eval_spec: str | None = None,
                       eval_fraction: float = 0.05, seed: int = 0, **kw) -> tuple[list[Row], list[Row]]:
    """(train rows, eval rows) via `loader` (`load_completions`, `load_preferences`, ...).

    The eval rows come from `eval_spec` if given, else from a `test`/`validation` split of a `datasets`
    source, else from `split_held_out` of the training rows.
    """
    train = _numbered(loader(spec, **kw), f"{spec}")
    if eval_spec is not None:
        held_out = _numbered(loader(eval_spec, **kw), f"{eval_spec}")
    elif eval_split := _held_out_split(spec, kw.get("split", "train"), kw.get("config")):
        held_out = _numbered(loader(spec, **{**kw, "split": eval_split}), f"{spec} ({eval_split} split)")
    else:
        rows = len(train)
        train, held_out = split_held_out(train, eval_fraction, seed)
        log.info("holding out %d of the %d rows of %s for evaluation (--eval_fraction %g; give an eval dataset to "
                 "train on every row)", len(held_out), rows, spec, eval_fraction)  # TRL trains on every row
    if not train or not held_out:  # loaders refuse empty datasets; this guards custom loaders
        raise UsageError(f"dataset {spec}: need at least one training and one eval row, "
                         f"got {len(train)} and {len(held_out)}")
    return train, held_out


WHERE = "_p3o_where"  # a row's place in its file, kept through the held-out split for later errors


def _numbered(rows: list[Row], name: str) -> list[Row]:
    return [{**row, WHERE: f"{name}: row {i}"} for i, row in enumerate(rows, start=1)]


def render_example(prompt: Any, completion: Any, tokenizer, where: str) -> tuple[str, str]:
    """(prompt text, completion text) for the policy: plain text as is; chat through the chat template.

    For chat, the completion text is what the template writes after the prompt with a generation
    prompt: render(prompt + completion)[len(render(prompt)):]. That holds only for templates whose
    full rendering starts with the prompt rendering, which is checked.
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    if not (is_conversational(prompt) and is_conversational(completion)):
        raise UsageError(f"{where}: prompt and completion must both be text or both be chat messages; "
                         f"got {_describe(prompt)} and {_describe(completion)}")
    prompt_text = render_prompt(prompt, tokenizer, where)
    try:
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    except Exception as exc:  # jinja raises its own errors
        raise UsageError(f"{where}: the tokenizer's chat template refused these messages "
                         f"({type(exc).__name__}: {exc})") from None
    if not full.startswith(prompt_text):
        raise UsageError(f"{where}: the chat template renders the conversation differently from the prompt "
                         "with a generation prompt, so the completion cannot be cut off it; use a template "
                         "whose full rendering starts with the prompt rendering, or plain-text data")
    return prompt_text, full[len(prompt_text):]


def example_token_ids(tokenizer, prompt: Any, completion: Any, where: str,
                      ends: ReplyEnds | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids), tokenized as the policy sees them in RL: the prompt with special
    tokens once (a chat template writes its own), then the completion up to and including its first
    stop token, exactly where sampling would have stopped (`<|im_end|>`, not the `\n` a ChatML
    template writes after it); a completion without one gets the end of turn (chat) or EOS.
    `ends`: the tokenizer's `ReplyEnds`, computed once per dataset by the caller."""
    ends = ends or ReplyEnds.of(tokenizer)
    if is_conversational(completion) and len(completion) > 1:  # it would be cut at the first one's end
        raise UsageError(f"{where}: the completion has {len(completion)} messages; give the one assistant reply "
                         "(earlier turns belong in the prompt)")
    prompt_text, completion_text = render_example(prompt, completion, tokenizer, where)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=isinstance(prompt, str))["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return prompt_ids, cut_at_stop(completion_ids, ends.stop_ids, ends.text if isinstance(prompt, str) else ends.chat)


def earlier_replies(tokenizer, prompt: Any, where: str, ends: ReplyEnds) -> tuple[list[int], list[bool]] | None:
    """A prompt's ids exactly as `example_token_ids` gives them (the rendered prompt tokenized
    whole), and which of them are its assistant replies, each up to and including its end-of-turn
    token as a sampled reply ends: what SFT on a whole conversation learns besides the final reply.
    Plain text, or a chat prompt without an assistant turn: no reply.

    Each reply's characters are found by rendering the conversation up to it (with the generation
    prompt, where the model would answer) and through it; a token is a reply's if it holds any of its
    characters. None where that cannot be done: a template that renders earlier turns differently
    once later ones follow (Qwen3's drops their reasoning), or a tokenizer without character offsets."""
    whole = render_prompt(prompt, tokenizer, where)
    replies = [] if isinstance(prompt, str) else [j for j, m in enumerate(prompt) if j > 0 and m["role"] == "assistant"]
    if not replies:
        ids = tokenizer(whole, add_special_tokens=isinstance(prompt, str))["input_ids"]
        return ids, [False] * len(ids)
    if not getattr(tokenizer, "is_fast", False):
        return None
    spans = []  # (start, end) characters of each reply in `whole`
    for j in replies:
        before, reply = render_example(prompt[:j], prompt[j:j + 1], tokenizer, where)
        if not whole.startswith(before + reply):
            return None
        spans.append((len(before), len(before) + len(reply)))
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    trained = [False] * len(ids)
    for first, last in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if a < last and b > first and b > a]
        stop = next((i for i in inside if ids[i] in ends.stop_ids), None)  # the reply ends here, as sampled
        for i in inside if stop is None else [i for i in inside if i <= stop]:
            trained[i] = True
    return ids, trained


def _split_messages(row: Row, where: str) -> Row:
    """The `messages` layout as prompt (all turns but the last) and completion (the last turn)."""
    messages = row["messages"]
    if not is_conversational(messages) or len(messages) < 2:
        raise UsageError(f"{where}: messages must be a list of at least two {{'role', 'content'}} turns "
                         f"(the prompt, then the assistant's reply); got {_describe(messages)}")
    if messages[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the last message must be the assistant's (it is the completion), "
                         f"got role {messages[-1]['role']!r}")
    rest = {key: value for key, value in row.items() if key != "messages"}
    return {**rest, "prompt": messages[:-1], "completion": messages[-1:]}


def _check_example(prompt: Any, completion: Any, name: str, where: str) -> str:
    """"text" or "chat" for a valid (prompt, completion) pair; a UsageError naming `where` otherwise."""
    if isinstance(prompt, str) and isinstance(completion, str):
        kind, empty_prompt = "text", not prompt.strip()
    elif is_conversational(prompt) and is_conversational(completion):
        roles = sorted({str(m["role"]) for m in completion} - {"assistant"})
        if roles:
            raise UsageError(f"{where}: {name} messages must all have role 'assistant', got {roles[0]!r}; "
                             "earlier turns belong in the prompt")
        kind, empty_prompt = "chat", not prompt
    else:
        raise UsageError(f"{where}: prompt and {name} must both be text or both be lists of "
                         f"{{'role', 'content'}} messages; got {_describe(prompt)} and {_describe(completion)}")
    if empty_prompt:
        raise UsageError(f"{where}: the prompt is empty; remove the row or give it text")
    if _is_blank(completion):
        raise UsageError(f"{where}: {name} is empty; remove the row or give it text")
    return kind


def _same_kind(first: str | None, kind: str, where: str) -> str:
    if first is not None and kind != first:
        raise UsageError(f"{where}: mixes plain-text and chat-message rows; use one format in a dataset")
    return kind


def _with_text_contents(row: Row, columns: list[str], where: str) -> Row:
    """`row` with the messages of `columns` given text contents (`text_contents`)."""
    return {key: text_contents(value, where) if key in columns else value for key, value in row.items()}


def _require(row: Row, columns: list[str], where: str) -> None:
    missing = [column for column in columns if column not in row]
    if missing:
        raise UsageError(f"{where} has no column {missing[0]!r}; columns found: {', '.join(row) or 'none'}")


def _rename(row: Row, names: dict[str, str]) -> Row:
    """`row` with the given columns under their standard names (the standard names last)."""
    rest = {key: value for key, value in row.items() if key not in names}
    return {**rest, **{new: row[old] for old, new in names.items()}}


def _is_blank(value: Any) -> bool:
    """Text with only whitespace, or messages with no text (None counts: missing values in Parquet/CSV)."""
    if isinstance(value, str):
        return not value.strip()
    if is_conversational(value):
        return not any(isinstance(m["content"], str) and m["content"].strip() for m in value)
    return value is None


def _common_prefix_length(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if is_conversational(value):
        return "chat messages"
    if isinstance(value, list):
        return "a list that is not {'role', 'content'} messages"
    return "null" if value is None else type(value).__name__


def _held_out_split(spec: str, train_split: str, config: str | None) -> str | None:
    """The `test` or `validation` split of a `datasets` source, if it has one (local files have none)."""
    if not isinstance(spec, str):  # rows in memory
        return None
    path = Path(spec)
    if path.suffix in LOCAL_SUFFIXES or path.is_file():
        return None
    if (path / "dataset_dict.json").is_file():  # written by DatasetDict.save_to_disk
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
    elif (path / "dataset_info.json").is_file():  # a single saved Dataset: no splits
        return None
    else:
        try:
            import datasets

            names = datasets.get_dataset_split_names(spec, config)
        except Exception:  # offline or not a dataset: the loader reports that; fall back to a random split
            return None
    return next((name for name in EVAL_SPLITS if name in names and name != train_split), None)
