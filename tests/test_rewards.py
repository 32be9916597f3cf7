"""Reward functions and reward models: loading, checking, scoring at the last real token."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from p3o.errors import RewardError, UsageError
from p3o.reward import build_reward
from p3o.reward.functions import RewardFunction, check_rewards, load_reward_function
from p3o.reward.model import RewardModelScorer


def test_reward_function_from_a_file_and_from_a_module(assets):
    fn = build_reward(f"{assets['rewards']}:fruit", None)
    assert fn(["p", "p"], ["apple pear dog", "cat"]).tolist() == [2.0, 0.0]
    module_fn = build_reward("p3o.tasks.dialogue:gold_reward", None)  # a module path resolves too
    assert module_fn.fn.__name__ == "gold_reward"
    with pytest.raises(UsageError, match="masked_sum.* must accept"):  # checked before any rollout
        build_reward("p3o.utils.ops:masked_sum", None)


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "must look like"),
    ("missing/file.py:fn", "does not exist"),
    ("p3o.not_a_module:fn", "cannot import module"),
    ("p3o.utils.ops:not_there", "has no attribute"),
    ("p3o.utils.ops:__doc__", "is not callable"),
])
def test_bad_reward_function_names(spec, message):
    with pytest.raises(UsageError, match=message):
        load_reward_function(spec)


@pytest.mark.parametrize("name, message", [
    ("wrong_length", "returned 1 values for 2 completions"),
    ("nan_reward", "non-finite value"),
    ("raises", "raised RuntimeError: reward server is down"),
])
def test_misbehaving_reward_functions_stop_with_the_functions_name(assets, name, message):
    spec = f"{assets['rewards']}:{name}"
    reward = build_reward(spec, None)
    with pytest.raises(RewardError, match=message) as info:
        reward(["a", "b"], ["c", "d"])
    assert spec in str(info.value)


def test_reward_must_be_numbers():
    with pytest.raises(RewardError, match="list of numbers"):
        RewardFunction(lambda p, c: ["high", "low"], "strings")(["a", "b"], ["c", "d"])


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_scores_at_the_last_real_token(reward_model_dir, tokenizer):
    scorer = RewardModelScorer.load(str(reward_model_dir), batch_size=2)
    prompts, completions = ["story : cat", "dog", "story : big dog runs"], [" sees the fish", " runs", " ."]
    scores = scorer(prompts, completions)
    for i, text in enumerate(p + c for p, c in zip(prompts, completions)):
        alone = tokenizer(text, return_tensors="pt")  # no padding at all
        hidden = scorer.model.model(**alone).last_hidden_state
        assert scores[i].item() == pytest.approx(scorer.model.score(hidden[0, -1]).item(), abs=1e-5)
    # the plain transformers forward reads the same position
    batch = tokenizer([prompts[0] + completions[0], prompts[1] + completions[1]], return_tensors="pt",
                      padding=True, padding_side="right")
    plain = scorer.model(**batch).logits[:, 0]
    assert torch.allclose(plain.double(), scores[:2], atol=1e-5)


def test_missing_reward_model(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        RewardModelScorer.load(str(tmp_path / "nope"))


def test_reward_model_must_be_a_trained_one_label_classifier(assets, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    with pytest.raises(UsageError, match="sequence-classification model with one label"):
        RewardModelScorer.load(str(assets["llama"]))  # a causal LM: its score head would be random
    two = tmp_path / "two-labels"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               num_labels=2)).save_pretrained(two)
    tokenizer.save_pretrained(two)
    with pytest.raises(UsageError, match="with 2 labels"):
        RewardModelScorer.load(str(two))


@pytest.mark.parametrize("values", [
    lambda n: np.arange(n, dtype=np.float32),
    lambda n: torch.arange(n, dtype=torch.float32, requires_grad=True) * 1,
    lambda n: [np.float64(i) for i in range(n)],
    lambda n: tuple(range(n)),
])
def test_numbers_from_numpy_torch_and_tuples_are_accepted(values):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_rewards(values(3), 3, "f").tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("values", [
    [1.0, None, 2.0],
    np.zeros((3, 1)),
    torch.zeros(3, 1),
    torch.zeros(3, 2),
    [[1.0], [2.0], [3.0]],
    "111",
    {0: 1.0, 1: 1.0, 2: 1.0},
    None,
])
def test_anything_but_a_flat_list_of_numbers_is_refused(values):
    with pytest.raises(RewardError, match="reward f must return a"):
        check_rewards(values, 3, "f")


def test_reward_functions_are_called_positionally_unless_they_take_completions_first():
    """TRL's `f(completions, **kw)` gets everything by keyword; a p3o function gets (prompts,
    completions) positionally whatever it names them, positional-only and decorated ones too."""
    import functools

    from p3o.reward.functions import RewardFunction

    def decorated(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    def p3o_style(prompt, completions, **kwargs):  # not named `prompts`: still positional
        return [float(len(p)) for p in prompt]

    def positional_only(prompts, completions, /, **kwargs):
        return [float(len(p)) for p in prompts]

    def trl_style(completions, **kwargs):
        return [float(len(p)) for p in kwargs["prompts"]]

    def keyword_only(*, completions, prompts, **kwargs):
        return [float(len(p)) for p in prompts]

    for fn in (p3o_style, positional_only, decorated(p3o_style), trl_style, keyword_only):
        assert RewardFunction(fn, "f")(["ab", "abc"], ["x", "y"]).tolist() == [2.0, 3.0], fn.__name__


def trained_with(assets, out, reward_fns: list[str], *extra) -> list[dict]:
    """`p3o train` of the tiny model against `reward_fns` (4 prompts a step, completions logged);
    the lines of its metrics.jsonl."""
    import json

    from p3o.cli import main

    assert main(["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
                 *[arg for fn in reward_fns for arg in ("--reward_fn", fn)], "--output_dir", str(out),
                 "--pairs_per_step", "4", "--max_new_tokens", "4", "--log_completions", "1", "--disable_progress_bar",
                 *extra]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["p3o-v2", "remax"])  # remax: its greedy responses' scoring logs nothing
def test_reward_functions_get_trls_trainer_state_and_logging_hooks(assets, tmp_path, algo):
    """TRL passes trainer_state, log_metric and log_extra: a curriculum reward that reads the state,
    and one that logs, run unchanged; log_metric's mean goes to metrics.jsonl, log_extra's column to
    completions.jsonl. p3o's own fn(prompts, completions, **kwargs) gets them too, in kwargs."""
    import json

    rewards = tmp_path / "trl_rewards.py"
    rewards.write_text(
        "def curriculum(completions, trainer_state, log_metric, log_extra, **kwargs):\n"
        "    share = trainer_state.global_step / trainer_state.max_steps\n"
        "    log_metric('share_done', share)\n"
        "    log_extra('words', [len(c.split()) for c in completions])\n"
        "    return [share + len(c) for c in completions]\n"
        "def plain(prompts, completions, **kwargs):\n"
        "    state = kwargs['trainer_state']  # the run's settings, not transformers' defaults (500)\n"
        "    assert (state.max_steps, state.logging_steps, state.save_steps) == (2, 1, 0), vars(state)\n"
        "    return [0.0 for _ in completions]\n")
    out = tmp_path / "run"
    metrics = trained_with(assets, out, [f"{rewards}:curriculum", f"{rewards}:plain"], "--max_steps", "2",
                           "--algo", algo)
    assert [m["share_done"] for m in metrics] == [0.0, 0.5]
    record = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert record["words"] == [len(c.split()) for c in record["completions"]]


def test_what_reward_functions_log_never_replaces_p3os_own_metrics_or_fields(assets, tmp_path):
    """log_metric('reward') or ('step') went over p3o's own (no checkpoint was then ever due);
    log_extra with numpy values crashed the JSON writer; a held-out evaluation called TRL-style
    functions without their trainer_state."""
    import json

    rewards = tmp_path / "clashing.py"
    rewards.write_text(
        "import numpy as np\n"
        "def clash(completions, trainer_state, log_metric, log_extra, **kwargs):\n"
        "    log_metric('reward', 1234.0); log_metric('step', 99); log_metric('mine', 1.0)\n"
        "    log_extra('rewards', [np.float32(1.5)] * len(completions))\n"
        "    log_extra('short', [1])\n"
        "    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "run"
    metrics = trained_with(assets, out, [f"{rewards}:clash"], "--max_steps", "3", "--save_steps", "2",
                           "--eval_dataset", str(assets["prompts"]), "--eval_max_prompts", "2", "--eval_steps", "1")
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["reward"] != 1234.0 for m in metrics)
    assert metrics[0]["log_metric/reward"] == 1234.0 and metrics[0]["log_metric/step"] == 99 and metrics[0]["mine"] == 1
    record = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert record["log_extra/rewards"] == [1.5, 1.5] and record["rewards"] != [1.5, 1.5] and "short" not in record
    assert (out / "checkpoint-2").is_dir()


def test_outside_training_trl_style_functions_get_a_fresh_state_and_silent_hooks():
    from p3o.reward.functions import RewardFunction

    def curriculum(completions, trainer_state, log_metric, **kwargs):  # as `p3o eval` and `winrate` call it
        log_metric("ignored", 1.0)
        return [float(trainer_state.global_step)] * len(completions)

    assert RewardFunction(curriculum, "curriculum")(["p"], ["c"]).tolist() == [0.0]


def test_a_dataset_column_named_context_reaches_the_reward_function(assets, tmp_path):
    """The run's TRL context travels under its own keyword: a dataset's `context` column (QA data
    has one) is just another column, as before."""
    import json

    rows = [{"prompt": json.loads(line)["prompt"], "context": f"doc {i}"}
            for i, line in enumerate(assets["prompts"].read_text().splitlines())]
    data = tmp_path / "with_context.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewards = tmp_path / "uses_context.py"
    rewards.write_text("def f(prompts, completions, context, **kwargs):\n"
                       "    assert all(c.startswith('doc ') for c in context) and 'trainer_state' in kwargs\n"
                       "    return [0.0] * len(completions)\n")
    assert trained_with(assets, tmp_path / "run", [f"{rewards}:f"], "--max_steps", "1", "--dataset", str(data))


def test_none_is_not_applicable_beside_other_rewards_as_in_trl(caplog):
    """TRL's multi-task rewards return None where they do not apply: that part is left out of the
    weighted sum (0 where no part applies, with a warning, TRL's nansum). A NaN is still refused, and
    a reward standing alone (`p3o eval`, a judge) still refuses None."""
    from p3o.reward import WeightedRewards

    def maths(completions, **kwargs):
        return [None if c.startswith("story") else float(len(c)) for c in completions]

    def style(completions, **kwargs):
        return [None if c.startswith("sum") else 0.25 for c in completions]

    both = WeightedRewards([("maths", RewardFunction(maths, "maths"), 2.0),
                            ("style", RewardFunction(style, "style"), 1.0)])
    completions = ["sum 12", "story one", "sum and story", "both"]
    with caplog.at_level("WARNING", logger="p3o"):
        assert both(["p"] * 4, completions).tolist() == [12.0, 0.25, 26.0, 8.25]
    assert not caplog.records
    assert both.last_parts["maths"][1].isnan() and both.last_parts["style"][0].isnan()
    with caplog.at_level("WARNING", logger="p3o"):
        assert both(["p"] * 2, ["sum story", "story sum"]).tolist() == [18.0, 0.25]  # one part each
    alone = WeightedRewards([("maths", RewardFunction(maths, "maths"), 1.0)])
    with caplog.at_level("WARNING", logger="p3o"):
        assert alone(["p"] * 2, ["story", "sum"]).tolist() == [0.0, 3.0]
    assert "no reward applies to 1 of 2 completions" in caplog.text
    with pytest.raises(RewardError, match="accepted in training's rewards, not here"):
        RewardFunction(maths, "maths")(["p"], ["story"])
    with pytest.raises(RewardError, match="non-finite value"):
        check_rewards([1.0, float("nan"), None], 3, "f", none_allowed=True)


def test_a_reward_part_that_applies_to_some_completions_is_logged_as_their_mean(assets, tmp_path, monkeypatch):
    """reward/<name> is the mean over the completions a part applies to (TRL's nanmean); the reward
    the run trains on leaves the part out where it is None."""
    import json

    rewards = tmp_path / "partial.py"
    rewards.write_text(
        "import json, os\n"
        "LOG = os.environ['PARTIAL_LOG']\n"
        "def odd_lengths(completions, **kwargs):\n"
        "    values = [float(len(c)) if len(c) % 2 else None for c in completions]\n"
        "    with open(LOG, 'a') as f: f.write(json.dumps(values) + '\\n')\n"
        "    return values\n"
        "def always(completions, **kwargs):\n"
        "    return [1.0 for c in completions]\n")
    log_file = tmp_path / "values.jsonl"
    monkeypatch.setenv("PARTIAL_LOG", str(log_file))
    metrics = trained_with(assets, tmp_path / "run", [f"{rewards}:odd_lengths", f"{rewards}:always"],
                           "--max_steps", "3")
    calls = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(calls) == len(metrics) == 3 and any(None in c for c in calls)
    for m, values in zip(metrics, calls):
        known = [v for v in values if v is not None]
        assert m["reward"] == pytest.approx(sum(known) / len(values) + 1.0, abs=1e-12)
        if known:
            assert m["reward/odd_lengths"] == pytest.approx(sum(known) / len(known), abs=1e-12)
        else:
            assert "reward/odd_lengths" not in m
        assert m["reward/always"] == 1.0


def test_async_reward_functions_run_together_on_one_loop_kept_between_calls():
    """TRL runs `async def` reward functions concurrently on one event loop; a function that waits
    for another's event would hang (and here time out) if they ran one after the other, and a loop
    kept between calls keeps a client made on it usable."""
    import asyncio

    from p3o.reward import WeightedRewards

    loops, ready = [], {}

    async def waits(completions, **kwargs):
        loops.append(asyncio.get_running_loop())
        await asyncio.wait_for(ready.setdefault("event", asyncio.Event()).wait(), timeout=10)
        return [1.0] * len(completions)

    async def signals(completions, **kwargs):
        await asyncio.sleep(0)
        ready.setdefault("event", asyncio.Event()).set()
        return [None, 2.0]

    async def fails(completions, **kwargs):
        raise ValueError("judge unreachable")

    both = WeightedRewards([("waits", RewardFunction(waits, "waits"), 1.0),
                            ("signals", RewardFunction(signals, "signals"), 1.0)])
    assert both(["p", "p"], ["a", "b"]).tolist() == [1.0, 3.0]
    ready.clear()
    assert both(["p", "p"], ["a", "b"]).tolist() == [1.0, 3.0]
    assert loops[0] is loops[1]
    with pytest.raises(RewardError, match="reward function fails raised ValueError: judge unreachable"):
        RewardFunction(fails, "fails")(["p"], ["a"])
    assert RewardFunction(waits, "alone")(["p"], ["a"]).tolist() == [1.0]  # the event is still set


def test_an_async_reward_that_raises_systemexit_raises_it_here_and_the_loop_lives_on():
    async def quits(completions, **kwargs):
        raise SystemExit(3)

    async def fine(completions, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(SystemExit):
        RewardFunction(quits, "quits")(["p"], ["a"])
    assert RewardFunction(fine, "fine")(["p"], ["a"]).tolist() == [1.0]  # the next call does not hang
