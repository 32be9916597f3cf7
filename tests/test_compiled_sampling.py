"""--compile_sampling: each decoding step runs one torch.compile'd forward over a static KV cache.
It samples what the eager step samples (the same tokens for a fixed seed), one graph serves
rollouts whose LoRA weights changed, and the flag is refused where it cannot work."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import train_config
from test_rollout import PROMPTS, sampling, tokenize_prompts
from test_sampling import lora_model

from p3o.errors import UsageError
from p3o.models.loading import load_causal_lm
from p3o.rl.kv_cache import CAPACITY_STEP, static_cache
from p3o.rl.rollout import generation_config, has_cpp_compiler, sample_responses

# Tests that compile: inductor builds C++ kernels on a CPU. Without a compiler p3o refuses the flag
# (tested below, on any machine), so there is nothing of these to run.
compiles = pytest.mark.skipif(not has_cpp_compiler(), reason="no C++ compiler: inductor cannot build CPU kernels")


def sample(model, ids, mask, config, eos, seed, compiled):
    torch.manual_seed(seed)
    return sample_responses(model, ids, mask, config, eos, compiled=compiled)


def compiled_graphs() -> int:
    """Graphs torch.compile built since the last reset (each test starts from none)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@compiles
def test_the_compiled_step_samples_the_eager_tokens_and_one_graph_serves_changed_adapters(assets, tokenizer):
    """Float32, LoRA merged for sampling: the same tokens for a fixed seed, before and after the
    adapters change (a rollout after an update), with no second compilation."""
    model = lora_model(assets, "llama")
    eos = [tokenizer.eos_token_id]
    ids, mask = tokenize_prompts(tokenizer, PROMPTS * 2, 64)
    config = generation_config(sampling(max_new_tokens=12), tokenizer, eos)
    for seed in (0, 1):
        if seed:  # an update changed the adapters: the merged weights are new tensors
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.add_(0.05 * torch.randn_like(param))
        eager = sample(model, ids, mask, config, eos, seed, compiled=False)
        compiled = sample(model, ids, mask, config, eos, seed, compiled=True)
        assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    assert compiled_graphs() == 1


@compiles
def test_the_compiled_step_under_bf16_autocast_samples_the_eager_tokens(assets, tokenizer):
    """The static cache holds keys and values in bf16 (rotary embeddings leave the keys in float32),
    which attention casts them to anyway."""
    model = load_causal_lm(str(assets["llama"]))
    eos = [tokenizer.eos_token_id]
    ids, mask = tokenize_prompts(tokenizer, PROMPTS * 2, 64)
    config = generation_config(sampling(max_new_tokens=10), tokenizer, eos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = sample(model, ids, mask, config, eos, 3, compiled=False)[0]
        compiled = sample(model, ids, mask, config, eos, 3, compiled=True)[0]
    assert torch.equal(compiled, eager)
    assert compiled_graphs() == 1


@compiles
def test_a_greedy_config_is_left_as_it_was(assets, tokenizer):
    model = load_causal_lm(str(assets["llama"]))
    eos = [tokenizer.eos_token_id]
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    config = generation_config(sampling(max_new_tokens=6), tokenizer, eos, greedy=True)
    eager = sample(model, ids, mask, config, eos, 0, compiled=False)[0]
    compiled = sample(model, ids, mask, config, eos, 0, compiled=True)[0]
    assert torch.equal(compiled, eager)
    assert config.compile_config is None  # the caller's config is not the one compiled with


def test_the_static_cache_rounds_its_length_up_and_is_refused_where_layers_are_not_plain(assets):
    model = load_causal_lm(str(assets["llama"]))
    cache = static_cache(model, CAPACITY_STEP + 1)
    assert all(layer.max_cache_len == 2 * CAPACITY_STEP for layer in cache.layers)
    model.config.sliding_window, model.config.use_sliding_window = 4, True  # local attention: a cache of its own
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    assert static_cache(model, 8) is None


@compiles
def test_a_trainer_with_the_flag_collects_the_rollout_and_takes_the_update_of_one_without(assets, tmp_path):
    """End to end (P3O, LoRA, bf16): the same responses, reference log-probabilities and first update."""
    from p3o.rl.train import build_trainer

    results = []
    for compiled in (False, True):
        trainer = build_trainer(train_config(assets, tmp_path / str(compiled), compile_sampling=compiled,
                                             use_peft=True, mixed_precision="bf16", epochs=1, minibatch_pairs=8))
        rollout, _, _ = trainer.collect_rollout(0)
        stats = trainer.update(rollout, 0)
        results.append((rollout, stats))
    (eager, eager_stats), (compiled, compiled_stats) = results
    assert torch.equal(compiled.response_ids, eager.response_ids)
    assert torch.equal(compiled.ref_token_logp, eager.ref_token_logp)
    assert compiled_stats["loss"] == eager_stats["loss"]
    assert compiled_graphs() == 1


def test_the_flag_is_refused_with_vllm_and_without_a_compiler(assets, tmp_path, monkeypatch):
    from p3o.rl.train import build_trainer

    with pytest.raises(UsageError, match="--compile_sampling"):
        train_config(assets, tmp_path, compile_sampling=True, generation_backend="vllm")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="C\\+\\+ compiler"):
        build_trainer(train_config(assets, tmp_path, compile_sampling=True))


def test_a_model_without_a_static_cache_is_told_that_sampling_stays_eager(assets, tmp_path, monkeypatch, caplog):
    import p3o.rl.engine as engine
    import p3o.rl.kv_cache as kv_cache
    from p3o.rl.train import _warn_about_inputs, build_trainer

    monkeypatch.setattr(engine, "has_cpp_compiler", lambda: True)  # nothing is compiled here
    trainer = build_trainer(train_config(assets, tmp_path, compile_sampling=True))
    with caplog.at_level("WARNING", logger="p3o"):
        _warn_about_inputs(trainer)
    assert "--compile_sampling" not in caplog.text  # a Llama: compiled
    monkeypatch.setattr(kv_cache, "supports_static_cache", lambda model: False)  # as for sliding windows
    with caplog.at_level("WARNING", logger="p3o"):
        _warn_about_inputs(trainer)
    assert "--compile_sampling: sampling stays eager" in caplog.text
