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
            "n"} == ref.keys() == rl.keys()
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
