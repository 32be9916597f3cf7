"""`p3o demo` end to end with tiny sizes: every stage runs, the run directory holds the report,
the plots and each stage's model. (The real sizes are measured in the README, not here.)"""
from __future__ import annotations

import json

import pytest

from p3o.cli import main
from p3o.pipeline import demo


@pytest.mark.parametrize("task", ["summarize", "dialogue"])
def test_demo_runs_every_stage_and_writes_a_report(tmp_path, monkeypatch, capsys, task):
    tiny = demo.Preset(n_sft=120, n_pref=120, n_eval=12, sft_epochs=1, rl_steps=2, rm_epochs=1, layers=1,
                       hidden=32, pairs_per_step=4, max_new_tokens=8)
    monkeypatch.setitem(demo.PRESETS, True, tiny)
    out = tmp_path / "demo"
    assert main(["demo", "--task", task, "--quick", "--output_dir", str(out), "--disable_progress_bar"]) == 0
    for stage in ("init", "sft", "rm", "p3o-v2"):
        assert (out / stage / "model.safetensors").is_file(), stage
    assert (out / "training.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "| sft |" in report and "| p3o-v2 |" in report and "training.png" in report
    assert "Held-out pairwise accuracy" in report and "**prompt:**" in report
    metrics = [json.loads(line) for line in (out / "p3o-v2" / "metrics.jsonl").read_text().splitlines()]
    assert "monitor_reward" in metrics[0]  # the gold reward is tracked during training
    results = json.loads((out / "results.json").read_text())  # the same keys as --task instruct's
    assert set(results["policies"]) == {"sft", "p3o-v2"} and results["baseline"] == "sft"
    assert {"gold", "gold_stderr", "proxy", "proxy_stderr", "kl", "kl_stderr", "length"} <= set(results["policies"]["sft"])
    assert {"win_rate", "ci_low", "ci_high", "n"} <= set(results["winrate"]) and results["winrate"]["n"] == 12
    assert "eval_accuracy" in results["reward_model"] and results["seconds"] > 0
    printed = capsys.readouterr().out
    assert "gold reward on held-out prompts: SFT" in printed and "labeller agreement" in printed


def test_demo_refuses_a_non_empty_directory_and_unknown_tasks(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo", "--output_dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["demo", "--task", "poetry", "--output_dir", str(tmp_path / "new")]) == 2
    assert "known tasks: summarize, dialogue, instruct" in capsys.readouterr().err
