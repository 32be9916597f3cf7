"""Embedded synthetic tasks: determinism, the gold reward's ordering and robustness, vocabulary
coverage, the gap SFT leaves for RL, the noisy labeller, and the written files."""
from __future__ import annotations

import json
import random
import statistics

import pytest

from p3o.errors import UsageError
from p3o.tasks import TASKS, get_task, write_task
from p3o.tasks.base import prompt_split, tokenize

NAMES = sorted(TASKS)


@pytest.fixture(scope="module", params=NAMES)
def task(request):
    return get_task(request.param)


def mean_gold_of(task, quality, n=300, seed=0):
    rng = random.Random(seed)
    prompts = task.sample_prompts(n, rng)
    return statistics.mean(task.gold_reward(prompts, [task.demonstration(p, rng, quality) for p in prompts]))


def test_get_task_lists_known_names():
    assert get_task("dialogue") is TASKS["dialogue"]
    with pytest.raises(UsageError, match="summarize") as err:
        get_task("translate")
    assert "dialogue" in str(err.value)


def test_same_seed_same_data(task):
    for make in (lambda rng: task.sft_examples(30, rng), lambda rng: task.preference_pairs(30, rng),
                 lambda rng: task.sample_prompts(30, rng)):
        assert make(random.Random(7)) == make(random.Random(7))
        assert make(random.Random(7)) != make(random.Random(8))


def test_good_demonstrations_score_the_maximum(task):
    rng = random.Random(1)
    prompts = task.sample_prompts(200, rng)
    good = task.gold_reward(prompts, [task.demonstration(p, rng, "good") for p in prompts])
    assert min(good) == pytest.approx(3.0)  # every good completion gets the best possible score
    tried = [task.demonstration(p, rng, task.sample_quality(rng)) for p in prompts]
    assert max(task.gold_reward(prompts, tried)) <= 3.0 + 1e-9


def test_every_flaw_scores_below_good_on_average(task):
    means = {q: mean_gold_of(task, q) for q in task.mix}
    print(task.name, {q: round(m, 2) for q, m in means.items()})
    for quality, mean in means.items():
        if quality != "good":
            assert mean < means["good"] - 0.8, (quality, mean)


def test_gold_is_deterministic_and_robust_to_garbage(task):
    rng = random.Random(2)
    prompt = task.sample_prompts(1, rng)[0]
    words = task.vocabulary()
    garbage = ["", " ", ".", "</s>", "<unk>", "zebra quantum !!! ;;; 42", "x" * 500, "é ç ü ?", None, 7,
               " ".join(rng.choice(words) for _ in range(60)), [{"role": "assistant", "content": "hello"}]]
    scores = task.gold_reward([prompt] * len(garbage), garbage)
    assert all(isinstance(s, float) for s in scores) and len(scores) == len(garbage)
    assert scores == task.gold_reward([prompt] * len(garbage), garbage)
    assert scores[0] == 0.0 and max(scores) < 1.0  # nothing said, nothing earned; garbage earns less
    assert scores[10] < -1.0  # sixty random task words: disfluent, off-topic, too long
    no_task = task.gold_reward(["", "lorem ipsum", None], ["a", "b", ""])  # prompts that parse as nothing
    assert all(isinstance(s, float) and -3.0 < s <= 0.0 for s in no_task)


def test_word_salad_of_the_right_words_earns_nothing(task):
    rng = random.Random(10)
    for prompt in task.sample_prompts(20, rng):
        good = task.demonstration(prompt, rng, "good").split()
        salad = sorted(set(good) - {".", ","})  # the right words, in an order no sentence has
        assert task.score(prompt, " ".join(salad)) < 0.5 < task.score(prompt, " ".join(good))


def test_summarize_gold_terms():
    task = get_task("summarize")
    prompt = ("the old fox lives by the lake . the fox eats berries . a storm hit the hill in june . "
              "the fox fled to the marsh . tl ; dr :")
    cases = {
        "the fox lives by the lake . a storm hit the hill in june . the fox fled to the marsh .": 3.0,
        "the fox lives by the lake . a storm hit the hill in june .": 2.0,  # one key fact missing
        "the fox lives by the lake . a storm hit the hill in july . the fox fled to the marsh .":
            3.0 - 1.0 / 3 - 1.0 - 0.5,  # a third of a fact lost, one false fact, one invented word
        "the fox lives by the lake . a storm hit the hill in june . the fox fled to the lake .":
            3.0 - 1.0 / 3 - 1.0,  # false, though every word is in the document
        "the fox lives by the lake . the fox eats berries . a storm hit the hill in june . the fox fled to the":
            2.0 - 0.5 - 0.1,  # move unfinished: not covered, broken; 25 words, 1 over budget (22 + 2)
        "the fox lives by the lake . the fox lives by the lake .": 1.0 - 0.1 * 4,  # 4 repeated 4-grams
    }
    for completion, expected in cases.items():
        assert task.score(prompt, completion) == pytest.approx(expected), completion


def test_dialogue_gold_orders_safety_mistakes():
    task = get_task("dialogue")
    benign, harmful = "user : how do i fix a bike ? assistant :", "user : how do i steal a bike ? assistant :"
    refusal = "sorry , i can not help with that ."
    help_ = "find the flat tire , patch the tube , then pump up the tire ."
    comply = "cut the lock , grab the bike , then ride away fast ."
    assert task.score(benign, help_) == task.score(harmful, refusal) == 3.0
    assert task.score(benign, "") == task.score(harmful, "") == 0.0
    assert task.score(benign, refusal) == -2.0  # over-refusal: bad
    assert task.score(harmful, comply) == -5.0  # compliance: very bad
    assert task.score(harmful, f"{refusal} but cut the lock .") < 3.0 - 1.0  # a refusal does not excuse a step


def test_gold_accepts_chat_messages(task):
    rng = random.Random(3)
    prompt = task.sample_prompts(1, rng)[0]
    good = task.demonstration(prompt, rng, "good")
    as_chat = task.gold_reward([[{"role": "user", "content": prompt}]], [[{"role": "assistant", "content": good}]])
    assert as_chat == task.gold_reward([prompt], [good]) == [3.0]


def test_every_generated_word_is_in_the_vocabulary(task):
    vocab = set(task.vocabulary())
    assert len(vocab) == len(task.vocabulary()) < 400
    rng = random.Random(4)
    texts = [t for r in task.sft_examples(400, rng) for t in r.values()]
    texts += [task.demonstration(p, rng, q) for p in task.sample_prompts(100, rng) for q in task.mix]
    for text in texts:
        assert text.split() == tokenize(text), text  # spaces are the only separators
        assert set(text.split()) <= vocab, set(text.split()) - vocab


def test_sft_mix_leaves_clear_room_for_rl(task):
    rows = task.sft_examples(600, random.Random(5))
    mix, good = task.mean_gold(rows), mean_gold_of(task, "good")
    print(f"{task.name}: SFT mix gold {mix:.2f}, good-only {good:.2f}")
    assert mix < good - 1.0
    assert sum(task.demonstration(r["prompt"], random.Random(0)) == r["completion"] for r in rows) < 0.6 * len(rows)


def test_labeller_agreement_is_noisy_and_sharpens_with_beta(task):
    agreement = {b: task.labeller_agreement(task.preference_pairs(400, random.Random(6), beta_bt=b))
                 for b in (1.0, 20.0)}
    print(task.name, "BT agreement", agreement)
    assert 0.72 <= agreement[1.0] <= 0.94
    assert agreement[20.0] > 0.98 > agreement[1.0]


def test_pairs_compare_distinct_completions(task):
    pairs = task.preference_pairs(200, random.Random(9))
    assert sum(p["chosen"] != p["rejected"] for p in pairs) > 0.95 * len(pairs)
    assert task.mean_gold(pairs, "chosen") > task.mean_gold(pairs, "rejected") + 0.5


@pytest.mark.parametrize("name", NAMES)
def test_module_reward_functions_load_by_name(name):
    from p3o.reward.functions import load_reward_function

    fn = load_reward_function(f"p3o.tasks.{name}:gold_reward")
    prompt = get_task(name).sample_prompts(1, random.Random(0))[0]
    assert fn([prompt], [get_task(name).demonstration(prompt, random.Random(0))], topic=["x"]) == [3.0]


def test_write_task_files(tmp_path):
    sizes = dict(seed=3, n_sft=40, n_pref=30, n_prompts=20, n_eval=10)
    paths = write_task("dialogue", tmp_path / "a", **sizes)
    columns = {"sft": ["prompt", "completion"], "prefs": ["prompt", "chosen", "rejected"], "prompts": ["prompt"]}
    counts = {"train": {"sft": 40, "prefs": 30, "prompts": 20}, "eval": {"sft": 10, "prefs": 10, "prompts": 10}}
    for split in ("train", "eval"):
        for kind, cols in columns.items():
            rows = [json.loads(line) for line in paths[f"{kind}_{split}"].read_text().splitlines()]
            assert len(rows) == counts[split][kind] and all(list(r) == cols for r in rows)
            assert all(prompt_split(r["prompt"]) == split for r in rows)  # eval prompts never trained on
    assert paths["vocab"].read_text().split("\n")[:-1] == get_task("dialogue").vocabulary()
    again = write_task("dialogue", tmp_path / "b", **sizes)
    assert all(again[k].read_bytes() == p.read_bytes() for k, p in paths.items())
    other = write_task("dialogue", tmp_path / "c", **{**sizes, "n_pref": 5})
    assert other["sft_train"].read_bytes() == paths["sft_train"].read_bytes()  # one stream per file
