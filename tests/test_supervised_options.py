"""`p3o sft` and `p3o rm` options shared with `p3o train`: LoRA (--use_peft), gradient
checkpointing, --max_steps, --eval_steps and --warmup_steps, on the tiny models of conftest."""
from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import ADJS, NOUNS, TARGETS, write_jsonl

from p3o.cli import main


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun = rng.choice(NOUNS)
        rows.append({"prompt": f"story : the {rng.choice(ADJS)} {noun} .", "completion": f" the {noun} eats a {rng.choice(TARGETS)} ."})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": f" the {row['prompt'].split()[-2]} sleeps ."}
            for row in sft_rows(n, seed)]


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_lora_trains_adapters_only_saves_a_merged_model_and_resumes_bit_for_bit(assets, tmp_path, command):
    """Only the adapters (and the reward model's head) train; the run directory is a plain model,
    merged, that reloads (as `p3o train --reward_model` loads it) and scores as the trained module
    did; a run resumed from its mid-run checkpoint ends bit-identical."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from p3o.reward.model import RewardModelScorer
    from p3o.reward.train import RewardConfig, RewardTrainer
    from p3o.sft.train import SFTConfig, SFTTrainer

    rm = command == "rm"
    Config, Trainer = (RewardConfig, RewardTrainer) if rm else (SFTConfig, SFTTrainer)
    rows = preference_rows(20) if rm else sft_rows(20)

    def initial():  # the same weights each time (a reward model's new head included)
        torch.manual_seed(0)
        if rm:
            return AutoModelForSequenceClassification.from_pretrained(assets["llama"], num_labels=1)
        return AutoModelForCausalLM.from_pretrained(assets["llama"])

    args = Config(output_dir=str(tmp_path / "whole"), use_peft=True, lora_r=4, max_steps=4, save_steps=2,
                  per_device_train_batch_size=4, learning_rate=1e-2, seed=0, logging_steps=1, disable_progress_bar=True)
    model = initial()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    Trainer(model, args=args, train_dataset=rows[4:], eval_dataset=rows[:4]).train()  # LoRA goes into `model`, in place

    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or (rm and name.startswith("score.modules_to_save.")) for name in trained)
    assert not rm or "score.modules_to_save.default.weight" in trained
    for name, p in model.named_parameters():  # the frozen base is the model the run started from
        if not p.requires_grad:
            assert torch.equal(p, before[name.replace(".base_layer", "").replace(".original_module", "")]), name

    out = tmp_path / "whole"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    merged = load_file(str(out / "model.safetensors"))
    assert not [k for k in merged if any(s in k for s in ("lora_", "base_layer", "modules_to_save", "original_module"))]
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    if rm:
        assert not torch.equal(merged["score.weight"], before["score.weight"])

    model.eval()
    if rm:  # what `p3o train --reward_model` loads, against the trained module with its adapters
        loaded = RewardModelScorer.load(str(out))
        expected = RewardModelScorer(model, loaded.tokenizer, "trained")
        prompts, completions = [r["prompt"] for r in rows[:4]], [r["chosen"] for r in rows[:4]]
        torch.testing.assert_close(loaded(prompts, completions), expected(prompts, completions), rtol=1e-5, atol=1e-5)
    else:
        reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        ids = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 4]])
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    if rm:
        classifier, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and classifier.config.num_labels == 1

    # As if killed right after checkpoint-2: the resumed run loads its adapter (and head), optimiser, RNG.
    part = tmp_path / "part"
    shutil.copytree(out, part)
    (part / "model.safetensors").unlink()
    shutil.rmtree(part / "adapter")
    Trainer(initial(), args=replace(args, output_dir=str(part), resume=True), train_dataset=rows[4:],
            eval_dataset=rows[:4]).train()
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        whole, resumed = load_file(str(out / name)), load_file(str(part / name))
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole), name
    assert [(r["step"], sorted(r)) for r in read_metrics(part)] == [(r["step"], sorted(r)) for r in read_metrics(out)]


@pytest.mark.parametrize("command, use_peft", [("sft", False), ("sft", True), ("rm", True)])
def test_gradient_checkpointing_gives_the_same_gradient(assets, tokenizer, tmp_path, command, use_peft):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from p3o.reward.model import LastTokenReward
    from p3o.reward.train import RewardConfig, rm_stage, tokenize_pair
    from p3o.sft.train import SFTConfig, sft_stage, tokenize_example
    from p3o.core.supervised_run import prepare_model

    if command == "rm":
        Config, stage = RewardConfig, rm_stage(tokenizer)
        examples = [tokenize_pair(tokenizer, row, 64) for row in preference_rows(4)]
    else:
        Config, stage = SFTConfig, sft_stage(tokenizer)
        examples = [tokenize_example(tokenizer, r["prompt"], r["completion"], 64, "row") for r in sft_rows(4)]
    batch = stage.collate(examples)

    def gradient(checkpointing: bool) -> dict:
        torch.manual_seed(0)  # the same head and adapters
        if command == "rm":
            classifier = AutoModelForSequenceClassification.from_pretrained(assets["llama"], num_labels=1)
            classifier.config.pad_token_id = tokenizer.pad_token_id
            module, hf_model = LastTokenReward(classifier), classifier
        else:
            module = hf_model = AutoModelForCausalLM.from_pretrained(assets["llama"])
        cfg = Config(model_name_or_path="m", dataset="d", output_dir=str(tmp_path), use_peft=use_peft, lora_r=4,
                     gradient_checkpointing=checkpointing)
        module, _ = prepare_model(cfg, module, hf_model if command == "rm" else None)
        calls = []  # a block runs twice under checkpointing: in the forward and again in the backward
        hf_model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        module.train()
        stage.loss(module, batch)[0].backward()
        assert len(calls) == (2 if checkpointing else 1)
        return {name: p.grad for name, p in module.named_parameters() if p.requires_grad}

    plain, checkpointed = gradient(False), gradient(True)
    assert plain.keys() == checkpointed.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


def test_max_steps_wins_over_epochs_eval_steps_and_warmup_steps(assets, tmp_path, caplog):
    from p3o.errors import UsageError
    from p3o.sft.train import SFTConfig

    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))  # 2 optimiser steps per epoch of 8
    held_out = write_jsonl(tmp_path / "eval.jsonl", sft_rows(2, seed=1))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="p3o"):
        assert main(["sft", "--model_name_or_path", str(assets["llama"]), "--dataset", str(data), "--eval_dataset",
                     str(held_out), "--output_dir", str(out), "--num_train_epochs", "9", "--max_steps", "5",
                     "--eval_steps", "3", "--warmup_steps", "2", "--warmup_ratio", "0.5", "--per_device_train_batch_size", "8",
                     "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_progress_bar"]) == 0
    assert "--max_steps 5 and --num_train_epochs 9: max_steps wins" in caplog.text
    rows = read_metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    # linear with 2 warm-up steps (not the ratio's 3) over 5 steps: the scheduler's total follows max_steps;
    # each step logs the rate it applied, as transformers does (from 0, the peak at step 3)
    assert [r["lr"] for r in steps] == pytest.approx([x * 1e-3 for x in (0.0, 0.5, 1.0, 2 / 3, 1 / 3)])
    evaluations = [(r["step"], r["epoch"]) for r in rows if "eval_loss" in r]
    assert evaluations == [(2, 1), (3, 1.5), (4, 2), (5, 2.5)]  # epoch ends, every 3 steps, and the last step

    assert SFTConfig(output_dir="o").num_train_epochs == 1
    assert SFTConfig(output_dir="o", max_steps=3).num_train_epochs is None
    for bad in ({"max_steps": 0}, {"warmup_steps": -1}, {"eval_steps": -1}, {"lora_r": 0}):
        with pytest.raises(UsageError):
            SFTConfig(output_dir="o", **bad)


@pytest.mark.parametrize("epochs,steps,evaluations", [
    ("0.5", 2, [(2, 0.5)]),  # half of a pass's 4 steps; the last step evaluated
    ("1.3", 6, [(4, 1), (6, 1.5)]),  # ceil(1.3 x 4) = 6 (transformers' rounding): the first pass's end, the last step
])
def test_a_fraction_of_an_epoch_takes_that_share_of_its_steps(assets, tmp_path, epochs, steps, evaluations):
    """TRL's and transformers' num_train_epochs=0.5 (a float), which p3o refused as not an integer."""
    from p3o.sft.train import SFTConfig

    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(32))  # 4 optimiser steps per epoch of 8
    held_out = write_jsonl(tmp_path / "eval.jsonl", sft_rows(2, seed=1))
    out = tmp_path / "run"
    assert main(["sft", "--model_name_or_path", str(assets["llama"]), "--dataset", str(data), "--eval_dataset",
                 str(held_out), "--output_dir", str(out), "--num_train_epochs", epochs, "--per_device_train_batch_size",
                 "8", "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_progress_bar"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert [(r["step"], r["epoch"]) for r in rows if "eval_loss" in r] == evaluations
    assert SFTConfig(output_dir="o", num_train_epochs=2).num_train_epochs == 2
    for bad in (0, -1, float("inf"), float("nan")):  # inf crashed in the steps' arithmetic
        with pytest.raises(Exception, match="must be > 0"):
            SFTConfig(output_dir="o", num_train_epochs=bad)


def test_use_peft_under_fsdp_or_deepspeed_is_refused_in_one_line(assets, tmp_path, monkeypatch, capsys):
    import p3o.core.supervised_run as supervised_run

    monkeypatch.setattr(supervised_run, "is_sharded", lambda accelerator: True)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    assert main(["rm", "--model_name_or_path", str(assets["llama"]), "--dataset", str(data), "--output_dir",
                 str(tmp_path / "run"), "--use_peft", "--disable_progress_bar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--use_peft is not supported under FSDP or DeepSpeed" in err[-1]
    assert not (tmp_path / "run").exists()
