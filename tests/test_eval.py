"""`p3o eval`: several policies against one reference on the same held-out prompts (docs/p3o.md section 6)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from conftest import prompt_rows, train_config, write_jsonl

from p3o.cli import main
from p3o.eval.evaluate import EvalConfig, evaluate_models


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """A policy RL-trained on the fruit reward (RLOO, a few steps at a high learning rate), saved."""
    from p3o.rl.train import build_trainer

    root = tmp_path_factory.mktemp("trained")
    trainer = build_trainer(train_config(assets, root, algo="rloo", max_steps=6, pairs_per_step=16, minibatch_pairs=8,
                                         epochs=4, max_new_tokens=8, learning_rate=3e-3))
    trainer.train()
    trainer.unwrapped_policy.save_pretrained(root / "policy")
    trainer.tokenizer.save_pretrained(root / "policy")
    return root / "policy"


@pytest.fixture(scope="module")
def held_out(assets):
    return write_jsonl(assets["prompts"].parent / "eval_prompts.jsonl", prompt_rows(48, seed=7))


def eval_args(assets, held_out, output_file, *policies, extra=()):
    return ["eval", "--model_name_or_path", *map(str, policies), "--ref_model", str(assets["llama"]),
            "--dataset", str(held_out), "--reward_fn", f"{assets['rewards']}:fruit", "--max_new_tokens", "8",
            "--output_file", str(output_file), "--disable_progress_bar", *extra]


def test_the_reference_has_kl_exactly_zero_and_a_trained_policy_positive_kl_and_more_reward(
        assets, held_out, trained, tmp_path, capsys):
    """The issue's "done means": two policies in one call, the reference among them."""
    out = tmp_path / "eval" / "results.json"
    assert main(eval_args(assets, held_out, out, assets["llama"], trained)) == 0
    results = json.loads(out.read_text())
    ref, rl = results[str(assets["llama"])], results[str(trained)]
    assert list(results) == [str(assets["llama"]), str(trained)]  # keyed by path, in the order given
    assert {"kl", "kl_stderr", "reward", "reward_stderr", "gold", "gold_stderr", "length", "length_stderr",
            "rlhf_reward", "rlhf_reward_stderr", "n", "samples_per_prompt"} == ref.keys() == rl.keys()
    assert ref["rlhf_reward"] is None and rl["samples_per_prompt"] == 1  # no --beta, one sample a prompt
    assert ref["kl"] == 0.0 and ref["kl_stderr"] == 0.0  # exactly, not approximately
    assert rl["kl"] > 0 and rl["n"] == ref["n"] == 48
    assert rl["reward"] > ref["reward"] + 2 * math.hypot(rl["reward_stderr"], ref["reward_stderr"]), (ref, rl)
    assert ref["gold"] is None and 1 <= ref["length"] <= 8

    table = (tmp_path / "eval" / "results.md").read_text()
    assert table in capsys.readouterr().out  # printed as well
    lines = table.strip().splitlines()
    assert lines[-4] == "| model | KL (nats) | reward | length (tokens) | n |"  # no gold column without a gold reward
    assert lines[-1].startswith(f"| {trained} | {rl['kl']:.4f} ± {rl['kl_stderr']:.4f} | {rl['reward']:.4f} ±")
    assert lines[-2].startswith(f"| {assets['llama']} | 0.0000 ± 0.0000 |")
    assert not (tmp_path / "eval" / "results.samples.jsonl").exists()  # only with --save_samples


def test_gold_reward_column_samples_and_overwrite(assets, held_out, tmp_path):
    out = tmp_path / "results.json"
    args = eval_args(assets, held_out, out, assets["llama"], assets["gpt2"],
                     extra=["--gold_reward_fn", "p3o.tasks.summarize:gold_reward", "--max_prompts", "8",
                            "--save_samples"])
    args[args.index("--ref_model") + 1] = str(assets["gpt2"])  # same tokenizer, another reference
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert all(isinstance(r["gold"], float) and r["gold_stderr"] >= 0 and r["n"] == 8 for r in results.values())
    assert results[str(assets["gpt2"])]["kl"] == 0.0 and results[str(assets["llama"])]["kl"] != 0.0
    assert "| model | KL (nats) | reward | gold reward | length (tokens) | n |" in (tmp_path / "results.md").read_text()
    samples = [json.loads(line) for line in (tmp_path / "results.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and {"model", "prompt", "completion", "kl", "reward", "gold", "length"} <= samples[0].keys()
    assert [s["prompt"] for s in samples[:8]] == [s["prompt"] for s in samples[8:]]  # the same prompts for each policy

    first = out.read_text()
    assert main(args) == 2  # an existing output is refused ...
    assert main(args + ["--overwrite"]) == 0  # ... unless asked for, and the seeded stream repeats exactly
    assert out.read_text() == first
    assert main([a for a in args if a != "--save_samples"] + ["--overwrite"]) == 0
    assert not (tmp_path / "results.samples.jsonl").exists()  # the earlier run's samples are not left beside


def test_evaluate_models_gives_a_copy_of_the_reference_the_same_samples_and_zero_kl(assets, held_out, tmp_path):
    """The Python entry point (`p3o frontier` calls it) writes nothing; rewards get the dataset's columns."""
    copy = shutil.copytree(assets["llama"], tmp_path / "copy")
    cfg = EvalConfig(model_name_or_path=[str(copy), str(assets["llama"])], ref_model=str(assets["llama"]),
                     dataset=str(held_out), gold_reward_fn=f"{assets['rewards']}:echo_columns", max_new_tokens=6,
                     max_prompts=16, disable_progress_bar=True)
    results = evaluate_models(cfg)
    loaded, same = results[str(copy)], results[str(assets["llama"])]
    assert loaded["kl"] == same["kl"] == 0.0  # separately loaded weights, the same code path: exactly 0
    assert loaded["samples"] == same["samples"] and len(same["samples"]) == 16
    assert loaded["reward"] is None and loaded["gold"] == 0.0  # gold only; echo_columns checked its kwargs
    assert list(tmp_path.iterdir()) == [copy]


def test_the_module_imports_without_loading_models():
    code = "import sys, p3o.eval.evaluate; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("change, message", [
    (lambda a, p: a.__setitem__(a.index("--model_name_or_path") + 1, str(p / "missing")), "does not exist"),
    (lambda a, p: a.__setitem__(a.index("--dataset") + 1, str(p / "missing.jsonl")), "dataset file"),
    (lambda a, p: a.__delitem__(slice(a.index("--reward_fn"), a.index("--reward_fn") + 2)), "give a reward"),
    (lambda a, p: a.__setitem__(a.index("--reward_fn") + 1, a[a.index("--reward_fn") + 1].replace(":fruit", ":nan_reward")),
     "non-finite"),
    (lambda a, p: a.extend(["--reward_model", str(p)]), "at most one proxy reward"),
    (lambda a, p: a.__setitem__(a.index("--output_file") + 1, str(p / "out" / "results.md")), "must end in .json"),
    (lambda a, p: a.extend(["--num_samples", "0"]), "--num_samples must be at least 1"),
    (lambda a, p: a.extend(["--beta", "-0.1"]), "--beta needs a proxy reward"),
    (lambda a, p: (a.__delitem__(slice(a.index("--reward_fn"), a.index("--reward_fn") + 2)),
                   a.extend(["--gold_reward_fn", "p3o.tasks.summarize:gold_reward", "--beta", "0.1"])),
     "--beta needs a proxy reward"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(assets, held_out, tmp_path, capsys, change, message):
    args = eval_args(assets, held_out, tmp_path / "out" / "results.json", assets["llama"], extra=["--max_prompts", "4"])
    change(args, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("p3o eval: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_file_is_kept(assets, held_out, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("keep me")
    assert main(eval_args(assets, held_out, out, assets["llama"])) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_several_samples_a_prompt_average_per_prompt_and_beta_gives_the_rlhf_objective(
        assets, held_out, trained, tmp_path):
    """--num_samples 3: draw 0 is the one-sample evaluation, the other draws differ; each value's mean
    and standard error are over the prompts' means (recomputed from the samples); --beta adds
    reward - beta * KL per response; the options come from --config too, flags overriding it."""
    import yaml

    from p3o.eval.policy import mean_and_stderr

    one = tmp_path / "one.json"
    assert main(eval_args(assets, held_out, one, trained, extra=["--max_prompts", "6", "--save_samples"])) == 0
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": [str(assets["llama"]), str(trained)], "num_samples": 3,
                                      "beta": 0.5, "max_prompts": 99}))
    out = tmp_path / "three.json"
    args = eval_args(assets, held_out, out, extra=["--max_prompts", "6", "--save_samples", "--config", str(config)])
    args.remove("--model_name_or_path")  # the policies come from the YAML file
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert list(results) == [str(assets["llama"]), str(trained)] and results[str(trained)]["samples_per_prompt"] == 3
    samples = [json.loads(line) for line in out.with_name("three.samples.jsonl").read_text().splitlines()]
    firsts = [json.loads(line) for line in one.with_name("one.samples.jsonl").read_text().splitlines()]
    mine = [s for s in samples if s["model"] == str(trained)]
    assert len(mine) == 18 and [s["draw"] for s in mine] == [0, 1, 2] * 6  # prompt by prompt
    assert [(s["prompt"], s["completion"], s["kl"]) for s in mine if s["draw"] == 0] == \
        [(s["prompt"], s["completion"], s["kl"]) for s in firsts]  # draw 0: the one-sample evaluation
    assert len({s["completion"] for s in mine if s["draw"] == 1} ^ {s["completion"] for s in firsts}) > 0
    for model, result in results.items():
        rows = [s for s in samples if s["model"] == model]
        assert result["n"] == 6 and all(s["rlhf_reward"] == s["reward"] - 0.5 * s["kl"] for s in rows)
        for name in ("kl", "reward", "length", "rlhf_reward"):
            means = [sum(s[name] for s in rows[i:i + 3]) / 3 for i in range(0, 18, 3)]
            assert (result[name], result[f"{name}_stderr"]) == pytest.approx(mean_and_stderr(means), abs=1e-12)
    reference = results[str(assets["llama"])]
    assert reference["kl"] == 0.0 and reference["rlhf_reward"] == reference["reward"]
    table = out.with_suffix(".md").read_text()
    assert "3 samples per prompt" in table and "β = 0.5" in table and "| reward − β·KL |" in table
