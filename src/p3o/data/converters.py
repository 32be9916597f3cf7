"""Converters from the schemas of the original P3O experiments' datasets to standard preference rows.

- `tldr`: OpenAI's summarize_from_feedback *comparisons* (a Reddit post, two summaries, a choice);
  output is plain text, prompted as in Stiennon et al. (2020) and Huang et al.'s reproduction.
- `hh`: Anthropic HH-RLHF (two full "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts); output is chat
  messages: the shared turns as the prompt, the final assistant turns as chosen and rejected.

Each converter is a pure function of one row and a location for errors, registered in `CONVERTERS`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from p3o.data.formats import extract_prompt
from p3o.errors import UsageError

Row = dict[str, Any]
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
TLDR_PROMPT_NO_SUBREDDIT = "TITLE: {title}\n\nPOST: {post}\n\nTL;DR:"  # news articles (CNN/DM rows)
# A turn starts only at a blank line; "Human:" elsewhere (quoted, or after one newline) is content.
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class SkipRow(Exception):
    """A row that is valid in its schema but has no usable preference (the reason is the message)."""


def tldr_row(row: Row, where: str) -> Row:
    """A summarize_from_feedback comparison as {"prompt", "chosen", "rejected"} text.

    The summaries get one leading space (and lose their own surrounding whitespace) because the
    prompt ends with "TL;DR:" and the policy continues it with " summary".
    """
    info, summaries, choice = (_field(row, key, where) for key in ("info", "summaries", "choice"))
    if not isinstance(info, dict):
        raise UsageError(f"{where}: info must be an object with post, title and subreddit, got {type(info).__name__}")
    post = info.get("post") if info.get("post") is not None else info.get("article")  # CNN/DM rows: article
    if not isinstance(post, str) or not post.strip():
        raise UsageError(f"{where}: info has no post text (post and article are missing or empty); "
                         "remove the row or fill in the post")
    title = _field(info, "title", f"{where}: info")
    if not isinstance(title, str):
        raise UsageError(f"{where}: info.title must be text, got {type(title).__name__}")
    if not (isinstance(summaries, list) and len(summaries) == 2
            and all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries)):
        raise UsageError(f"{where}: summaries must be a list of two objects with a text field")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise UsageError(f"{where}: choice must be 0 or 1 (the index of the preferred summary), got {choice!r}")
    chosen, rejected = summaries[choice]["text"].strip(), summaries[1 - choice]["text"].strip()
    if not chosen or not rejected:
        raise UsageError(f"{where}: summary {choice if not chosen else 1 - choice} is empty; remove the row")
    subreddit = info.get("subreddit")
    template = TLDR_PROMPT if subreddit else TLDR_PROMPT_NO_SUBREDDIT
    prompt = template.format(subreddit=subreddit, title=title.strip(), post=post.strip())
    return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}


def hh_row(row: Row, where: str) -> Row:
    """An HH-RLHF pair as chat messages: the longest shared run of turns is the prompt and what
    remains of each transcript must be one assistant turn (its chosen or rejected reply)."""
    chosen = parse_hh_transcript(_field(row, "chosen", where), f"{where}: chosen")
    rejected = parse_hh_transcript(_field(row, "rejected", where), f"{where}: rejected")
    if not chosen or not rejected:
        raise UsageError(f"{where}: a transcript has no turns; each must hold \\n\\nHuman: and \\n\\nAssistant: turns")
    same_start = chosen[0] == rejected[0]  # else nothing is shared and extract_prompt has no prompt to find
    prompt, chosen_rest, rejected_rest = extract_prompt(chosen, rejected, where) if same_start else ([], chosen, rejected)
    for name, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
        if not prompt or len(rest) != 1 or rest[0]["role"] != "assistant":
            # a hub dataset cannot be edited by its user: skip and count such rows, like empty replies
            raise SkipRow(f"{name} is not the shared conversation plus one final assistant turn")
    if not chosen_rest[0]["content"] or not rejected_rest[0]["content"]:
        raise SkipRow("empty final assistant turn")
    return {"prompt": prompt, "chosen": chosen_rest, "rejected": rejected_rest}


def parse_hh_transcript(text: Any, where: str) -> list[dict[str, str]]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    if not isinstance(text, str):
        raise UsageError(f"{where}: expected transcript text, got {type(text).__name__}")
    # Strip stray outer whitespace, then restore the blank line that marks the first turn.
    pieces = HH_TURN.split("\n\n" + text.strip())  # ["", role, content, role, content, ...]
    if pieces[0].strip():
        raise UsageError(f"{where}: text before the first turn ({pieces[0][:40]!r}); "
                         "a transcript must start with Human: or Assistant:")
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(pieces[1::2], pieces[2::2])]


def hh_text_row(row: Row, where: str) -> Row:
    """An HH-RLHF pair as plain text in the dataset's own layout, for models without a chat template:
    prompt = the shared turns as "\n\nHuman: ...\n\nAssistant:", completions = " " + final reply."""
    pair = hh_row(row, where)
    turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in pair["prompt"])
    return {"prompt": turns + "\n\nAssistant:", "chosen": " " + pair["chosen"][0]["content"],
            "rejected": " " + pair["rejected"][0]["content"]}


CONVERTERS: dict[str, Callable[[Row, str], Row]] = {"tldr": tldr_row, "hh": hh_row, "hh-text": hh_text_row}


def convert_rows(name: str, rows: list[Row], where: str) -> tuple[list[Row], dict[str, list[int]]]:
    """(converted rows, skipped) where skipped maps each reason to the 1-based numbers of its rows."""
    if name not in CONVERTERS:
        raise UsageError(f"unknown format {name!r}; known formats: {', '.join(sorted(CONVERTERS))}")
    convert, converted, skipped = CONVERTERS[name], [], {}
    for number, row in enumerate(rows, start=1):
        try:
            converted.append(convert(row, f"{where}: row {number}"))
        except SkipRow as reason:
            skipped.setdefault(str(reason), []).append(number)
    return converted, skipped


def _field(row: Row, key: str, where: str) -> Any:
    if not isinstance(row, dict) or key not in row:
        found = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise UsageError(f"{where} has no field {key!r}; fields found: {found or 'none'}")
    return row[key]
