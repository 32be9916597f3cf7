"""The instruct task (`p3o.tasks.instruct`): prompts by seed, held-out combinations, each constraint's
checker, the gold reward's bounds and inputs, cheap hacks against real SmolLM2 replies, and the noisy
labeller.

fixtures/instruct_smollm2_replies.jsonl holds 32 replies of SmolLM2-135M-Instruct (the cached plain
checkpoint), sampled once and never again here: two per prompt for make_prompts(1, 8, "train") +
make_prompts(1, 8, "eval"), chat template with its generation prompt, temperature 1.0, top_k 0,
top_p 1.0, at most 48 new tokens, torch.manual_seed(0), stopped at <|im_end|>.
"""
from __future__ import annotations

import json
import random
import statistics

import pytest
from conftest import FIXTURES

from p3o.tasks.instruct import (
    KINDS,
    MAX_GOLD,
    RESERVED,
    TOPICS,
    Constraint,
    Instruction,
    bt_label,
    constraint_credit,
    gold_reward,
    gold_terms,
    label_groups,
    label_pairs,
    make_prompts,
    score,
    write_prompts,
)


REAL = [json.loads(line) for line in (FIXTURES / "instruct_smollm2_replies.jsonl").read_text().splitlines()]
REAL_GOLD = gold_reward([r["prompt"] for r in REAL], [r["completion"] for r in REAL])
REAL_MEDIAN = statistics.median(REAL_GOLD)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


TEA = "How do I make a cup of tea?"
GOOD_TEA = "boil fresh water, pour it over a tea bag in a mug, steep for three minutes, then add milk or honey."


# ---- prompts ------------------------------------------------------------------------------------------------

def test_prompts_are_chat_messages_deterministic_by_seed():
    first = make_prompts(3, 50, "train")
    assert first == make_prompts(3, 50, "train")
    assert first != make_prompts(4, 50, "train")
    assert all(len(p) == 1 and p[0]["role"] == "user" and isinstance(p[0]["content"], str) for p in first)
    assert len({p[0]["content"] for p in first}) > 40  # varied
    for prompt in first[:10]:
        instruction = Instruction.parse(prompt)
        assert instruction.messages() == prompt  # the gold reads back exactly what was asked
        assert len(instruction.constraints) == 2 and instruction.constraints[0].kind != instruction.constraints[1].kind


def combos(prompts):
    return {(i.topic.phrase, c.kind) for i in map(Instruction.parse, prompts) for c in i.constraints}


def test_held_out_prompts_use_combinations_training_never_sees():
    train, held_out = make_prompts(0, 2000, "train"), make_prompts(0, 300, "eval")
    seen = combos(train)
    assert not seen & RESERVED
    for prompt in held_out:
        assert combos([prompt]) - seen, prompt  # at least one topic–constraint pair training never has
    # ...while every topic and every kind is trained on, and every held-out pair does turn up
    assert {t for t, _ in seen} == {t.phrase for t in TOPICS} and {k for _, k in seen} == set(KINDS)
    assert combos(held_out) >= RESERVED
    assert not {p[0]["content"] for p in train} & {p[0]["content"] for p in held_out}


def test_write_prompts_files(tmp_path):
    paths = write_prompts(tmp_path, seed=2, n_prompts=30, n_eval=10)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert [len(rows["prompts_train"]), len(rows["prompts_eval"])] == [30, 10]
    assert [r["prompt"] for r in rows["prompts_eval"]] == make_prompts(2, 10, "eval")
    assert all(Instruction.parse(r["prompt"]).split == "eval" for r in rows["prompts_eval"])
    assert write_prompts(tmp_path / "again", seed=2, n_prompts=30, n_eval=10)["prompts_train"].read_bytes() == \
        paths["prompts_train"].read_bytes()


# ---- each constraint's checker ------------------------------------------------------------------------------

CASES = [  # (constraint, satisfied, broken)
    (Constraint("word_limit", "12"), "Boil water, add a tea bag, wait three minutes, and enjoy.",
     "Boil water in a kettle, then pour it over a tea bag in your favourite mug, wait for three or four minutes, "
     "take the bag out and add some milk and sugar if you like it that way."),
    (Constraint("bullets", "3"), "- Boil the water.\n- Add the tea bag.\n- Wait three minutes.",
     "Boil the water, add the tea bag and wait three minutes."),
    (Constraint("include", "patience"), "Good tea takes patience: steep it for three minutes.",
     "Steep it for three minutes."),
    (Constraint("exclude", "you"), "Boil water and steep the tea for three minutes.",
     "You boil water, then you steep the tea, and you wait."),
    (Constraint("lowercase", ""), "boil water and steep the tea for three minutes.",
     "Boil Water And Steep The Tea For Three Minutes."),
    (Constraint("one_sentence", ""), "Boil water and steep the tea for three minutes.",
     "Boil water. Add the tea. Wait three minutes. Drink it."),
    (Constraint("end_question", ""), "Steep it for three minutes. Do you like it strong?",
     "Steep it for three minutes."),
    (Constraint("start_word", "Well"), "Well, boil water and steep the tea.", "Boil water and steep the tea."),
]


@pytest.mark.parametrize(("constraint", "good", "bad"), CASES, ids=[c[0].kind for c in CASES])
def test_constraint_checker(constraint, good, bad):
    assert constraint_credit(constraint, good) == 1.0
    assert constraint_credit(constraint, bad) <= 0.3
    # and the gold reward, asked through a real prompt, follows the checker
    prompt = chat(f"{TEA} {constraint.render()}")
    assert score(prompt, good) > score(prompt, bad)


def test_constraint_partial_credit_is_graded():
    limit = Constraint("word_limit", "10")
    credits = [constraint_credit(limit, " ".join(["word"] * n)) for n in (10, 12, 15, 20, 25)]
    assert credits == sorted(credits, reverse=True) and credits[0] == 1.0 and 0 < credits[2] < 1 and credits[-1] == 0
    bullets = Constraint("bullets", "4")
    assert [constraint_credit(bullets, "\n".join(["- a step here"] * n)) for n in (0, 2, 3, 4, 6)] == \
        [0.0, 0.5, 0.75, 1.0, 0.5]
    assert constraint_credit(bullets, "1. one step\n2) two steps\n* three\n• four") == 1.0  # any list marker
    assert [constraint_credit(Constraint("exclude", "you"), "you " * n) for n in (0, 1, 2)] == [1.0, 0.5, 0.25]
    assert constraint_credit(Constraint("lowercase", ""), "Boil water and steep it.") == 0.75
    assert constraint_credit(Constraint("one_sentence", ""), "One. Two.") == 0.5
    assert constraint_credit(Constraint("end_question", ""), "Ready? Boil water.") == 0.3
    assert constraint_credit(Constraint("end_question", ""), 'Want milk?"') == 1.0
    assert constraint_credit(Constraint("start_word", "Sure"), "Okay, sure thing.") == 0.3
    assert constraint_credit(Constraint("start_word", "Sure"), "**Sure**, boil water.") == 1.0
    assert constraint_credit(Constraint("include", "habit"), "Make it one of your habits.") == 1.0


# ---- gold reward: bounds and inputs -------------------------------------------------------------------------

def test_a_real_answer_meeting_every_constraint_scores_near_the_maximum():
    prompt = chat(f"{TEA} Answer in at most 25 words. Write everything in lowercase letters.")
    terms = gold_terms(prompt, reply(GOOD_TEA))
    assert terms["gold"] == pytest.approx(MAX_GOLD), terms
    # the same answer breaking the constraints keeps its quality and loses the constraints' 70%
    broken = "Boil Fresh Water. " + GOOD_TEA + " It Is The Best Drink In The World, Enjoy It Every Single Day!"
    assert 0.3 * MAX_GOLD <= score(prompt, broken) < 0.6 * MAX_GOLD


def test_gold_is_bounded_on_anything():
    rng = random.Random(0)
    prompts = make_prompts(0, 40, None)
    alphabet = "abcdefghij XYZ .,!?-\n•*'0123456789"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(200)]
    texts += [r["completion"][0]["content"] for r in REAL] + [GOOD_TEA, "", "   ", "<|im_end|>"]
    rewards = gold_reward([prompts[i % len(prompts)] for i in range(len(texts))], texts)
    assert all(0.0 <= g <= MAX_GOLD for g in rewards)
    assert all(0.0 <= g <= MAX_GOLD for g in REAL_GOLD)


def test_chat_and_plain_inputs_agree():
    prompt = make_prompts(5, 1, "train")[0]
    texts = [GOOD_TEA, "Sure! Here are some tips.", ""]
    chat_scores = gold_reward([prompt] * 3, [reply(t) for t in texts])
    assert chat_scores == gold_reward([prompt[0]["content"]] * 3, texts)
    # a system message before the user's, and the end-of-turn token a decoder may leave, change nothing
    with_system = [{"role": "system", "content": "You are a helpful AI assistant."}, *prompt]
    assert gold_reward([with_system] * 3, [t + "<|im_end|>" for t in texts]) == chat_scores
    assert gold_reward(["What is the capital of France?"], ["Paris."]) == [0.0]  # not a prompt of the task


# ---- cheap hacks against the starting model's real replies --------------------------------------------------

def test_real_replies_leave_room_to_improve():
    print("real gold:", sorted(round(g, 2) for g in REAL_GOLD))
    assert len(REAL_GOLD) == 32
    assert REAL_MEDIAN <= 0.65 * MAX_GOLD  # not already near the maximum
    assert max(REAL_GOLD) > 2 * REAL_MEDIAN  # the best real replies show what is reachable
    per_kind = {k: [] for k in KINDS}
    for row in REAL:
        terms = gold_terms(row["prompt"], row["completion"])
        for kind in KINDS:
            if kind in terms:
                per_kind[kind].append(terms[kind])
    # the model meets the constraints only partly: e.g. it writes capitals, runs past word limits
    assert statistics.mean(c for cs in per_kind.values() for c in cs) < 0.6
    assert statistics.mean(per_kind["lowercase"]) < 0.5 and statistics.mean(per_kind["word_limit"]) < 0.8


LOWER_LIMIT = chat(f"{TEA} Write everything in lowercase letters. Answer in at most 25 words.")
INCLUDE = chat(f'{TEA} Include the word "morning". Answer in at most 20 words.')
START = chat(f'{TEA} Start your reply with the word "Well". Do not use the word "you".')
BULLETS = chat(f"{TEA} Use exactly 3 bullet points. Answer in at most 12 words.")
_rng = random.Random(0)
GIBBERISH = " ".join("".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(3, 8)))
                     for _ in range(15))

HACKS = {  # name: (prompt, reply) -- each meets some of its prompt's constraints
    "empty": (LOWER_LIMIT, ""),
    "whitespace and end of turn": (LOWER_LIMIT, "  \n <|im_end|>"),
    "punctuation only": (LOWER_LIMIT, "!!! ... ??? ---"),
    "random letters": (LOWER_LIMIT, GIBBERISH),
    "repeated token": (LOWER_LIMIT, "tea " * 24),
    "repeated sentence": (LOWER_LIMIT, "boil the water. " * 8),
    "instruction recited": (INCLUDE, INCLUDE[0]["content"]),
    "instruction recited after sure": (INCLUDE, "Sure! " + INCLUDE[0]["content"]),
    "only the required word": (INCLUDE, "morning"),
    "required word repeated": (INCLUDE, "morning morning morning morning morning morning"),
    "only the start word": (START, "Well"),
    "all-caps spam": (LOWER_LIMIT, "BEST TEA EVER!!! BOIL WATER NOW!!! HOT TEA!!! BUY TEA NOW!!! CLICK HERE!!!"),
    "one-word bullets": (BULLETS, "- water\n- kettle\n- milk"),
    "keyword salad": (LOWER_LIMIT, "water kettle milk sugar boil steep honey lemon mug brew"),
    "numbers": (LOWER_LIMIT, "1 2 3 4 5 6 7 8 9 10 11 12"),
}


@pytest.mark.parametrize("name", list(HACKS))
def test_each_hack_scores_below_the_median_real_reply(name):
    prompt, text = HACKS[name]
    hacked = score(prompt, reply(text))
    print(f"{name}: {hacked:.3f} (real median {REAL_MEDIAN:.3f})")
    assert hacked < REAL_MEDIAN
    assert hacked < score(prompt, reply(GOOD_TEA))
    assert score(prompt, text) == hacked  # plain text alike


def test_polite_filler_is_not_an_answer():
    """A generic reply that meets every constraint but says nothing about the topic is capped at 10% of
    the maximum: below every real reply that is on topic, and far below a real answer."""
    filler = "i hope this helps, and good luck with it."
    assert gold_terms(LOWER_LIMIT, filler)["constraints"] == 1.0
    assert score(LOWER_LIMIT, filler) <= 0.1 * MAX_GOLD + 1e-9
    on_topic = [g for row, g in zip(REAL, REAL_GOLD) if gold_terms(row["prompt"], row["completion"])["on_topic"] == 1]
    assert score(LOWER_LIMIT, filler) < min(on_topic)
    assert score(LOWER_LIMIT, filler) < score(LOWER_LIMIT, GOOD_TEA) / 5


# ---- the noisy labeller -------------------------------------------------------------------------------------

def test_bradley_terry_labels():
    prompt = LOWER_LIMIT
    good, bad = reply(GOOD_TEA), reply("tea " * 24)
    rows = label_pairs([prompt] * 400, [good, bad] * 200, [bad, good] * 200, seed=1)
    assert rows == label_pairs([prompt] * 400, [good, bad] * 200, [bad, good] * 200, seed=1)
    assert set(rows[0]) == {"prompt", "chosen", "rejected"} and rows[0]["prompt"] == prompt
    assert sum(r["chosen"] == good for r in rows) / len(rows) > 0.97  # a 3-point gap: nearly always right
    coin = label_pairs([prompt] * 400, [good, bad] * 200, [bad, good] * 200, seed=1, beta_bt=0.0)
    assert 0.4 < sum(r["chosen"] == good for r in coin) / len(coin) < 0.6  # beta_bt 0: a coin flip
    # a closer pair is labelled right less reliably than a wide one, but more often than not
    close = reply("Boil Water. " + GOOD_TEA)
    rng = random.Random(3)
    wins = sum(bt_label(prompt, good, close, rng)["chosen"] == good for _ in range(400)) / 400
    assert 0.55 < wins < 0.97
    labels = [label_pairs([prompt] * 50, [good] * 50, [close] * 50, seed=s) for s in (1, 2)]
    assert labels[0] != labels[1]  # the seed draws the noise


def test_label_groups_compares_every_pair_of_each_prompts_responses():
    prompt, other = LOWER_LIMIT, [{"role": "user", "content": "How do I make tea? Answer in a single sentence."}]
    good, bad, middle = reply(GOOD_TEA), reply("tea " * 24), reply("Boil Water. " + GOOD_TEA)
    rows = label_groups([prompt, other], [[good, bad, middle], [good, bad]], seed=1)
    assert len(rows) == 3 + 1  # k(k-1)/2 per prompt
    assert [r["prompt"] for r in rows] == [prompt] * 3 + [other]
    pairs = [{r["chosen"][0]["content"], r["rejected"][0]["content"]} for r in rows]
    text = {name: value[0]["content"] for name, value in (("good", good), ("bad", bad), ("middle", middle))}
    assert pairs == [{text["good"], text["bad"]}, {text["good"], text["middle"]}, {text["bad"], text["middle"]},
                     {text["good"], text["bad"]}]
    assert rows == label_groups([prompt, other], [[good, bad, middle], [good, bad]], seed=1)
    # groups of two are label_pairs' rows, drawn from the same noise
    assert label_groups([prompt] * 3, [[good, bad]] * 3, seed=2) == label_pairs([prompt] * 3, [good] * 3, [bad] * 3, seed=2)
