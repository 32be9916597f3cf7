"""`p3o demo --task instruct` end to end with tiny sizes, on a tiny random SmolLM2-like model (a BPE
tokenizer with SmolLM2's ChatML template) in place of SmolLM2 itself: every stage runs, the run
directory holds the report, results.json and each stage's output, and `--resume` reuses finished
stages and redoes the rest. (The real run's numbers are in docs/getting-started.md.)"""
from __future__ import annotations

import json

import pytest
from families import build

from p3o.cli import main
from p3o.pipeline import instruct_demo

TINY = instruct_demo.InstructPreset(comparison_prompts=6, comparison_prompts_eval=2, n_eval=6, rl_steps=2, pairs_per_step=4,
                                    max_new_tokens=6, rm_batch_size=4, train_eval_prompts=4, sample_batch_size=8)


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    monkeypatch.setitem(instruct_demo.INSTRUCT_PRESETS, True, TINY)
    model = build("smollm2", tmp_path / "models").path
    out = tmp_path / "demo"
    return lambda *extra: main(["demo", "--task", "instruct", "--quick", "--output_dir", str(out),
                                "--model_name_or_path", str(model), "--disable_progress_bar", *extra]), out


def test_instruct_demo_runs_every_stage_and_resumes(tiny_demo, capsys):
    demo, out = tiny_demo
    assert demo() == 0
    for path in ("data/prefs_train.jsonl", "data/prefs_eval.jsonl", "rm/model.safetensors", "rm/adapter",
                 "p3o-v2/model.safetensors", "p3o-v2/eval.jsonl", "eval/start.json", "eval/p3o-v2.json",
                 "report.md", "training.png", "results.json"):
        assert (out / path).exists(), path
    held_out = [json.loads(line) for line in (out / "data/prefs_eval.jsonl").read_text().splitlines()]
    assert len(held_out) == TINY.pairs(2) == 12  # all 6 pairs of 4 samples, for each of 2 held-out prompts
    assert len({json.dumps(row["prompt"]) for row in held_out}) == 2
    assert len((out / "data/prefs_train.jsonl").read_text().splitlines()) == TINY.pairs(4)
    results = json.loads((out / "results.json").read_text())
    assert set(results["policies"]) == {"start", "p3o-v2"}
    for metrics in results["policies"].values():
        assert {"gold", "gold_stderr", "proxy", "proxy_stderr", "kl", "kl_stderr", "length"} <= set(metrics)
    assert results["policies"]["start"]["kl"] == 0.0
    assert {"win_rate", "ci_low", "ci_high", "wins", "losses", "ties", "n"} <= set(results["winrate"])
    assert results["winrate"]["n"] == TINY.n_eval
    assert {"eval_accuracy", "labeller_expected_accuracy", "labeller_agreement"} <= set(results["reward_model"])
    assert results["seconds"] > 0
    report = (out / "report.md").read_text()
    assert "| start |" in report and "| p3o-v2 |" in report and "expected accuracy" in report
    assert "| prompt | start | P3O-V2 |" in report and "Win rate" in report
    metrics = [json.loads(line) for line in (out / "p3o-v2" / "metrics.jsonl").read_text().splitlines()]
    assert "monitor_reward" in metrics[0]  # the gold is tracked during training
    assert "gold reward on held-out prompts: start" in capsys.readouterr().out

    # an interrupted run: P3O-V2 never finished; --resume reuses the comparisons and the RM, redoes the rest
    rm_time = (out / "rm" / "model.safetensors").stat().st_mtime_ns
    prefs_time = (out / "data" / "prefs_train.jsonl").stat().st_mtime_ns
    (out / "p3o-v2" / "model.safetensors").unlink()
    assert demo() == 2  # a non-empty directory needs --resume (or --overwrite)
    assert demo("--resume") == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and (out / "p3o-v2" / "model.safetensors").is_file()
    assert (out / "rm" / "model.safetensors").stat().st_mtime_ns == rm_time
    assert (out / "data" / "prefs_train.jsonl").stat().st_mtime_ns == prefs_time
    results = json.loads((out / "results.json").read_text())  # stage times: the reused ones from the first run
    assert {"comparisons", "reward model", "p3o-v2", "evaluation"} <= set(results["stage_seconds"])
    assert results["seconds"] > 0 and results["seconds_this_invocation"] > 0

    assert demo("--resume", "--seed", "3") == 2  # other settings than the interrupted run's
    assert "other settings" in capsys.readouterr().err


def test_a_demo_that_fails_before_any_stage_finished_leaves_nothing_behind(tmp_path, capsys):
    """Otherwise the corrected command is refused (not empty) and --resume too (another model)."""
    from p3o.cli import main

    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("mine")
    out = tmp_path / "demo"
    assert main(["demo", "--task", "instruct", "--model_name_or_path", str(tmp_path / "not-a-model"),
                 "--output_dir", str(out), "--quick"]) == 2
    assert "could not load a tokenizer" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "not-a-model" / "notes.txt").read_text() == "mine"


def test_comparisons_with_an_empty_reply_are_left_out(tmp_path, monkeypatch, caplog):
    """A policy may end its turn at once; `p3o rm` refuses an empty reply as bad data, so the demo
    leaves those comparisons out (and says so) instead of failing at the reward-model stage."""
    import logging

    from p3o.tasks import instruct

    model = build("smollm2", tmp_path / "models").path
    files = instruct.write_prompts(tmp_path / "data", n_prompts=6, n_eval=2)
    prefs = {"train": tmp_path / "data" / "prefs_train.jsonl", "eval": tmp_path / "data" / "prefs_eval.jsonl"}
    calls = []

    def replies(policy, tokenizer, prompts, *args, **kwargs):  # the first sample of prompt 0 is empty
        calls.append(1)
        return ["" if (len(calls), i) == (1, 0) else f"reply {len(calls)} {i}" for i in range(len(prompts))]

    monkeypatch.setattr(instruct_demo, "sample_completions", replies)
    with caplog.at_level(logging.WARNING, logger="p3o"):
        instruct_demo._comparisons(argparse_namespace(seed=0), TINY, model, files, prefs)
    train = [json.loads(line) for line in prefs["train"].read_text().splitlines()]
    assert len(train) == TINY.pairs(4) - 3  # prompt 0's 3 pairs with its empty sample
    assert all(row["chosen"][0]["content"] and row["rejected"][0]["content"] for row in train)
    assert len(prefs["eval"].read_text().splitlines()) == TINY.pairs(2)
    assert "3 of 36 comparisons have an empty reply" in caplog.text


def argparse_namespace(**kw):
    import argparse

    return argparse.Namespace(disable_progress_bar=True, **kw)
