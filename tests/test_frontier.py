"""Training-time evaluation, the over-optimisation watch, and `p3o frontier`."""
from __future__ import annotations

import csv
import json
import random

import pytest
from conftest import prompt_rows, train_config, write_jsonl
from test_baselines import preference_rows

from p3o.cli import main
from p3o.errors import UsageError
from p3o.eval.frontier import best_setting_interval, best_within, pareto_frontier
from p3o.eval.watch import Block, OverOptimisationWatch


def test_pareto_frontier_keeps_only_undominated_points():
    points = [{"kl": kl, "r": r} for kl, r in [(0.0, 0.1), (1.0, 0.5), (1.5, 0.4), (2.0, 0.9), (0.5, 0.05), (3.0, 0.9)]]
    front = pareto_frontier(points, "r")
    assert [(p["kl"], p["r"]) for p in front] == [(0.0, 0.1), (1.0, 0.5), (2.0, 0.9)]
    naive = [p for p in points if not any(q["kl"] <= p["kl"] and q["r"] >= p["r"] and (q["kl"], q["r"]) != (p["kl"], p["r"])
                                          for q in points)]
    assert sorted(map(id, naive)) == sorted(map(id, front))
    assert best_within(points, "r", 1.6)["r"] == 0.5 and best_within(points, "r", -1) is None


def test_best_setting_is_chosen_on_seed_means_and_its_interval_resamples_seeds():
    def point(beta, step, seed, kl, gold):
        return {"beta": beta, "step": step, "seed": seed, "kl": kl, "gold": gold}

    # setting A: mean gold 1.0 at KL 0.4 but noisy across seeds; B: steady 0.8 at KL 0.3; C: 2.0 but KL 3
    points = [point(0.1, 10, s, 0.4, g) for s, g in enumerate([0.2, 1.0, 1.8])]
    points += [point(0.2, 10, s, 0.3, 0.8) for s in range(3)]
    points += [point(0.01, 10, s, 3.0, 2.0) for s in range(3)]
    found = best_setting_interval(points, "gold", 1.0)
    assert (found["beta"], found["value"], found["seeds"]) == (0.1, 1.0, 3)  # C is over budget
    # resampling seeds: A's mean ranges 0.2..1.8, but B's 0.8 is the floor of the best choice
    assert found["ci_low"] == pytest.approx(0.8) and found["ci_high"] == pytest.approx(1.8)
    assert best_setting_interval(points, "gold", 0.1) is None
    # a setting some seed lacks is left out rather than averaged over fewer seeds
    assert best_setting_interval(points[:-1], "gold", 5.0)["beta"] == 0.1


def test_arms_run_an_algorithm_with_the_authors_settings(assets, tmp_path):
    from p3o.eval.frontier import FrontierConfig, Run, arm_algorithm, plan_runs, run_settings

    cfg = FrontierConfig(output_dir=str(tmp_path), algos="p3o-v2,p3o-v1-authors,grpo", betas="0.05", seeds="0,1,2")
    assert [r.name for r in plan_runs(cfg)][:3] == ["p3o-v2-beta0.05-seed0", "p3o-v2-beta0.05-seed1", "p3o-v2-beta0.05-seed2"]
    sources = {k: "x" for k in ("model", "reward_model", "reward_fn", "dataset", "eval_dataset", "preferences", "gold")}
    settings = run_settings(cfg, Run("p3o-v1-authors", 0.05, 1), sources, tmp_path / "r")
    assert settings["algo"] == "p3o-v1" and settings["delta_kl"] == "current"
    assert settings["reward_normalization"] == "running_std" and settings["update_schedule"] == "consecutive"
    assert "delta_kl" not in run_settings(cfg, Run("p3o-v2", 0.05, 1), sources, tmp_path / "r")
    assert arm_algorithm("grpo").defaults["num_generations"] == 4
    with pytest.raises(UsageError, match="unknown --algos entry 'p3o-v3'"):
        FrontierConfig(output_dir=str(tmp_path), algos="p3o-v3")


def simulated_runs(gold_after_turn: float, runs: int = 200, steps: int = 500, seed: int = 0):
    """Runs whose proxy rises by 0.05 a step (noise sd 1); the gold reward rises with it for 150
    steps and then moves by `gold_after_turn` per step. Yields the step each run first warned at (or None)."""
    rng = random.Random(seed)
    for _ in range(runs):
        watch, fired = OverOptimisationWatch(), None
        for step in range(steps):
            gold = 0.05 * min(step, 150) + gold_after_turn * max(0, step - 150)
            if watch.update(0.05 * step + rng.gauss(0, 1), gold + rng.gauss(0, 1)) and fired is None:
                fired = step
        yield fired


def test_the_watch_fires_once_the_gold_reward_turns_down():
    fired = list(simulated_runs(gold_after_turn=-0.05, runs=50))
    assert all(f is not None and f > 150 for f in fired)  # every run, and never before the turn
    assert sorted(fired)[len(fired) // 2] < 300  # within about 150 steps of it, typically


def test_the_watch_stays_quiet_while_the_gold_reward_only_stops_rising():
    false_alarms = sum(f is not None for f in simulated_runs(gold_after_turn=0.0))
    assert false_alarms <= 10  # under 5% of 200 runs of 500 noisy steps with a flat gold reward (measured: 5)


def test_held_out_points_catch_a_slow_steady_decline():
    watch = OverOptimisationWatch(patience=2)
    warnings = [watch.update_block(Block(proxy=1.0 + 0.1 * i, proxy_se=0.05, gold=1.0 - 0.05 * max(0, i - 3),
                                         gold_se=0.05)) for i in range(12)]
    first = next(i for i, w in enumerate(warnings) if w)
    assert 5 <= first <= 9 and sum(bool(w) for w in warnings) == 1  # each step is 1 SE: the drift adds up


def test_training_evaluates_on_held_out_prompts_into_eval_jsonl(assets, tmp_path):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", prompt_rows(12, seed=5))
    out = tmp_path / "run"
    args = ["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--monitor_reward_fn", f"{assets['rewards']}:fruit",
            "--eval_dataset", str(held_out), "--eval_steps", "2", "--output_dir", str(out), "--max_steps", "3",
            "--pairs_per_step", "4", "--max_new_tokens", "4", "--learning_rate", "1e-3", "--disable_progress_bar"]
    assert main(args) == 0
    points = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 2, 3]
    assert points[0]["kl"] == 0.0 and points[-1]["kl"] != 0.0 and all(p["n"] == 12 for p in points)
    assert {"reward", "reward_stderr", "monitor_reward", "kl_stderr", "length"} <= points[0].keys()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["proxy_gold_gap"] == pytest.approx(metrics[0]["reward"] - metrics[0]["monitor_reward"])


def test_dpo_scores_a_reward_only_on_held_out_prompts(assets, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    from p3o.rl.train import build_trainer

    with pytest.raises(UsageError, match="give --eval_dataset"):
        build_trainer(train_config(assets, tmp_path, algo="dpo", dataset=str(prefs)))
    cfg = train_config(assets, tmp_path, algo="dpo", dataset=str(prefs), eval_dataset=str(assets["prompts"]))
    assert cfg.reward_fn is not None


def frontier_args(assets, tmp_path, out, *extra):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", prompt_rows(8, seed=5))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(32))
    return ["frontier", "--task", "", "--output_dir", str(out), "--model_name_or_path", str(assets["llama"]),
            "--reward_fn", f"{assets['rewards']}:fruit", "--gold_reward_fn", f"{assets['rewards']}:fruit",
            "--dataset", str(assets["prompts"]), "--eval_dataset", str(held_out), "--preference_dataset", str(prefs),
            "--algos", "p3o-v2,dpo", "--betas", "0.05", "--dpo_betas", "0.1,0.3", "--seeds", "0",
            "--max_steps", "4", "--eval_steps", "2", "--pairs_per_step", "4", "--max_new_tokens", "4",
            "--learning_rate", "1e-3", "--dpo_learning_rate", "1e-3", "--num_workers", "2", *extra]


def test_frontier_sweeps_draws_and_skips_finished_runs(assets, tmp_path):
    out = tmp_path / "sweep"
    judge = ["--judge", f"reward_fn:{assets['rewards']}:fruit", "--winrate_prompts", "8"]
    assert main(frontier_args(assets, tmp_path, out, *judge)) == 0
    with open(out / "points.csv") as f:
        points = list(csv.DictReader(f))
    runs = {p["run"] for p in points}
    assert runs == {"p3o-v2-beta0.05-seed0", "dpo-beta0.1-seed0", "dpo-beta0.3-seed0"}
    assert len(points) == 3 * 3  # steps 0, 2 and 4 of each run
    assert {p["step"] for p in points} == {"0", "2", "4"} and all(p["gold"] for p in points)
    assert (out / "frontier.png").stat().st_size > 0 and "| p3o-v2 |" in (out / "frontier.md").read_text()
    summary = json.loads((out / "frontier.json").read_text())
    assert set(summary) == {"p3o-v2", "dpo"} and summary["dpo"]["gold"]["frontier"]
    table = (out / "winrates.md").read_text()  # the default-beta policies against the SFT policy
    assert "| p3o-v2 | 0." in table and "| dpo | 0." in table and "dpo: beta 0.1" in table
    result = json.loads((out / "winrates" / "p3o-v2-vs-sft-seed0.json").read_text())
    assert result["n"] == 8 and 0 <= result["ci_low"] <= result["win_rate"] <= result["ci_high"] <= 1
    stamps = [(out / "runs" / "dpo-beta0.1-seed0" / "model.safetensors").stat().st_mtime_ns,
              (out / "winrates" / "p3o-v2-vs-sft-seed0.json").stat().st_mtime_ns]
    assert main(frontier_args(assets, tmp_path, out, *judge)) == 0  # again: nothing to train or judge
    assert stamps == [(out / "runs" / "dpo-beta0.1-seed0" / "model.safetensors").stat().st_mtime_ns,
                      (out / "winrates" / "p3o-v2-vs-sft-seed0.json").stat().st_mtime_ns]
    with open(out / "runs" / "dpo-beta0.3-seed0" / "eval.jsonl", "a") as f:
        f.write('{"step": 5, "kl"')  # a line torn by a crash is not fatal
    args = frontier_args(assets, tmp_path, out, *judge)
    args[args.index("--dpo_learning_rate") + 1] = "5e-4"  # other settings: refused, nothing deleted ...
    assert main(args) == 2
    assert stamps[0] == (out / "runs" / "dpo-beta0.1-seed0" / "model.safetensors").stat().st_mtime_ns
    assert main([*args, "--overwrite"]) == 0  # ... unless asked: the dpo runs and their win rate are redone
    assert (out / "runs" / "dpo-beta0.1-seed0" / "model.safetensors").stat().st_mtime_ns != stamps[0]
    assert (out / "winrates" / "p3o-v2-vs-sft-seed0.json").stat().st_mtime_ns == stamps[1]  # p3o-v2 untouched
    assert json.loads((out / "winrates" / "dpo-vs-sft-seed0.json").read_text())["config"]["model_a"].endswith("dpo-beta0.1-seed0")


def test_frontier_reports_failed_runs_and_keeps_the_rest(assets, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = frontier_args(assets, tmp_path, out, "--dpo_betas", "0.1")
    write_jsonl(tmp_path / "bad-prefs.jsonl", [{"prompt": "a", "chosen": " b"}] * 4)  # no rejected column
    args[args.index("--preference_dataset") + 1] = str(tmp_path / "bad-prefs.jsonl")  # the dpo run fails, p3o-v2 not
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 2 runs failed" in err[0] and "dpo-beta0.1-seed0.log" in err[0]
    assert (out / "points.csv").is_file() and (out / "runs" / "p3o-v2-beta0.05-seed0" / "model.safetensors").is_file()


@pytest.mark.parametrize("mistake", [("--dpo_betas", "-1", "beta"), ("--train_config", "typo", "learning_rat"),
                                     ("--output_dir", "file", "is a file")])
def test_frontier_checks_every_run_s_settings_before_writing_anything(assets, tmp_path, capsys, mistake):
    flag, value, message = mistake
    (tmp_path / "typo.yaml").write_text("learning_rat: 0.001\n")
    (tmp_path / "file").write_text("mine")
    value = {"typo": str(tmp_path / "typo.yaml"), "file": str(tmp_path / "file")}.get(value, value)
    args = frontier_args(assets, tmp_path, tmp_path / "sweep")
    args = [*args[:args.index(flag)], *args[args.index(flag) + 2:]] if flag in args else args
    assert main([*args, flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists() and (tmp_path / "file").read_text() == "mine"


def test_frontier_refuses_a_train_config_that_sets_what_it_sweeps(assets, tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("beta: 0.5\nlearning_rate: 0.01\n")
    assert main(frontier_args(assets, tmp_path, tmp_path / "sweep", "--train_config", str(extra))) == 2
    assert "sets beta, which the sweep sets" in capsys.readouterr().err


def test_frontier_without_a_task_needs_the_users_models(tmp_path, capsys):
    assert main(["frontier", "--task", "", "--output_dir", str(tmp_path / "o")]) == 2
    assert "without --task, give --model_name_or_path" in capsys.readouterr().err


def test_the_gold_reward_judges_the_win_rates_unless_a_judge_is_given(tmp_path):
    from p3o.eval.frontier import FrontierConfig, default_judge

    own = dict(output_dir=str(tmp_path), task="", model_name_or_path="sft", dataset="p.jsonl", eval_dataset="e.jsonl",
               reward_fn="r.py:f", algos="p3o-v2")
    assert default_judge(FrontierConfig(output_dir=str(tmp_path))) == "gold:summarize"
    assert default_judge(FrontierConfig(**own, gold_reward_fn="gold.py:score")) == "reward_fn:gold.py:score"
    assert default_judge(FrontierConfig(**own, gold_reward_fn="gold.py:score", judge="llm:m")) == "llm:m"
    assert default_judge(FrontierConfig(**own)) is None  # said in the log: no win rates


def test_a_finished_run_is_the_same_run_when_its_settings_are_spelled_another_way(tmp_path):
    """--train_config values are compared as the run read them: a list of LoRA modules is the comma
    list config.yaml holds, and YAML's "1e-8" (a string to PyYAML) the float (both looked changed, so
    a rerun wanted --overwrite)."""
    import yaml

    from p3o.eval.frontier import _same_settings

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"lora_target_modules": "q_proj,v_proj", "adam_epsilon": 1e-8,
                                                     "beta": 0.1}))
    assert _same_settings(run, {"lora_target_modules": ["q_proj", "v_proj"], "adam_epsilon": "1e-8", "beta": 0.1})
    assert not _same_settings(run, {"lora_target_modules": ["q_proj"], "beta": 0.1})
