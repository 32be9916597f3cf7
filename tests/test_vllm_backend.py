"""The optional vLLM generation backend, against a stand-in `vllm` module (vLLM itself needs a GPU):
weights pushed before each rollout, groups kept whole, masks from EOS, imported only when asked."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from conftest import train_config

from p3o.errors import UsageError
from p3o.rl.train import build_trainer


class FakeLLM:
    """Records what p3o gives vLLM; answers each prompt with its own tokens reversed, cut to lengths
    that differ between a prompt's k responses."""

    def __init__(self, model, **kwargs):
        self.model, self.kwargs, self.loaded, self.calls, self.resets = model, kwargs, [], [], 0
        runner = SimpleNamespace(model=self)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))

    def load_weights(self, weights):
        weights = dict(weights)
        assert not any(t.requires_grad or t.grad_fn for t in weights.values())  # no graph of the adapters held
        self.loaded.append({name: t.clone() for name, t in weights.items()})

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, prompts, params, use_tqdm):
        assert len(params) == len(prompts)  # one SamplingParams per prompt
        self.calls.append(([p["prompt_token_ids"] for p in prompts], params))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(p["prompt_token_ids"][::-1][:1 + j + i % 3]))
                                         for j in range(params[i].n)])
                for i, p in enumerate(prompts)]


# vLLM's SamplingParams fields that p3o may set; a misspelt one would be refused as by vLLM itself.
SAMPLING_FIELDS = {"n", "max_tokens", "stop_token_ids", "ignore_eos", "seed", "temperature", "top_k", "top_p"}


def sampling_params(**kwargs):
    unknown = set(kwargs) - SAMPLING_FIELDS
    assert not unknown, f"not a SamplingParams field: {unknown}"
    return SimpleNamespace(**kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, sampling_params
    monkeypatch.setitem(sys.modules, "vllm", module)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return module


def test_vllm_samples_from_the_current_policy_and_keeps_groups_whole(assets, tmp_path, fake_vllm):
    trainer = build_trainer(train_config(assets, tmp_path, generation_backend="vllm", max_steps=2))
    llm = trainer.vllm.llm
    policy_before = {n: p.detach().clone() for n, p in trainer.unwrapped_policy.named_parameters()}
    rollout, _, _ = trainer.collect_rollout(0)
    assert llm.loaded[-1].keys() == policy_before.keys() and llm.resets == 1
    assert all(torch.equal(llm.loaded[-1][n], policy_before[n]) for n in policy_before)
    prompts, per_prompt = llm.calls[-1]
    seq, params = rollout, per_prompt[0]
    assert params.n == 2 and params.max_tokens == 6 and params.temperature == 1.0 and params.top_k == -1
    assert params.stop_token_ids == trainer.eos_ids and params.ignore_eos  # p3o's EOS ids, and only those
    assert len({p.seed for p in per_prompt}) == len(per_prompt)  # no two prompts share their sampling noise
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher" and llm.kwargs["dtype"] == "float32"
    assert llm.kwargs["max_num_seqs"] == rollout.response_ids.shape[0]  # one rollout's responses at once
    assert prompts == [q[m.bool()].tolist() for q, m in zip(seq.query_ids[::2], seq.query_mask[::2])]
    for row in range(seq.query_ids.shape[0]):
        g, j = divmod(row, 2)
        expected = prompts[g][::-1][:1 + j + g % 3]
        eos = [i for i, t in enumerate(expected) if t in trainer.eos_ids]
        n = min(len(expected), eos[0] + 1 if eos else len(expected))
        assert seq.response_ids[row, :n].tolist() == expected[:n] and seq.response_mask[row].sum() == n
    assert seq.kl.abs().max() < 1e-6  # log-probs come from the training model: pi_old = pi_ref at the start
    with torch.no_grad():  # as an update would
        trainer.unwrapped_policy.get_input_embeddings().weight.mul_(1.5)
    trainer.collect_rollout(1)
    assert llm.resets == 2 and len(llm.loaded) == 2
    assert all(torch.equal(llm.loaded[-1][n], p) for n, p in trainer.unwrapped_policy.named_parameters())


def test_vllm_gets_merged_lora_weights_under_plain_names(assets, tmp_path, fake_vllm):
    trainer = build_trainer(train_config(assets, tmp_path, generation_backend="vllm", use_peft=True, lora_r=4))
    with torch.no_grad():
        for name, p in trainer.unwrapped_policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the weights
    before = {n: p.detach().clone() for n, p in trainer.unwrapped_policy.named_parameters()}
    trainer.collect_rollout(0)
    loaded = trainer.vllm.llm.loaded[-1]
    from p3o.models.loading import load_causal_lm

    names = set(load_causal_lm(str(assets["llama"])).state_dict()) - {"lm_head.weight"}  # tied to the embeddings
    assert set(loaded) == names
    q = "model.layers.0.self_attn.q_proj.weight"
    base = before[f"base_model.model.{q}".replace("q_proj.weight", "q_proj.base_layer.weight")]
    assert not torch.allclose(loaded[q], base)  # merged, not the bare base weight
    after = {n: p.detach() for n, p in trainer.unwrapped_policy.named_parameters()}
    assert all(torch.allclose(after[n], before[n], atol=1e-6) for n in before)  # unmerged again afterwards


@pytest.mark.parametrize("mixed_precision, torch_dtype, expected", [
    ("bf16", "float32", "bfloat16"), ("fp16", "float32", "float16"), ("no", "float32", "float32"),
    ("bf16", "bfloat16", "bfloat16"), ("no", "auto", "auto")])
def test_vllm_samples_in_the_precision_the_policy_computes_in(mixed_precision, torch_dtype, expected):
    """float32 weights trained under autocast sample in its precision, as the transformers backend does."""
    from p3o.rl.vllm_backend import sampling_dtype

    assert sampling_dtype(SimpleNamespace(mixed_precision=mixed_precision, torch_dtype=torch_dtype)) == expected


def test_vllm_is_imported_only_when_asked_for(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed: importing it raises ImportError
    assert build_trainer(train_config(assets, tmp_path)).vllm is None
    with pytest.raises(UsageError, match="--generation_backend vllm needs vLLM"):
        build_trainer(train_config(assets, tmp_path, generation_backend="vllm"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pushing_lora_weights_never_writes_the_frozen_base(assets, tmp_path, fake_vllm, dtype):
    """Merging in place and back before every rollout rounded a half-precision base each time, drifting
    the reference; merged copies leave it bit for bit as it was."""
    trainer = build_trainer(train_config(assets, tmp_path, generation_backend="vllm", use_peft=True, lora_r=4,
                                         torch_dtype=dtype))
    policy = trainer.unwrapped_policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    for _ in range(100):
        trainer.vllm.sync_weights(policy)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    name = "model.layers.0.self_attn.q_proj"
    base = before[f"base_model.model.{name}.base_layer.weight"]
    module = policy.get_submodule(f"base_model.model.{name}")
    expected = (base.float() + module.get_delta_weight("default").float()).to(base.dtype)
    assert base.dtype == getattr(torch, dtype) and torch.equal(trainer.vllm.llm.loaded[-1][f"{name}.weight"], expected)
