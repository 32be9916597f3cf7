"""Converters for the TL;DR comparisons and HH-RLHF schemas, and `p3o convert` end to end."""
from __future__ import annotations

import argparse
import copy
import json
import re

import pytest
from conftest import FIXTURES, bot, user, write_jsonl

from p3o.cli import convert
from p3o.data.converters import (
    CONVERTERS,
    SkipRow,
    convert_rows,
    hh_row,
    hh_text_row,
    parse_hh_transcript,
    tldr_row,
)
from p3o.data.files import read_rows
from p3o.data.formats import count_ties, load_preferences
from p3o.errors import UsageError


@pytest.fixture(scope="module")
def tldr():
    return read_rows(str(FIXTURES / "tldr_comparisons.jsonl"))


@pytest.fixture(scope="module")
def hh():
    return read_rows(str(FIXTURES / "hh.jsonl"))


def test_tldr_prompt_and_choice(tldr):
    post = "My cat sits on the dog every morning and the dog likes it."
    prompt = f"SUBREDDIT: r/pets\n\nTITLE: Cat and dog\n\nPOST: {post}\n\nTL;DR:"
    assert tldr_row(tldr[0], "w") == {"prompt": prompt, "chosen": " the cat sits on the dog", "rejected": " the dog eats"}
    # choice 1 picks the second summary; each summary is stripped and given exactly one leading space
    assert tldr_row(tldr[1], "w") == {"prompt": prompt, "chosen": " the cat sits on a happy dog",
                                      "rejected": " the bird sleeps"}


def test_tldr_awkward_rows(tldr):
    stripped = tldr_row(tldr[2], "w")["prompt"]
    assert stripped == ("SUBREDDIT: r/relationships\n\nTITLE: Horse jumps\n\n"
                        "POST: A small horse jumps.\n\nThe old cow sees it.\n\nTL;DR:")
    article = tldr_row(tldr[3], "w")  # a news article: no post, no subreddit
    assert article["prompt"] == ("TITLE: Frog finds a pear\n\nPOST: A young frog finds a pear. The frog eats the pear."
                                 "\n\nTL;DR:")
    assert article["chosen"] == " frog eats pear"
    assert tldr_row(tldr[4], "w")["chosen"] == " owner" and "Naïve café" in tldr_row(tldr[4], "w")["prompt"]


def broken(row, path, value):
    """A deep copy of `row` with the field at `path` (keys) set to `value`, or deleted for None."""
    row = copy.deepcopy(row)
    *parents, last = path
    target = row
    for key in parents:
        target = target[key]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return row


@pytest.mark.parametrize("path, value, message", [
    (("info", "post"), None, "info has no post text"),  # no post and article null
    (("info", "subreddit"), None, None),  # fine: prompt without the subreddit line
    (("choice",), 2, "choice must be 0 or 1"),
    (("choice",), True, "choice must be 0 or 1"),
    (("summaries",), [{"text": "only one"}], "summaries must be a list of two objects"),
    (("summaries", 1, "text"), "  \n", "summary 1 is empty"),
    (("info",), None, "has no field 'info'; fields found: split, summaries, choice"),
    (("info", "title"), None, "info has no field 'title'; fields found: id, post, subreddit"),
    (("info", "title"), 7, "info.title must be text, got int"),
])
def test_tldr_malformed_rows(tldr, path, value, message):
    row = broken(tldr[0], path, value)
    if message is None:
        assert tldr_row(row, "f.jsonl: row 3")["prompt"].startswith("TITLE: Cat and dog")
        return
    with pytest.raises(UsageError, match=rf"^f\.jsonl: row 3.*{re.escape(message)}"):
        tldr_row(row, "f.jsonl: row 3")


def test_hh_transcripts_become_chat_preferences(hh):
    assert hh_row(hh[0], "w") == {"prompt": [user("What does a cat eat?")], "chosen": [bot("A cat eats fish.")],
                                  "rejected": [bot("A cat eats a pear.")]}
    multi = hh_row(hh[1], "w")
    assert multi["prompt"] == [user("Hi"), bot("Hello! How can I help?"), user("Tell me a story.")]
    assert multi["chosen"] == [bot("The quick dog runs.")] and multi["rejected"] == [bot("No.")]


def test_hh_awkward_rows(hh):
    # outer whitespace, and an earlier turn differing only in whitespace, still share the prompt
    assert hh_row(hh[2], "w") == {"prompt": [user("Is the frog big?")], "chosen": [bot("Yes, the frog is big.")],
                                  "rejected": [bot("It is small.")]}
    quoted = hh_row(hh[3], "w")["chosen"]  # "Human:" not after a blank line is part of the content
    assert quoted == [bot("Like this:\nHuman: hi\nAssistant: hello. A line may also say Human: anything.")]
    with pytest.raises(SkipRow, match="empty final assistant turn"):
        hh_row(hh[4], "w")
    tie = hh_row(hh[5], "w")
    assert tie["chosen"] == tie["rejected"] == [bot("Same.")] and tie["prompt"] == [user("Same?")]


def test_parse_hh_transcript():
    assert parse_hh_transcript("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", "w") == [
        user("a"), bot("b"), user("c"), bot("")]
    with pytest.raises(UsageError, match="w: text before the first turn"):
        parse_hh_transcript("Hello\n\nHuman: a\n\nAssistant: b", "w")
    with pytest.raises(UsageError, match="w: expected transcript text, got list"):
        parse_hh_transcript([user("a")], "w")


H = "\n\nHuman: "
A = "\n\nAssistant: "


@pytest.mark.parametrize("row", [
    {"chosen": f"{H}hi{A}yes{H}more?{A}sure", "rejected": f"{H}hi{A}no{H}more?{A}nope"},  # an earlier turn differs
    {"chosen": f"{H}hi{A}yes", "rejected": f"{H}bye{A}yes"},
    {"chosen": f"{H}hi{A}yes{H}again", "rejected": f"{H}hi{A}yes{H}other"},
])
def test_hh_rows_that_are_not_one_conversation_are_skipped_and_counted(row):
    """A user cannot edit a hub dataset, so such rows are skipped (and counted), not fatal."""
    with pytest.raises(SkipRow, match="not the shared conversation plus one final assistant turn"):
        hh_row(row, "hh.jsonl: row 4")


def test_hh_text_keeps_the_datasets_own_layout():
    row = {"chosen": f"{H}hi{A}hello{H}how are you?{A}fine", "rejected": f"{H}hi{A}hello{H}how are you?{A}bad"}
    assert hh_text_row(row, "row 1") == {"prompt": f"{H}hi{A}hello{H}how are you?\n\nAssistant:",
                                         "chosen": " fine", "rejected": " bad"}


@pytest.mark.parametrize("row, message", [
    ({"chosen": f"{H}hi{A}yes"}, "has no field 'rejected'; fields found: chosen"),
    ({"chosen": "", "rejected": f"{H}hi{A}yes"}, "a transcript has no turns"),
])
def test_hh_malformed_rows(row, message):
    with pytest.raises(UsageError, match=rf"^hh\.jsonl: row 4.*{re.escape(message)}"):
        hh_row(row, "hh.jsonl: row 4")


def test_convert_rows_counts_skips_and_rejects_unknown_names(hh, tldr):
    rows, skipped = convert_rows("hh", hh, "hh.jsonl")
    assert len(rows) == 5 and skipped == {"empty final assistant turn": [5]}
    with pytest.raises(UsageError, match="unknown format 'shp'; known formats: hh, hh-text, tldr"):
        convert_rows("shp", hh, "x")
    bad = {"info": {"post": "p", "title": "t"}, "summaries": [], "choice": 0}
    with pytest.raises(UsageError, match=r"^bad\.jsonl: row 2: summaries must be"):
        convert_rows("tldr", [tldr[0], bad], "bad.jsonl")


def parse(*argv):
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("name, count, kind", [("tldr", 5, str), ("hh", 5, list)])
def test_convert_cli_end_to_end(tmp_path, capsys, name, count, kind):
    source = FIXTURES / ("tldr_comparisons.jsonl" if name == "tldr" else "hh.jsonl")
    out = tmp_path / "sub" / f"{name}.jsonl"
    convert.run(parse("--format", name, "--input", str(source), "--output", str(out)))
    printed = capsys.readouterr().out
    assert f"wrote {count} rows to {out}" in printed
    assert ("skipped 1 rows (empty final assistant turn: rows 5)" in printed) == (name == "hh")
    rows = load_preferences(str(out))  # the output is a standard preference dataset
    assert len(rows) == count and all(isinstance(r["prompt"], kind) for r in rows)
    assert count_ties(rows) == (name == "hh")
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind


def test_convert_cli_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    args = ["--format", "hh", "--input", str(FIXTURES / "hh.jsonl"), "--output", str(out)]
    with pytest.raises(UsageError, match="exists; pass --overwrite"):
        convert.run(parse(*args))
    assert out.read_text() == "precious\n"
    convert.run(parse(*args, "--overwrite"))
    assert len(out.read_text().splitlines()) == 5 and "wrote 5 rows" in capsys.readouterr().out


def test_convert_cli_errors(tmp_path):
    source = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": f"{H}hi{A}", "rejected": f"{H}hi{A}"}])
    with pytest.raises(UsageError, match=r"no rows of .* could be converted \(1 rows \(empty final"):
        convert.run(parse("--format", "hh", "--input", str(source), "--output", str(tmp_path / "o.jsonl")))
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(UsageError, match="is the input file"):
        convert.run(parse("--format", "hh", "--input", str(source), "--output", str(source), "--overwrite"))
    with pytest.raises(UsageError, match=r"hh\.jsonl: row 1 has no field 'info'"):
        convert.run(parse("--format", "tldr", "--input", str(source), "--output", str(tmp_path / "o.jsonl")))
    with pytest.raises(SystemExit):  # argparse rejects an unknown format with the list of choices
        parse("--format", "shp", "--input", "x", "--output", "y")


def test_cli_choices_are_the_registry():
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "format")
    assert sorted(choices) == sorted(CONVERTERS)


def test_converted_output_is_stable_json(tmp_path):
    out = tmp_path / "tldr.jsonl"
    convert.run(parse("--format", "tldr", "--input", str(FIXTURES / "tldr_comparisons.jsonl"), "--output", str(out)))
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["prompt", "chosen", "rejected"]
    assert "café" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
