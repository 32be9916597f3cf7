"""The speed levers of the step (docs/performance.md) change no number they should not: a LoRA
policy's frozen base held in bf16 under --mixed_precision bf16 computes what autocast computed,
with KL exactly 0 and ratio exactly 1 at the start, and saves in the dtype it was loaded in;
log-probabilities taken a block of rows at a time from the bf16 logits equal the plain float32
log-softmax, with the same gradients."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import train_config
from test_engine import first_update_ratio_gap

from p3o.models.loading import load_causal_lm
from p3o.rl.rollout import batched_logprobs_and_values, batched_token_logprobs
from p3o.rl.train import build_trainer


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process: these tests change it, so each
    starts and leaves with none set (the rest of the suite runs in float32)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def bf16_lora(assets, tmp_path, arch="llama", **overrides):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    kw = dict(model_name_or_path=str(assets[arch]), use_peft=True, lora_r=4, mixed_precision="bf16")
    return build_trainer(train_config(assets, tmp_path, **{**kw, **overrides}))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_base_holds_frozen_matmul_weights_in_bf16_and_trains_float32_adapters(assets, tmp_path, arch):
    trainer = bf16_lora(assets, tmp_path, arch)
    policy = trainer.unwrapped_policy
    trained = [p for p in policy.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.float32 for group in trainer.optimizer.param_groups for p in group["params"])
    narrowed = {n for n, p in policy.named_parameters() if p.dtype == torch.bfloat16}
    assert narrowed == set(policy.p3o_saved_dtypes)
    assert any(".base_layer." in n for n in narrowed)
    assert policy.get_output_embeddings().weight.dtype == torch.bfloat16  # the head, tied to the embedding here
    norms = [p for n, p in policy.named_parameters() if "norm" in n or "ln_" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    # Without bf16 autocast, or with a reference model of its own, nothing is narrowed.
    for other in (dict(mixed_precision="no"), dict(ref_model_name_or_path=str(assets[arch]))):
        policy = bf16_lora(assets, tmp_path, arch, **other).unwrapped_policy
        assert all(p.dtype == torch.float32 for p in policy.parameters()), other


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_base_computes_what_autocast_computed_on_float32_weights(assets, tmp_path, arch):
    """Every matmul sees the bf16 weights autocast would have made; the one change to the model is
    the tied embedding's rows, rounded to bf16: a float32 model with those rows rounded gives
    bit-identical log-probs under autocast."""
    trainer = bf16_lora(assets, tmp_path, arch, max_steps=1)
    rollout, _, _ = trainer.collect_rollout(0)
    initial = load_causal_lm(str(assets[arch]))
    embedding = initial.get_input_embeddings().weight
    embedding.data = embedding.data.to(torch.bfloat16).float()
    batch = trainer.sizes.micro_groups * trainer.sizes.num_generations
    with trainer.accelerator.autocast():
        expected = batched_token_logprobs(initial, rollout, 1.0, 16)
        reference = batched_token_logprobs(trainer.ref_policy, rollout, 1.0, 16)
        as_engine = batched_logprobs_and_values(initial, rollout, 1.0, batch,
                                                prompt_group=trainer.packed_group(rollout))[0]
    assert torch.equal(reference, expected)
    assert torch.equal(rollout.ref_token_logp, as_engine)  # the rollout's reference pass


def test_bf16_base_kl_is_exactly_0_and_the_first_ratio_exactly_1(assets, tmp_path):
    trainer = bf16_lora(assets, tmp_path, max_steps=1)  # epochs 2: a separate no-grad pass for pi_old
    assert not trainer.fuse_old_pass
    rollout, _, _ = trainer.collect_rollout(0)
    assert torch.equal(rollout.old_token_logp, rollout.ref_token_logp) and not rollout.kl.any()
    assert first_update_ratio_gap(bf16_lora(assets, tmp_path, max_steps=1)) == 0.0


@pytest.mark.parametrize("algo", ["p3o-v1", "ppo"])
def test_bf16_full_fine_tune_kl_is_exactly_0_and_the_first_ratio_exactly_1(assets, tmp_path, algo):
    """Without LoRA (float32 weights under autocast, a reference copy) the other levers keep it exact too."""
    trainer = bf16_lora(assets, tmp_path, algo=algo, use_peft=False, max_steps=1)
    assert not trainer.fuse_old_pass
    rollout, _, _ = trainer.collect_rollout(0)
    assert not rollout.kl.any()
    assert first_update_ratio_gap(bf16_lora(assets, tmp_path, algo=algo, use_peft=False, max_steps=1)) == 0.0


def test_bf16_base_on_smollm2_kl_is_exactly_0_and_the_first_ratio_exactly_1(assets, smollm2, tmp_path):
    """The real model (tied 49k embedding, 30 layers), chat prompts, a separate old pass."""
    from conftest import user, write_jsonl

    rewards = tmp_path / "rewards.py"
    rewards.write_text("def short(prompts, completions, **kw):\n"
                       "    return [-float(len(c[-1]['content'])) for c in completions]\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [user(q)]} for q in ("Say hello.", "Name a fruit.")])
    kw = dict(model_name_or_path=str(smollm2), dataset=str(prompts), reward_fn=f"{rewards}:short", pairs_per_step=2,
              minibatch_pairs=1, max_new_tokens=4, max_steps=1, lora_r=16)
    trainer = bf16_lora(assets, tmp_path, **kw)
    assert trainer.unwrapped_policy.get_input_embeddings().weight.dtype == torch.bfloat16  # tied to the head
    rollout, _, _ = trainer.collect_rollout(0)
    assert torch.equal(rollout.old_token_logp, rollout.ref_token_logp) and not rollout.kl.any()
    assert first_update_ratio_gap(bf16_lora(assets, tmp_path, **kw)) == 0.0


def test_bf16_base_keeps_ppos_value_head_float32(assets, tmp_path):
    trainer = bf16_lora(assets, tmp_path, algo="ppo", max_steps=1)
    head = trainer.trained_module.value_head
    assert head.weight.dtype == head.bias.dtype == torch.float32 and head.weight.requires_grad
    rollout, _, _ = trainer.collect_rollout(0)
    assert not rollout.kl.any() and rollout.old_values.dtype == torch.float32
    trainer.update(rollout, 0)


def test_bf16_base_saves_the_merged_model_in_the_loaded_dtype(assets, tmp_path):
    from safetensors import safe_open

    from p3o.rl.train import _save_policy

    trainer = bf16_lora(assets, tmp_path, max_steps=2, learning_rate=1e-2)
    trainer.train()
    rollout, _, _ = trainer.collect_rollout(2)
    with trainer.accelerator.autocast():
        trained = batched_token_logprobs(trainer.unwrapped_policy, rollout, 1.0, 16)
    out = tmp_path / "saved"
    out.mkdir()
    _save_policy(trainer, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    with safe_open(out / "model.safetensors", "pt") as saved:
        assert {saved.get_tensor(n).dtype for n in saved.keys()} == {torch.float32}
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        assert {adapter.get_tensor(n).dtype for n in adapter.keys()} == {torch.float32}
    merged = load_causal_lm(str(out))
    with trainer.accelerator.autocast():  # merged, then rounded by autocast: close to what was trained
        assert torch.allclose(batched_token_logprobs(merged, rollout, 1.0, 16), trained, atol=0.05)
    # the run's model is untouched by saving: still bf16 underneath, and the same policy
    assert trainer.unwrapped_policy.get_output_embeddings().weight.dtype == torch.bfloat16
    with trainer.accelerator.autocast():
        assert torch.equal(batched_token_logprobs(trainer.unwrapped_policy, rollout, 1.0, 16), trained)


def test_saving_a_bf16_lora_policy_holds_one_widened_copy_at_a_time(assets, tmp_path, monkeypatch):
    """The final save's peak memory: each LoRA layer's delta lives only while its layer is merged
    (all at once, they cost as much as the merged weights again), and the embedding widened for
    `save_pretrained` is the merged state dict's own tensor, not a second float32 copy."""
    import weakref

    from peft.tuners.lora import LoraLayer

    from p3o.models.lora import in_saved_dtypes, merged_lora_state_dict

    model = bf16_lora(assets, tmp_path, max_steps=1, learning_rate=1e-2).unwrapped_policy
    alive, most = [], [0]
    layer_type = type(next(m for m in model.modules() if isinstance(m, LoraLayer)))
    delta_weight = layer_type.get_delta_weight

    def counted(self, adapter):
        delta = delta_weight(self, adapter)
        alive[:] = [ref for ref in alive if ref() is not None] + [weakref.ref(delta)]
        most[0] = max(most[0], len(alive))
        return delta

    monkeypatch.setattr(layer_type, "get_delta_weight", counted)
    merged = merged_lora_state_dict(model)
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) > 4 and most[0] <= 2

    embedding = model.get_input_embeddings().weight
    with in_saved_dtypes(model, merged):
        assert embedding.dtype == torch.float32
        assert embedding.data_ptr() == merged["model.embed_tokens.weight"].data_ptr()
    assert embedding.dtype == torch.bfloat16


# --- log-probabilities without float32 (B, T, V) logits ---------------------------------------------

def naive_selective_log_softmax(logits, index, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, index[..., None])[..., 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("block", [1 << 21, 50, 7])  # whole rows at once, several rows, pieces of a row
def test_blockwise_log_probs_and_gradients_equal_the_plain_ones(monkeypatch, dtype, temperature, block):
    import p3o.utils.ops as ops

    monkeypatch.setattr(ops, "_block_elements", lambda device: block)
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11)).to(dtype).requires_grad_()
    index, weights = torch.randint(0, 11, (3, 5)), torch.randn(3, 5)
    got = ops.selective_log_softmax(logits, index, temperature)
    (got * weights).sum().backward()
    grad, logits.grad = logits.grad, None
    expected = naive_selective_log_softmax(logits, index, temperature)
    (expected * weights).sum().backward()
    assert got.dtype == torch.float32 and grad.dtype == dtype
    assert torch.allclose(got, expected, atol=2e-6)
    assert torch.allclose(grad.float(), logits.grad.float(), atol=2e-6)


def test_blockwise_log_probs_pass_gradcheck_and_take_any_leading_shape(monkeypatch):
    import p3o.utils.ops as ops

    monkeypatch.setattr(ops, "_block_elements", lambda device: 7)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda x: ops.selective_log_softmax(x, index, 0.6), (logits,))
    flat = torch.randn(6, 5)
    expected = naive_selective_log_softmax(flat, index.flatten())
    assert torch.allclose(ops.selective_log_softmax(flat, index.flatten()), expected)


@pytest.mark.parametrize("group", [1, 2])
def test_the_training_forward_keeps_no_float32_logits_and_gives_the_plain_gradient(assets, tmp_path, group):
    """Under bf16 autocast the only (B, T, V) tensor kept for backward is the bf16 logits, and the
    model's gradient is the one of the plain log-softmax."""
    from p3o.rl.rollout import token_logprobs_and_values

    trainer = bf16_lora(assets, tmp_path, max_steps=1)
    seq = trainer.collect_rollout(0)[0]
    V = trainer.unwrapped_policy.get_output_embeddings().weight.shape[0]
    args = (seq.query_ids, seq.query_mask, seq.response_ids, seq.response_mask, 0.8)
    gradients = []
    for plain in (False, True):
        saved = []

        def pack(t):
            saved.append((t.dtype, tuple(t.shape)))
            return t

        with trainer.accelerator.autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if plain:  # the same forward with the plain log-softmax put in
                import p3o.rl.rollout as rollout_module
                original = rollout_module.selective_log_softmax
                rollout_module.selective_log_softmax = naive_selective_log_softmax
                try:
                    logps, _ = token_logprobs_and_values(trainer.policy, *args, prompt_group=group)
                finally:
                    rollout_module.selective_log_softmax = original
            else:
                logps, _ = token_logprobs_and_values(trainer.policy, *args, prompt_group=group)
                assert not [s for s in saved if s[0] == torch.float32 and s[1][-1] == V], saved
                assert [s for s in saved if s[0] == torch.bfloat16 and s[1][-1] == V]
        trainer.optimizer.zero_grad()
        (logps * torch.linspace(-1, 1, logps.numel()).reshape(logps.shape)).sum().backward()
        gradients.append({n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None})
    new, plain = gradients
    assert new.keys() == plain.keys() and new
    for name in new:
        assert torch.allclose(new[name], plain[name], atol=1e-5, rtol=1e-3), name


# --- attention's backward in float32 under CPU bf16 autocast -------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cpu_bf16_attention_forward_is_autocasts_and_its_backward_float32(assets, tmp_path, monkeypatch, arch):
    """The wrapper changes no forward value (log-probs, so ratios, KLs and samples, are those of
    autocast's attention), takes its backward in float32 (written out, or SDPA run again on float32
    inputs: the same gradients), and gives autocast's gradient within bf16 rounding."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import p3o.models.attention as attention_module
    from p3o.rl.rollout import token_logprobs_and_values

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):  # the dtype it runs in: its inputs', or autocast's
        autocast = torch.is_autocast_enabled("cpu")
        calls.append({torch.get_autocast_dtype("cpu")} if autocast else {query.dtype, key.dtype, value.dtype})
        return sdpa(query, key, value, *args, **kwargs)

    trainer = bf16_lora(assets, tmp_path, arch, max_steps=1)
    seq = trainer.collect_rollout(0)[0]
    args = (seq.query_ids, seq.query_mask, seq.response_ids, seq.response_mask, 0.8)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    installed, results = ALL_ATTENTION_FUNCTIONS["sdpa"], []
    assert installed.p3o_float32_backward
    # the float32 gradient recomputed through SDPA; autocast's own bf16 backward; p3o's default, the
    # float32 gradient written out (SDPA not called in the backward)
    for attention, recomputed in ((installed, True), (installed.wrapped, False), (installed, False)):
        with monkeypatch.context() as patch:
            patch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", attention)
            if recomputed:
                patch.setattr(attention_module, "_float32_grads", lambda *args: None)
            trainer.optimizer.zero_grad()
            calls.clear()
            with trainer.accelerator.autocast():
                logps, _ = token_logprobs_and_values(trainer.policy, *args, prompt_group=trainer.prompt_group)
            forward = list(calls)
            (logps * torch.linspace(-1, 1, logps.numel()).reshape(logps.shape)).sum().backward()
            results.append((logps.detach(), forward, calls[len(forward):],
                            {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}))
    (logps, forward, backward, grads), (plain_logps, plain_forward, plain_backward, plain_grads) = results[:2]
    written_logps, written_forward, written_backward, written_grads = results[2]
    assert torch.equal(logps, plain_logps) and torch.equal(written_logps, plain_logps)
    assert forward == plain_forward == written_forward and all(dtypes == {torch.bfloat16} for dtypes in forward)
    assert forward and backward and all(dtypes == {torch.float32} for dtypes in backward) and not plain_backward
    assert not written_backward
    assert grads.keys() == plain_grads.keys() == written_grads.keys() and grads
    for name in grads:  # bf16's own backward is the rougher one: agree to its rounding, as a whole
        gap = (grads[name] - plain_grads[name]).norm() / plain_grads[name].norm().clamp(min=1e-12)
        assert gap < 0.02, (name, gap)
        # written out or recomputed, the same float32 gradient up to float32 rounding downstream
        assert torch.allclose(written_grads[name], grads[name], rtol=1e-4, atol=1e-6 * grads[name].abs().max()), name
    with torch.no_grad():  # no gradient recorded (sampling, reference, old pass): autocast's attention itself
        calls.clear()
        trainer.log_probs(seq, {})
        assert calls and all(dtypes == {torch.bfloat16} for dtypes in calls)


def attention_case(kind: str, H=6, Hkv=2, B=3, L=14, D=8):
    """bf16 inputs as autocast leaves them, a boolean mask (or None), the attention module's causal
    flag and the call's keyword arguments for a call of `kind`, and an output gradient (B, Lq, H, D)."""
    import types

    gen = torch.Generator().manual_seed(len(kind))
    Lq = {"one query": 1, "cross": 5}.get(kind, L)
    q = torch.randn(B, H, Lq, D, generator=gen).bfloat16()
    k, v = (torch.randn(B, Hkv, L, D, generator=gen).bfloat16() for _ in range(2))
    causal, keep = torch.ones(L, L, dtype=torch.bool).tril(), torch.ones(B, L, dtype=torch.bool)
    keep[0, :4], keep[1, :2] = False, False  # left padding
    causal_module = kind not in ("not causal (module)", "cross")
    module = types.SimpleNamespace(num_key_value_groups=H // Hkv, is_causal=causal_module)
    kwargs = dict(dropout=0.0, scaling=0.3, position_ids=None)
    mask = None  # "causal": the causal flag, "cross" and "not causal (module)": attention over every key
    if kind == "padded":  # row 0's first 4 queries may attend to nothing at all
        mask = (causal & keep[:, None, :])[:, None]
    elif kind == "packed":  # [prompt, y1, y2]: y2 does not see y1
        mask = causal[None, None].repeat(B, 1, 1, 1)
        mask[:, 0, 9:, 4:9] = False
    elif kind == "not causal (keyword)":  # no mask, the call's is_causal=False: every key
        kwargs["is_causal"] = False
    elif kind == "not causal (mask)":  # an encoder's padding mask: every real key, either side
        mask = keep[:, None, None, :].expand(B, 1, L, L)
    elif kind == "one query":  # a decoding step
        mask = keep[:, None, None, :]
    elif kind == "default scale":
        mask = causal[None, None]  # one mask for every row
        del kwargs["scaling"]
    return q, k, v, mask, module, kwargs, torch.randn(B, Lq, H, D, generator=gen)


ATTENTION_KINDS = ["padded", "packed", "causal", "not causal (keyword)", "not causal (module)", "not causal (mask)",
                   "one query", "cross", "default scale"]


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_attention_gradient_written_out_equals_sdpas_in_float64(kind, heads, monkeypatch):
    """The written-out float32 gradient of `transformers`' sdpa attention (grouped heads, masks,
    rows with nothing to attend to, the causal flag or none, the default scale, one query, more keys
    than queries, batch rows taken a few at a time) is SDPA's own, taken in float64, to float32
    rounding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from p3o.models import attention

    q, k, v, mask, module, kwargs, grad = attention_case(kind, *heads)
    inputs = [t.double().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(sdpa_attention_forward(module, *inputs, mask, **kwargs)[0], inputs, grad.double())
    for row_limit in (attention.ROW_LIMIT, q.shape[1] * q.shape[2] * k.shape[2]):  # all rows at once; one at a time
        monkeypatch.setattr(attention, "ROW_LIMIT", row_limit)
        written = attention._float32_grads(module, q, k, v, mask, kwargs, grad)
        for mine, truth in zip(written, exact, strict=True):
            assert mine.dtype == torch.float32 and mine.shape == truth.shape
            assert (mine.double() - truth).norm() / truth.norm() < 1e-6


def test_attention_gradient_left_to_sdpa_where_the_call_is_not_plain_attention(monkeypatch):
    """Dropout, arguments that change the arithmetic, additive or per-head masks, sequences longer
    than MAX_KEYS and rows too long to hold the probabilities of: None (the caller recomputes
    through SDPA in float32)."""
    from p3o.models import attention

    q, k, v, mask, module, plain, grad = attention_case("packed")
    assert attention._float32_grads(module, q, k, v, mask, plain, grad) is not None
    for kwargs in (dict(plain, dropout=0.1), dict(plain, softcap=30.0), dict(plain, position_bias=mask.float()),
                   dict(plain, s_aux=torch.zeros(6))):
        assert attention._float32_grads(module, q, k, v, mask, kwargs, grad) is None, sorted(kwargs)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    for other in (mask.expand(-1, 6, -1, -1), additive, additive.bfloat16()):
        assert attention._float32_grads(module, q, k, v, other, plain, grad) is None
    monkeypatch.setattr(attention, "MAX_KEYS", 13)
    assert attention._float32_grads(module, q, k, v, mask, plain, grad) is None
    monkeypatch.setattr(attention, "MAX_KEYS", 14)
    monkeypatch.setattr(attention, "ROW_LIMIT", 6 * 14 * 14 - 1)
    assert attention._float32_grads(module, q, k, v, mask, plain, grad) is None


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_cpu_bf16_gradient_checkpointing_recomputes_through_the_same_attention(assets, tmp_path):
    gradients = []
    for checkpointing in (False, True):
        trainer = bf16_lora(assets, tmp_path, max_steps=1, epochs=1, pairs_per_step=8, minibatch_pairs=8,
                            gradient_checkpointing=checkpointing)
        grads, step = {}, trainer.optimizer.step

        def record_then_step(*args, **kwargs):
            if not grads:
                grads.update({n: p.grad.clone() for n, p in trainer.unwrapped_policy.named_parameters()
                              if p.grad is not None})
            return step(*args, **kwargs)

        trainer.optimizer.step = record_then_step
        trainer.train()
        gradients.append(grads)
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys() and plain
    assert any(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-3), name


def test_reward_model_scores_in_the_runs_precision(assets, tmp_path, tokenizer):
    """Under --mixed_precision bf16 the reward model scores under bf16 autocast, as the policy runs;
    holding its linear weights in bf16 changes nothing autocast would not (bit for bit), a model the
    caller passed in is never narrowed, and a float32 run scores in float32."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from p3o.reward import RewardModelScorer

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts, completions = ["story : cat", "dog", "story : big dog runs"], [" sees the fish", " runs", " ."]

    exact = RewardModelScorer.load(str(tmp_path / "rm"))(prompts, completions)
    narrowed = RewardModelScorer.load(str(tmp_path / "rm")).score_in(torch.bfloat16)
    assert all(m.weight.dtype == torch.bfloat16 for m in narrowed.model.modules() if isinstance(m, torch.nn.Linear))
    borrowed_model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm")
    borrowed = RewardModelScorer(borrowed_model, tokenizer, "borrowed").score_in(torch.bfloat16)
    fast = narrowed(prompts, completions)
    assert torch.equal(fast, borrowed(prompts, completions))  # the weights autocast would have made
    assert all(p.dtype == torch.float32 for p in borrowed_model.parameters())  # the caller's model untouched
    assert not torch.equal(fast, exact) and torch.allclose(fast, exact, atol=0.05 * exact.abs().max().item())

    for precision, dtype in (("bf16", torch.bfloat16), ("no", None)):
        trainer = bf16_lora(assets, tmp_path, mixed_precision=precision, reward_fn=None,
                            reward_model=[str(tmp_path / "rm")])
        [(_, scorer, _)] = trainer.reward.parts
        assert scorer.autocast_dtype == dtype, precision
