"""`p3o sft` and `p3o rm`: completion-only loss, Bradley-Terry reward models, the saved directories,
and SFT -> RM -> P3O end to end on a small word task."""
from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import write_jsonl

from p3o.cli import main

NOUNS = "cat dog bird fish horse cow".split()
ADJS = "big small old young happy sad".split()
FRUITS = "apple pear plum".split()


def prompt_for(noun: str, adj: str = "big") -> str:
    return f"story : the {adj} {noun} is hungry . answer :"


def sample_answer(rng, noun: str) -> str:
    """An SFT-style answer: mostly "the NOUN eats a THING .", where THING is a fruit 30% of the time."""
    if rng.random() < 0.2:
        return f" the {noun} {rng.choice(['sleeps', 'runs', 'sits'])} ."
    food = rng.choice(FRUITS) if rng.random() < 0.3 else rng.choice(NOUNS)
    return f" the {noun} eats a {food} ."


def fruit_count(text: str) -> int:
    return sum(word in FRUITS for word in text.split())


@pytest.fixture(scope="module")
def word_task(tmp_path_factory):
    """SFT answers that name a fruit 24% of the time, and preference pairs of two such answers labelled
    by the hidden reward (fruits), as a human would label two samples of the SFT policy."""
    root = tmp_path_factory.mktemp("word-task")
    rng = random.Random(0)
    sft, prefs = [], []
    for _ in range(320):
        noun, adj = rng.choice(NOUNS), rng.choice(ADJS)
        sft.append({"prompt": prompt_for(noun, adj), "completion": sample_answer(rng, noun)})
        a, b = sample_answer(rng, noun), sample_answer(rng, noun)
        if fruit_count(a) != fruit_count(b):
            chosen, rejected = (a, b) if fruit_count(a) > fruit_count(b) else (b, a)
            prefs.append({"prompt": prompt_for(noun, adj), "chosen": chosen, "rejected": rejected})
    paths = {"sft": write_jsonl(root / "sft.jsonl", sft), "prefs": write_jsonl(root / "prefs.jsonl", prefs),
             "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": prompt_for(n, a)} for n in NOUNS for a in ADJS]),
             "gold": root / "gold.py", "root": root}
    paths["gold"].write_text("def fruit(prompts, completions, **kw):\n"
                             "    return [float(sum(w in ('apple', 'pear', 'plum') for w in c.split())) for c in completions]\n")
    assert main(["tiny-model", "--corpus", str(paths["sft"]), "--words", "sleeps runs sits",
                 "--output_dir", str(root / "init")]) == 0
    return paths


def test_sft_loss_covers_completion_tokens_only(tokenizer):
    from p3o.sft.train import IGNORE, tokenize_example

    example = tokenize_example(tokenizer, "story : the cat", " sees the dog .", 64, "row 1")
    prompt_len = len(tokenizer("story : the cat")["input_ids"])
    assert example["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id  # the model learns to stop
    short = tokenize_example(tokenizer, "story : the cat sees the dog", " runs .", 5, "row 2")
    assert len(short["input_ids"]) == 5 and short["labels"][-3:] == short["input_ids"][-3:]
    long = tokenize_example(tokenizer, "story : the cat", " sees the dog and the cat and the dog .", 8, "row 3")
    assert len(long["input_ids"]) == 8 and long["labels"][:2] == [IGNORE, IGNORE]  # the prompt's end stays


def test_sft_then_rm_then_p3o_raise_the_hidden_reward(word_task, tmp_path):
    root = word_task["root"]
    common = ["--overwrite", "--disable_progress_bar", "--seed", "0", "--learning_rate", "1e-3"]
    assert main(["sft", "--model_name_or_path", str(root / "init"), "--dataset", str(word_task["sft"]),
                 "--output_dir", str(tmp_path / "sft"), "--num_train_epochs", "4", *common]) == 0
    evals = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert len(evals) == 4 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] < 3.0

    assert main(["rm", "--model_name_or_path", str(tmp_path / "sft"), "--dataset", str(word_task["prefs"]),
                 "--output_dir", str(tmp_path / "rm"), "--num_train_epochs", "2", *common]) == 0
    evals = [json.loads(l) for l in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in l]
    assert evals[-1]["eval_accuracy"] >= 0.9 and evals[-1]["eval_margin"] > 0

    train = ["train", "--model_name_or_path", str(tmp_path / "sft"), "--dataset", str(word_task["prompts"]),
             "--max_steps", "20", "--pairs_per_step", "16", "--max_new_tokens", "8", "--learning_rate", "3e-4",
             "--disable_progress_bar", "--seed", "0"]
    assert main([*train, "--reward_model", str(tmp_path / "rm"), "--output_dir", str(tmp_path / "rl")]) == 0

    sft_gold, rl_gold = (_gold_of(word_task, tmp_path / "sft", model) for model in ("sft", "rl"))
    assert rl_gold["gold"] > sft_gold["gold"] + 2 * (rl_gold["gold_stderr"] + sft_gold["gold_stderr"]), (sft_gold, rl_gold)


def _gold_of(word_task, reference_dir, name: str) -> dict:
    """Hidden reward and KL of a policy on the task's prompts, one sample per prompt, a fixed seed."""
    from p3o.data.prompts import load_prompts
    from p3o.eval.policy import evaluate_policy
    from p3o.models.loading import load_causal_lm, load_tokenizer
    from p3o.reward import build_reward

    tokenizer = load_tokenizer(str(reference_dir))
    prompts = load_prompts(str(word_task["prompts"]), tokenizer)
    prompts.rows, prompts.token_ids = prompts.rows * 5, prompts.token_ids * 5  # 180 samples
    policy = load_causal_lm(str(reference_dir.parent / name))
    metrics = evaluate_policy(policy, load_causal_lm(str(reference_dir)), tokenizer, prompts,
                              {"gold": build_reward(f"{word_task['gold']}:fruit", None)}, max_new_tokens=8)
    return {k: v for k, v in metrics.items() if k != "samples"}


def test_reward_model_directory_round_trip(word_task, tmp_path, tokenizer):
    """What `p3o rm` saves is what `p3o train --reward_model` loads, scoring exactly as in training."""
    from p3o.reward.model import RewardModelScorer

    root = word_task["root"]
    assert main(["rm", "--model_name_or_path", str(root / "init"), "--dataset", str(word_task["prefs"]),
                 "--output_dir", str(tmp_path / "rm"), "--num_train_epochs", "1", "--learning_rate", "1e-3",
                 "--disable_progress_bar"]) == 0
    scorer = RewardModelScorer.load(str(tmp_path / "rm"))
    scores = scorer([prompt_for("cat")] * 2, [" the cat eats a pear .", " the cat eats a dog ."])
    assert scores[0] > scores[1]


def test_sft_and_rm_bad_input(word_task, tmp_path, capsys):
    root = word_task["root"]
    assert main(["rm", "--model_name_or_path", str(root / "init"), "--dataset", str(word_task["sft"]),
                 "--output_dir", str(tmp_path / "a")]) == 2
    assert "chosen" in capsys.readouterr().err
    assert main(["sft", "--model_name_or_path", str(root / "init"), "--dataset", str(word_task["prefs"]),
                 "--output_dir", str(tmp_path / "b")]) == 2
    assert "completion" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_sft_and_rm_resume_from_a_checkpoint_bit_for_bit(word_task, tmp_path, command, capsys):
    """Checkpoints mid-epoch and at an epoch's end; a run resumed from either ends with the same weights."""
    import shutil

    from safetensors.torch import load_file

    from p3o.utils.checkpoints import checkpoints

    data = word_task["sft"] if command == "sft" else word_task["prefs"]
    base = [command, "--model_name_or_path", str(word_task["root"] / "init"), "--dataset", str(data),
            "--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--learning_rate", "1e-3", "--seed", "0",
            "--disable_progress_bar", "--save_steps", "1"]
    assert main([*base, "--output_dir", str(tmp_path / "whole")]) == 0
    found = [p.name for p in checkpoints(tmp_path / "whole")]
    assert found and all((tmp_path / "whole" / name / "optimizer.pt").is_file() for name in found)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForCausalLM if command == "sft" else AutoModelForSequenceClassification
    _, info = auto.from_pretrained(tmp_path / "whole" / found[0], output_loading_info=True)  # a model, as it was then
    assert not any(info.values()) and AutoTokenizer.from_pretrained(tmp_path / "whole" / found[0]).vocab_size
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    epoch_end = next(row["step"] for row in rows if "eval_loss" in row)  # saved after that epoch's evaluation
    for keep in (f"checkpoint-{epoch_end - 1}", f"checkpoint-{epoch_end}"):  # as if killed right after it was written
        part = tmp_path / f"part-{keep}"
        shutil.copytree(tmp_path / "whole", part)
        for later in found[found.index(keep) + 1:]:
            shutil.rmtree(part / later)
        (part / "model.safetensors").unlink()
        assert main([*base, "--output_dir", str(part), "--resume"]) == 0
        whole, resumed = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(part / "model.safetensors"))
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), keep
        def shape(directory):  # each metrics line's step and kind, once: nothing lost or written twice
            rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
            return [(row["step"], sorted(row)) for row in rows]

        assert shape(part) == shape(tmp_path / "whole")
    from safetensors.torch import save_file  # a checkpoint that lost a tensor is refused, not resumed half-initial

    torn = tmp_path / "torn"
    shutil.copytree(tmp_path / "whole", torn)
    for later in found[1:]:
        shutil.rmtree(torn / later)
    weights = load_file(str(torn / found[0] / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "layers.0.mlp" not in k}, str(torn / found[0] / "model.safetensors"))
    assert main([*base, "--output_dir", str(torn), "--resume"]) == 2
    assert "lacks weights for" in capsys.readouterr().err


def test_sft_skips_non_finite_steps_and_stops_after_too_many(tokenizer, tmp_path):
    """A NaN loss skips the optimiser step (weights and Adam untouched); max_consecutive_skips in a row
    stop with the core's NonFiniteTraining, the error `p3o train` raises too (tests/test_checkpoint.py)."""
    from accelerate import Accelerator

    from p3o.core.skips import NonFiniteTraining
    from p3o.models.tiny import build_tiny_model
    from p3o.sft.train import SFTConfig, sft_stage, tokenize_example
    from p3o.core.supervised import Stage, fit

    cfg = SFTConfig(model_name_or_path="m", dataset="d", output_dir=str(tmp_path), per_device_train_batch_size=2,
                    max_consecutive_skips=3, learning_rate=1e-3)
    model = build_tiny_model(tokenizer, "llama", num_layers=1, hidden_size=16, num_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = [tokenize_example(tokenizer, "story : the cat .", " apple pear", 32, "row") for _ in range(8)]
    stage = sft_stage(tokenizer)
    poisoned = Stage(stage.collate, stage.units, lambda m, b: (stage.loss(m, b)[0] * float("nan"), {}),
                     stage.eval_totals, stage.eval_metrics)
    with pytest.raises(NonFiniteTraining, match="3 optimiser steps in a row had a non-finite loss"):
        fit(cfg, model, examples, examples[:2], poisoned, Accelerator(), lambda metrics: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sft_sigterm_saves_a_checkpoint_and_says_how_to_resume(word_task, tmp_path):
    from conftest import sigterm_after_first_step

    from p3o.utils.checkpoints import latest_checkpoint

    out = tmp_path / "sft"
    args = ["sft", "--model_name_or_path", str(word_task["root"] / "init"), "--dataset", str(word_task["sft"]),
            "--output_dir", str(out), "--num_train_epochs", "200", "--per_device_train_batch_size", "32",
            "--learning_rate", "1e-3", "--disable_progress_bar", "--logging_steps", "1"]
    code, last = sigterm_after_first_step(args, out)
    assert code == 130 and "stopped by SIGTERM" in last and "--resume" in last
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and (checkpoint / "optimizer.pt").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] >= 1 and checkpoint.name == f"checkpoint-{state['step']}"


def test_saved_weights_and_checkpoints_get_the_modes_the_umask_allows(word_task, tmp_path):
    """safetensors writes 0600 and mkdtemp makes 0700: p3o's files must be readable as the user's
    umask says (0644 under 022), like every other file it writes."""
    import os
    import stat

    from p3o.utils import io

    previous = os.umask(0o022)
    io._umask.cache_clear()  # read once a process: this test sets its own
    try:
        assert main(["sft", "--model_name_or_path", str(word_task["root"] / "init"), "--dataset", str(word_task["sft"]),
                     "--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--save_steps", "1",
                     "--disable_progress_bar"]) == 0
    finally:
        os.umask(previous)
        io._umask.cache_clear()
    out = tmp_path / "sft"
    for path in [out / "model.safetensors", out / "config.json", out / "checkpoint-1" / "model.safetensors",
                 out / "checkpoint-1" / "optimizer.pt"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((out / "checkpoint-1").stat().st_mode) == 0o755


def test_a_run_from_before_assistant_turns_resumes_only_with_the_value_it_ran_with(word_task, tmp_path, capsys):
    """Older config.yaml files lack --assistant_turns, and those runs learned the final reply only: a
    resume under the new default would change what the run learns halfway, so it is refused."""
    import yaml

    out = tmp_path / "sft"
    args = ["sft", "--model_name_or_path", str(word_task["root"] / "init"), "--dataset", str(word_task["sft"]),
            "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1", "--disable_progress_bar"]
    assert main(args) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["assistant_turns"]  # as an older p3o wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "--assistant_turns 'last' -> 'all'" in capsys.readouterr().err
    assert main([*args, "--resume", "--assistant_turns", "last"]) == 0


def test_a_stop_before_the_first_metrics_line_keeps_the_checkpoint_it_saved(word_task, tmp_path, monkeypatch, capsys):
    """SFT logs every --logging_steps: a Ctrl-C after step 1 saved checkpoint-1 and said so, and then
    the clean-up of a run that failed before logging anything removed the whole directory."""
    from p3o.utils.checkpoints import StopRequest

    def asked(self, device):  # as if SIGTERM came during step 1
        self.requested = "SIGTERM"
        return True

    monkeypatch.setattr(StopRequest, "agreed", asked)
    out = tmp_path / "sft"
    args = ["sft", "--model_name_or_path", str(word_task["root"] / "init"), "--dataset", str(word_task["sft"]),
            "--per_device_train_batch_size", "8", "--logging_steps", "1000", "--disable_progress_bar",
            "--output_dir", str(out)]
    assert main(args) == 130
    assert "checkpoint saved to" in capsys.readouterr().err
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0 and (out / "model.safetensors").is_file()



def test_a_signal_during_the_final_save_lets_it_finish(word_task, tmp_path, monkeypatch, caplog):
    import os
    import signal

    import p3o.core.supervised_run as supervised_run

    save = supervised_run._save_final

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        save(*args, **kwargs)

    monkeypatch.setattr(supervised_run, "_save_final", interrupted)
    out = tmp_path / "sft"
    assert main(["sft", "--model_name_or_path", str(word_task["root"] / "init"), "--dataset", str(word_task["sft"]),
                 "--max_steps", "1", "--disable_progress_bar", "--output_dir", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and "came during the final save, which finished first" in caplog.text


def test_the_default_max_length_is_capped_to_a_small_models_context_without_a_warning(word_task, tmp_path,
                                                                                        caplog):
    """Every SFT run on a `p3o tiny-model` (256 positions) warned that the default --max_length 512
    exceeds it; the cap is a note now, and a warning only for a length the user asked for."""
    import logging

    common = ["sft", "--model_name_or_path", str(word_task["root"] / "init"), "--dataset", str(word_task["sft"]),
              "--max_steps", "1", "--disable_progress_bar"]
    with caplog.at_level(logging.INFO, logger="p3o"):
        assert main([*common, "--output_dir", str(tmp_path / "default")]) == 0
    capped = [r for r in caplog.records if "exceeds the model's context" in r.getMessage()]
    assert [r.levelno for r in capped] == [logging.INFO]
    # and the held-out share of --dataset is said (TRL trains on every row; p3o holds out 5%), not where
    # the held-out rows are given
    assert "holding out 17 of the 320 rows of " in caplog.text and "(--eval_fraction 0.05; give an eval" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="p3o"):
        assert main([*common, "--output_dir", str(tmp_path / "given"), "--eval_dataset", str(word_task["sft"])]) == 0
    assert "holding out" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="p3o"):
        assert main([*common, "--output_dir", str(tmp_path / "asked"), "--max_length", "1024"]) == 0
    capped = [r for r in caplog.records if "exceeds the model's context" in r.getMessage()]
    assert [r.levelno for r in capped] == [logging.WARNING]


def test_sft_resume_of_a_finished_run_with_other_settings_is_refused(word_task, tmp_path, capsys):
    """As `p3o train`'s: the same command again is nothing to do (exit 0), another learning rate is
    refused naming it (it said "nothing to do")."""
    base = ["sft", "--model_name_or_path", str(word_task["root"] / "init"), "--dataset", str(word_task["sft"]),
            "--output_dir", str(tmp_path / "sft"), "--max_steps", "1", "--disable_progress_bar"]
    assert main(base) == 0
    assert main([*base, "--resume"]) == 0 and "holds a finished run" in capsys.readouterr().err
    assert main([*base, "--resume", "--learning_rate", "0.5"]) == 2
    assert "started with other settings (--learning_rate 5e-05 -> 0.5)" in capsys.readouterr().err


def test_sft_learns_every_token_with_completion_only_loss_false(word_task, tmp_path, monkeypatch):
    """TRL's default for messages data (assistant_only_loss=False) learns every token; p3o's default
    learns the completion only. completion_only_loss=False gives TRL's: every label is its token."""
    import p3o.sft.train as sft
    from p3o.sft.train import SFTConfig, run_sft

    seen = {}

    def first_example(cfg, title, load_rows, tokenize, *rest):  # the stage's own tokenizer, on one row
        from transformers import AutoTokenizer

        train, _ = load_rows(cfg)
        seen[cfg.completion_only_loss] = tokenize(AutoTokenizer.from_pretrained(word_task["root"] / "init"),
                                                  train[0], "row 1")

    monkeypatch.setattr(sft, "run_supervised", first_example)
    for only in (True, False):
        run_sft(SFTConfig(output_dir=str(tmp_path / str(only)), model_name_or_path=str(word_task["root"] / "init"),
                          dataset=str(word_task["sft"]), completion_only_loss=only))
    default, every = seen[True], seen[False]
    assert default["input_ids"] == every["input_ids"] and every["labels"] == every["input_ids"]
    assert -100 in default["labels"] and default["labels"] != every["labels"]
