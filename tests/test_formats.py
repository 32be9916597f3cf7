"""Standard dataset formats: prompt–completion and preference rows, plain or chat, and held-out splits."""
from __future__ import annotations

import copy
import json
import logging
import re

import pytest
from conftest import FIXTURES, bot, user, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from p3o.data.formats import (
    count_ties,
    extract_prompt,
    load_completions,
    load_preferences,
    load_with_held_out,
    render_example,
    split_held_out,
)
from p3o.errors import UsageError


def test_plain_completions_keep_other_columns_and_order():
    rows = load_completions(str(FIXTURES / "completions_plain.jsonl"))
    assert [r["prompt"] for r in rows] == ["story : the cat", "story : the dog", "story : a bird"]
    assert rows[1] == {"topic": "t1", "prompt": "story : the dog", "completion": " eats a pear ."}


def test_chat_completions():
    rows = load_completions(str(FIXTURES / "completions_chat.jsonl"))
    assert rows[1]["prompt"] == [{"role": "system", "content": "be quick"}, user("story : the dog")]
    assert rows[1]["completion"] == [bot("the dog runs .")]


def test_messages_layout_splits_off_the_last_assistant_turn():
    rows = load_completions(str(FIXTURES / "messages.jsonl"))
    assert rows[0] == {"id": 1, "prompt": [user("story : the cat")], "completion": [bot("the cat sleeps .")]}
    assert len(rows[1]["prompt"]) == 4 and rows[1]["prompt"][-1] == user("and ?")
    assert rows[1]["completion"] == [bot("it eats a plum .")] and "messages" not in rows[1]


def test_custom_column_names_are_normalised(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q one", "answer": " a one"}])
    rows = load_completions(str(path), prompt_column="question", completion_column="answer")
    assert rows == [{"prompt": "q one", "completion": " a one"}]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "answer": "a"}], "row 1 has no column 'completion'; columns found: prompt, answer"),
    ([{"prompt": "p", "completion": "c"}, {"prompt": "p", "text": "c"}],
     "row 2 has no column 'completion'; columns found: prompt, text"),
    ([{"prompt": "p", "completion": "  "}], "row 1: completion is empty"),
    ([{"prompt": "", "completion": "c"}], "row 1: the prompt is empty"),
    ([{"prompt": "p", "completion": None}], "row 1: prompt and completion must both be text or both be lists"),
    ([{"prompt": [user("p")], "completion": "c"}], "got chat messages and text"),
    ([{"prompt": [user("p")], "completion": [user("c")]}], "row 1: completion messages must all have role 'assistant'"),
    ([{"prompt": [user("p")], "completion": [bot("")]}], "row 1: completion is empty"),
    ([{"prompt": [], "completion": [bot("c")]}], "row 1: the prompt is empty"),
    ([{"prompt": "p", "completion": "c"}, {"prompt": [user("p")], "completion": [bot("c")]}],
     "row 2: mixes plain-text and chat-message rows"),
    ([{"messages": [user("p"), bot("c")]}, {"messages": [bot("c"), user("p")]}],
     "row 2: the last message must be the assistant's"),
    ([{"messages": [bot("c")]}], "row 1: messages must be a list of at least two"),
    ([{"messages": "Human: hi"}], r"row 1: messages must be a list of at least two .* got text"),
])
def test_malformed_completion_rows_name_file_and_row(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UsageError, match=message) as info:
        load_completions(str(path))
    assert str(info.value).startswith(f"{path}: row ")


def test_malformed_json_line_is_reported_with_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": \n')
    with pytest.raises(UsageError, match=rf"{path}:2: malformed JSON"):
        load_preferences(str(path))


def test_plain_preferences_keep_ties_and_count_them(caplog):
    with caplog.at_level(logging.WARNING, logger="p3o.data.formats"):
        rows = load_preferences(str(FIXTURES / "preferences_plain.jsonl"))
    assert rows[0] == {"prompt": "story : the cat", "chosen": " eats an apple .", "rejected": " sleeps ."}
    assert len(rows) == 2 and count_ties(rows) == 1
    assert "1 of 2 rows have chosen == rejected" in caplog.text


def test_preferences_that_are_all_ties_are_refused(tmp_path):
    path = tmp_path / "ties.jsonl"
    path.write_text('{"prompt": "p", "chosen": " a", "rejected": " a"}\n' * 3)
    with pytest.raises(UsageError, match="every row has chosen == rejected"):
        load_preferences(str(path))


def test_chat_and_csv_preferences():
    chat = load_preferences(str(FIXTURES / "preferences_chat.jsonl"))
    assert chat[0]["prompt"] == [user("story : the cat")] and chat[0]["rejected"] == [bot("the cat sleeps .")]
    csv_rows = load_preferences(str(FIXTURES / "preferences.csv"))
    assert csv_rows == [{"prompt": "story : the cat", "chosen": " eats, then sleeps .", "rejected": " runs ."}]


def test_implicit_prompt_chat_preferences():
    rows = load_preferences(str(FIXTURES / "preferences_implicit.jsonl"))
    assert rows[0] == {"prompt": [user("story : the cat")], "chosen": [bot("it eats a plum .")],
                       "rejected": [bot("it sleeps .")]}
    assert rows[1]["prompt"] == [user("hi"), bot("hi ."), user("a story ?")]
    assert rows[1]["chosen"] == [bot("the dog runs .")] and rows[1]["rejected"] == [bot("no .")]


def test_implicit_prompt_plain_preferences_cut_at_a_word_boundary():
    rows = load_preferences(str(FIXTURES / "preferences_implicit_plain.jsonl"))
    assert rows[0] == {"prompt": "Question: what does the cat eat?\nAnswer:", "chosen": " an apple",
                       "rejected": " a pear"}
    assert rows[1] == {"prompt": "story : the dog", "chosen": " runs fast", "rejected": " runs"}


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("Q: x\nA: yes", "Q: x\nA: no", ("Q: x\nA:", " yes", " no")),
    ("Q: x\nA: yes", "Q: x\nA: yeah", ("Q: x\nA:", " yes", " yeah")),
    ([user("q"), bot("a")], [user("q"), bot("a")], ([user("q")], [bot("a")], [bot("a")])),  # a tie
    ([user("q"), bot("a"), user("r"), bot("b")], [user("q"), bot("a"), user("r"), bot("c")],
     ([user("q"), bot("a"), user("r")], [bot("b")], [bot("c")])),
])
def test_extract_prompt(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected, "here") == expected


@pytest.mark.parametrize("chosen, rejected, message", [
    ("same text", "same text", "here: chosen and rejected are identical text"),
    ("yes", "no", "here: chosen and rejected share no leading text"),
    ([user("a"), bot("b")], [user("c"), bot("b")], "here: chosen and rejected share no leading messages"),
    ("", "text", "here: chosen is empty"),
    ([user("q"), bot("a")], [], "here: rejected is empty"),
    ("text", [user("q")], "must both be text or both be lists"),
])
def test_extract_prompt_errors(chosen, rejected, message):
    with pytest.raises(UsageError, match=message):
        extract_prompt(chosen, rejected, "here")


@settings(max_examples=60, deadline=None)
@given(st.text(" ab\n", min_size=1), st.text(" ab\n"), st.text(" ab\n"))
def test_extract_prompt_reassembles_both_texts(prompt, tail_a, tail_b):
    chosen, rejected = prompt + tail_a, prompt + tail_b
    try:
        shared, rest_a, rest_b = extract_prompt(chosen, rejected, "here")
    except UsageError:
        return  # identical, blank, or no whole shared word
    assert shared + rest_a == chosen and shared + rest_b == rejected and shared.strip()
    assert not shared[-1].isspace() and rest_a != rest_b


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "chosen": "", "rejected": "r"}], "row 1: chosen is empty"),
    ([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": " "}],
     "row 2: rejected is empty"),
    ([{"prompt": [user("p")], "chosen": [bot("c")], "rejected": [bot(" ")]}], "row 1: rejected is empty"),
    ([{"prompt": "p", "chosen": "c", "reject": "r"}], "row 1 has no column 'rejected'; columns found: prompt, chosen, reject"),
    ([{"prompt": [user("p")], "chosen": [bot("c")], "rejected": "r"}], "row 1: prompt and rejected must both be"),
    ([{"chosen": "c"}], "row 1 has no column 'rejected'; columns found: chosen"),
    ([{"chosen": [user("p"), bot("c")], "rejected": [user("p"), bot("c"), user("q"), bot("d")]}],
     "row 1: rejected messages must all have role 'assistant'"),
])
def test_malformed_preference_rows_name_file_and_row(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        load_preferences(str(path))
    assert str(info.value).startswith(f"{path}: row ")


def numbered_rows(n):
    return [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(n)]


def test_held_out_split_is_deterministic_disjoint_and_sized():
    rows = numbered_rows(40)
    train, held_out = split_held_out(rows, 0.25, seed=3)
    assert (train, held_out) == split_held_out(rows, 0.25, seed=3)
    assert split_held_out(rows, 0.25, seed=4)[1] != held_out
    assert len(held_out) == 10 and len(train) == 30
    assert sorted(r["prompt"] for r in train + held_out) == sorted(r["prompt"] for r in rows)
    assert [r for r in rows if r in held_out] == held_out  # original order kept
    assert split_held_out(numbered_rows(10), 0.01, seed=0)[1].__len__() == 1  # at least one eval row


def test_held_out_split_keeps_rows_of_one_prompt_together():
    rows = [{"prompt": f"post {i // 4}", "chosen": f"c{i}", "rejected": "r"} for i in range(40)]  # 10 posts
    train, held_out = split_held_out(rows, 0.2, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert len(held_out) == 8


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.floats(0.01, 0.6), st.integers(0, 5))
def test_held_out_split_partitions_every_size(n, fraction, seed):
    train, held_out = split_held_out(numbered_rows(n), fraction, seed)
    assert len(train) + len(held_out) == n and train and held_out
    assert len(held_out) == max(1, round(fraction * n))  # distinct prompts: exactly the target


@pytest.mark.parametrize("rows, fraction, message", [
    (numbered_rows(1), 0.5, "cannot hold out 0.5 of 1 rows"),
    (numbered_rows(10), 0.0, "eval_fraction must be between 0 and 1"),
    (numbered_rows(10), 1.0, "eval_fraction must be between 0 and 1"),
])
def test_held_out_split_refuses_an_empty_side(rows, fraction, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        split_held_out(rows, fraction, seed=0)


def test_load_with_held_out_from_a_file_or_a_fraction(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", numbered_rows(20))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", numbered_rows(3))
    train, held_out = load_with_held_out(load_preferences, str(train_path), str(eval_path))
    assert len(train) == 20 and len(held_out) == 3
    train, held_out = load_with_held_out(load_preferences, str(train_path), eval_fraction=0.1, seed=1)
    assert len(train) == 18 and len(held_out) == 2
    with pytest.raises(UsageError, match="cannot hold out"):
        load_with_held_out(load_completions, str(FIXTURES / "completions_plain.jsonl"), eval_fraction=0.9)


def test_load_with_held_out_uses_a_validation_split(tmp_path):
    import datasets

    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(numbered_rows(6)),
                                 "validation": datasets.Dataset.from_list(numbered_rows(2))})
    data.save_to_disk(str(tmp_path / "saved"))
    train, held_out = load_with_held_out(load_preferences, str(tmp_path / "saved"))
    assert len(train) == 6 and [r["prompt"] for r in held_out] == ["p0", "p1"]


def test_render_example_plain_text_is_unchanged(tokenizer):
    assert render_example("story :", " the cat", tokenizer, "here") == ("story :", " the cat")


def test_render_example_chat_cuts_the_completion_off_the_full_rendering(tokenizer):
    prompt, completion = [user("story : the cat")], [bot("the cat sits .")]
    prompt_text, completion_text = render_example(prompt, completion, tokenizer, "here")
    assert prompt_text == "user: story : the cat\nassistant:"
    assert completion_text == " the cat sits .\n"
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert prompt_text + completion_text == full


def test_render_example_errors(tokenizer):
    shouting = copy.deepcopy(tokenizer)
    # The generation prompt differs from how an assistant turn is written: no clean cut exists.
    shouting.chat_template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}BOT:{% endif %}")
    with pytest.raises(UsageError, match="row 7: the chat template renders the conversation differently"):
        render_example([user("hi")], [bot("the cat")], shouting, "row 7")
    with pytest.raises(UsageError, match="row 7: prompt and completion must both be text or both be chat"):
        render_example([user("hi")], "the cat", tokenizer, "row 7")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(UsageError, match="row 7: the prompt is a list of chat messages but the tokenizer has no"):
        render_example([user("hi")], [bot("the cat")], plain, "row 7")


def test_fixture_files_are_valid_jsonl():
    for path in FIXTURES.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            assert isinstance(json.loads(line), dict), path


def test_few_distinct_prompts_fall_back_to_holding_out_rows():
    from p3o.data.formats import split_held_out

    rows = [{"prompt": f"p{i % 2}", "completion": str(i)} for i in range(40)]
    train, held_out = split_held_out(rows, 0.05, seed=0)
    assert len(held_out) == 2 and len(train) == 38  # whole prompts would have held out half the data
    one_prompt = [{"prompt": "same", "completion": str(i)} for i in range(20)]
    train, held_out = split_held_out(one_prompt, 0.1, seed=0)
    assert len(held_out) == 2 and len(train) == 18


def test_text_parts_are_joined_and_other_contents_refused_in_one_line(tmp_path):
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]
    rows = load_completions(str(write_jsonl(tmp_path / "a.jsonl", [{"prompt": [user("x")], "completion": [
        {"role": "assistant", "content": parts}]}])))
    assert rows[0]["completion"] == [bot("What is 2 + 2?")]
    for content, message in ((42, "message 0's content is int (42); give it as text"),
                             ([{"type": "image", "url": "x.png"}], "message 0's content has parts p3o cannot train on (image)")):
        path = write_jsonl(tmp_path / "b.jsonl", [{"prompt": [user("x")], "completion": [bot("y")]},
                                                  {"prompt": [user("x")], "completion": [{"role": "assistant", "content": content}]}])
        with pytest.raises(UsageError, match=re.escape(f"b.jsonl: row 2: {message}")):  # it said "completion is empty"
            load_completions(str(path))


def test_rows_keep_their_file_and_line_through_the_held_out_split(tmp_path, assets, tokenizer, capsys):
    """Errors found while tokenizing name the row's file and line (the split reorders rows)."""
    from p3o.cli import main
    from p3o.data.formats import WHERE

    rows = [{"prompt": f"story : {i}", "completion": " the cat ."} for i in range(12)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    train, held_out = load_with_held_out(load_completions, str(path), eval_fraction=0.25, seed=3)
    assert {r[WHERE] for r in held_out} != {f"{path}: row {i}" for i in (1, 2, 3)}  # not the first rows
    for row in train + held_out:
        assert row[WHERE] == f"{path}: row {int(row['prompt'].split()[-1]) + 1}"
    chat = [{"prompt": [user("story : cat")], "completion": [bot("the cat .")]}] * 2
    write_jsonl(tmp_path / "eval.jsonl", chat)
    plain = copy.deepcopy(tokenizer)  # the session's tokenizer is shared
    plain.chat_template = None  # chat rows are refused while tokenizing
    plain.save_pretrained(tmp_path / "tok")
    code = main(["sft", "--model_name_or_path", str(assets["llama"]), "--tokenizer_name_or_path", str(tmp_path / "tok"),
                 "--dataset", str(path), "--eval_dataset", str(tmp_path / "eval.jsonl"),
                 "--output_dir", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert f"{tmp_path / 'eval.jsonl'}: row 1: " in capsys.readouterr().err  # it said "held-out row 1"


def test_a_text_only_dataset_is_refused_with_what_sft_needs(tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "the cat sat ."}])
    with pytest.raises(UsageError, match="has a 'text' column but no 'prompt'/'completion'"):
        load_completions(str(path))
