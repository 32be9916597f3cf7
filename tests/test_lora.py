"""LoRA through peft (the reference is the policy with its adapters off) and gradient checkpointing."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import train_config
from safetensors.torch import load_file
from test_checkpoint import assert_same_weights, cli_args, weights

from p3o.cli import main
from p3o.errors import UsageError
from p3o.models.loading import load_causal_lm
from p3o.models.lora import AdaptersDisabled
from p3o.rl.rollout import batched_token_logprobs
from p3o.rl.train import build_trainer


def distinct_parameter_count(*models) -> int:
    """Parameters held in memory by `models` together, each storage counted once."""
    seen = {}
    for model in models:
        model = model.model if isinstance(model, AdaptersDisabled) else model
        for p in model.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def test_lora_holds_one_copy_of_the_weights_and_trains_only_the_adapters(assets, tmp_path):
    full = build_trainer(train_config(assets, tmp_path))
    lora = build_trainer(train_config(assets, tmp_path, use_peft=True, lora_r=4))
    n = distinct_parameter_count(full.unwrapped_policy)
    assert distinct_parameter_count(full.unwrapped_policy, full.ref_policy) == 2 * n
    adapters = sum(p.numel() for p in lora.trained_module.parameters() if p.requires_grad)
    assert 0 < adapters < n / 5
    assert distinct_parameter_count(lora.unwrapped_policy, lora.ref_policy) == n + adapters
    optimised = sum(p.numel() for group in lora.optimizer.param_groups for p in group["params"])
    assert optimised == adapters  # Adam's moments for the adapters only


def test_lora_reference_is_the_initial_policy_and_the_merged_model_is_what_was_trained(assets, tmp_path):
    cfg = train_config(assets, tmp_path, use_peft=True, lora_r=4, max_steps=3, learning_rate=1e-2)
    trainer = build_trainer(cfg)
    rollout, _, _ = trainer.collect_rollout(0)
    initial = load_causal_lm(str(assets["llama"]))
    seq = rollout
    before = batched_token_logprobs(initial, seq, 1.0, 16)
    assert torch.allclose(seq.ref_token_logp, before, atol=1e-6)  # adapters off = the initial policy
    assert torch.allclose(seq.old_token_logp, before, atol=1e-6)  # B = 0: LoRA starts as the policy
    trainer.train()
    trained = batched_token_logprobs(trainer.unwrapped_policy, seq, 1.0, 16)
    assert not torch.allclose(trained, before, atol=1e-3)  # it learned something
    assert torch.allclose(batched_token_logprobs(trainer.ref_policy, seq, 1.0, 16), before, atol=1e-6)

    from p3o.rl.train import _save_policy

    out = tmp_path / "saved"
    out.mkdir()
    _save_policy(trainer, out)
    merged = load_causal_lm(str(out))  # a plain causal LM
    assert torch.allclose(batched_token_logprobs(merged, seq, 1.0, 16), trained, atol=1e-5)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("algo", ["p3o-v2", "ppo"])
def test_lora_resume_is_bit_identical(assets, tmp_path, algo):
    lora = ("--algo", algo, "--use_peft", "--lora_r", "4")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(cli_args(assets, whole, *lora)) == 0
    assert main(cli_args(assets, part, *lora, "--save_steps", "2")) == 0
    checkpoint = part / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    shutil.rmtree(part / "checkpoint-4")
    for name in ("model.safetensors", "metrics.jsonl"):
        (part / name).unlink()
    assert main(cli_args(assets, part, *lora, "--save_steps", "2", "--resume")) == 0
    assert_same_weights(weights(whole), weights(part))
    if algo == "ppo":
        assert_same_weights(load_file(str(whole / "value_head.safetensors")), load_file(str(part / "value_head.safetensors")))


def saved_activation_numel(cfg) -> int:
    """Elements autograd keeps for the backward pass in the first training forward."""
    trainer = build_trainer(cfg)
    rollout, _, _ = trainer.collect_rollout(0)
    if not trainer.fuse_old_pass:
        raise AssertionError("expected the fused pass in this configuration")
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.update(rollout, 0)
    return sum(saved)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_checkpointing_keeps_less_and_gives_the_same_gradient(assets, tmp_path):
    from test_engine import gradients_of_first_update

    kw = dict(max_steps=1, epochs=1, pairs_per_step=8, minibatch_pairs=8, max_new_tokens=8)
    plain = saved_activation_numel(train_config(assets, tmp_path, **kw))
    checkpointed = saved_activation_numel(train_config(assets, tmp_path, gradient_checkpointing=True, **kw))
    assert checkpointed < 0.7 * plain, (checkpointed, plain)
    one = gradients_of_first_update(train_config(assets, tmp_path, **kw))
    two = gradients_of_first_update(train_config(assets, tmp_path, gradient_checkpointing=True, **kw))
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-7, rtol=1e-4), name
    trainer = build_trainer(train_config(assets, tmp_path, gradient_checkpointing=True, **kw))
    assert not trainer.unwrapped_policy.training  # generation keeps its KV cache


@pytest.mark.parametrize("algo, precision", [("p3o-v2", "no"), ("dpo", "no"), ("p3o-v2", "bf16")])
def test_a_peft_model_with_trained_adapters_is_its_own_reference(assets, tmp_path, algo, precision):
    """After LoRA SFT a PeftModel comes with adapters that change the model: the reference is the
    policy as given (adapters on, as they were), not the base model (adapters off), so the KL
    starts at 0 and DPO's first loss is log 2, as TRL's. Training then moves the adapters, not the
    reference."""
    import math

    from conftest import prompt_rows, write_jsonl
    from peft import LoraConfig, get_peft_model

    from p3o import P3OConfig, P3OTrainer

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(str(assets["llama"])), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # as if trained by SFT
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = {"train_dataset": prompt_rows()} if algo != "dpo" else {
        "train_dataset": write_jsonl(tmp_path / "pairs.jsonl", [
            {"prompt": r["prompt"], "chosen": " the apple .", "rejected": " a stone ."} for r in prompt_rows()])}
    trainer = P3OTrainer(model, None if algo == "dpo" else f"{assets['rewards']}:fruit",
                         eval_dataset=prompt_rows(4, seed=9), processing_class=None, **data,
                         args=P3OConfig(output_dir=str(tmp_path / "run"), algo=algo, max_steps=3, pairs_per_step=4,
                                        max_new_tokens=4, learning_rate=1e-2, disable_progress_bar=True,
                                        mixed_precision=precision))
    assert trainer.evaluate()["eval_kl"] == 0.0
    trainer.train()
    first = next(h for h in trainer.state.log_history if h["step"] == 1)
    if algo == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert abs(first["kl"]) < 1e-6
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert moved and trainer.evaluate()["eval_kl"] != 0.0
    if algo != "dpo":  # under bf16 autocast's cached casts of the adapters made the reference the policy: KL 0
        assert all(h["kl"] != 0.0 for h in trainer.state.log_history if h["step"] > 1 and "kl" in h)


def test_a_lora_adapter_directory_is_its_base_with_the_adapter_merged(assets, tmp_path, capsys):
    """peft's save_pretrained writes an adapter directory (no config.json, no tokenizer): as a policy
    or a reference it is the model it stands for, its base plus the adapter, and KL starts at 0."""
    import json

    from peft import LoraConfig, get_peft_model

    from p3o.models.loading import load_tokenizer

    torch.manual_seed(0)
    peft_model = get_peft_model(load_causal_lm(str(assets["llama"])), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert not (adapter / "config.json").exists() and not (adapter / "tokenizer_config.json").exists()
    merged = load_causal_lm(str(adapter))
    assert all(p.requires_grad for p in merged.parameters())
    ids = torch.tensor([[1, 5, 9, 4]])
    assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)
    assert load_tokenizer(str(adapter)).vocab_size == load_tokenizer(str(assets["llama"])).vocab_size

    out = tmp_path / "run"
    assert main([*cli_args(assets, out, "--max_steps", "2"), "--model_name_or_path", str(adapter),
                 "--ref_model_name_or_path", str(adapter)]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["kl"]) < 1e-6  # the reference is the policy as the adapter made it

    for_rm = tmp_path / "rm-adapter"
    for_rm.mkdir()
    (for_rm / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": "x"}))
    with pytest.raises(UsageError, match="a PEFT adapter for SEQ_CLS, not a causal language model"):
        load_causal_lm(str(for_rm))


def test_a_model_with_nothing_to_train_and_an_unsafe_pickle_are_refused_in_one_line(assets, tmp_path):
    import dataclasses

    from conftest import prompt_rows

    from p3o import P3OConfig, P3OTrainer

    from peft import LoraConfig, get_peft_model

    frozen = load_causal_lm(str(assets["llama"])).requires_grad_(False)  # as merge_and_unload leaves a model
    config = P3OConfig(output_dir=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="no trainable parameters"):
        P3OTrainer(frozen, f"{assets['rewards']}:fruit", train_dataset=prompt_rows(), args=config)
    peft_model = get_peft_model(load_causal_lm(str(assets["llama"])), LoraConfig(r=4, target_modules="all-linear"))
    peft_model.requires_grad_(False)  # as PeftModel.from_pretrained loads an adapter
    with pytest.raises(UsageError, match="load it with is_trainable=True"):
        P3OTrainer(peft_model, f"{assets['rewards']}:fruit", train_dataset=prompt_rows(), args=config)
    with pytest.raises(UsageError, match="load it with is_trainable=True"):  # PPO's value head alone would train
        P3OTrainer(peft_model, f"{assets['rewards']}:fruit", train_dataset=prompt_rows(),
                   args=dataclasses.replace(config, algo="ppo"))
    peft_model.requires_grad_(True)  # the base too: the merged model and the reference would be wrong
    with pytest.raises(UsageError, match="trains .* weights besides LoRA's A and B matrices"):
        P3OTrainer(peft_model, f"{assets['rewards']}:fruit", train_dataset=prompt_rows(), args=config)
    dora = get_peft_model(load_causal_lm(str(assets["llama"])),
                          LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with pytest.raises(UsageError, match="no DoRA"):  # p3o's merge is W + BA: DoRA's would be another model
        P3OTrainer(dora, f"{assets['rewards']}:fruit", train_dataset=prompt_rows(), args=config)
    assert not (tmp_path / "run").exists()

    class Runs:  # what a malicious pytorch_model.bin holds: a call made while unpickling
        def __reduce__(self):
            return (print, ("this ran",))

    unsafe = tmp_path / "unsafe"
    shutil.copytree(assets["llama"], unsafe)
    (unsafe / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Runs()}, unsafe / "pytorch_model.bin")
    with pytest.raises(UsageError, match="holds more than tensors"):
        load_causal_lm(str(unsafe))
