"""The sampling levers (docs/performance.md) draw from the distributions they replace: tokens by
inverse CDF follow the (warped) softmax, never a masked token; a LoRA model samples with its
adapters merged into copies of its weights, computing the logits the adapters compute, writing
nothing of the model and leaving it as it was."""
from __future__ import annotations

import pytest
import torch
from test_rollout import PROMPTS, sampling, tokenize_prompts

from p3o.models.loading import load_causal_lm
from p3o.models.lora import add_lora, hold_frozen_base_in
from p3o.models.sampling_weights import PackedLinear, sampling_weights
from p3o.rl.rollout import generation_config, sample_responses
from p3o.rl.sampling import InverseCdfSampler, as_inverse_cdf, draw


def frequencies(tokens: torch.Tensor, vocabulary: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=vocabulary).double() / tokens.numel()


def assert_close_to(freq: torch.Tensor, probs: torch.Tensor, n: int) -> None:
    """Every frequency within 5 standard errors of its probability (a binomial's); zeros exactly."""
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-12).all(), (freq, probs)


def test_inverse_cdf_draws_follow_the_probabilities_and_never_a_masked_token():
    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])  # zeros inside and at both ends
    n = 200_000
    tokens = draw(probs.expand(n, -1))  # (n, 1)
    assert_close_to(frequencies(tokens, 7), probs.double(), n)
    assert (probs[tokens] > 0).all()


def test_a_uniform_that_rounds_up_to_the_total_takes_the_last_possible_token(monkeypatch):
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, **kw))  # u = total exactly
    assert draw(probs).flatten().tolist() == [1, 2]


@pytest.mark.parametrize("warp", [dict(), dict(temperature=0.5), dict(top_k=3), dict(top_p=0.8),
                                  dict(temperature=1.5, top_k=5, top_p=0.9)])
def test_the_sampler_draws_from_the_softmax_generate_would_sample(warp):
    """The same temperature, top-k and top-p warpers, in `generate`'s order, then the softmax."""
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    expected = LogitsProcessorList()
    if warp.get("temperature", 1.0) != 1.0:
        expected.append(TemperatureLogitsWarper(warp["temperature"]))
    if warp.get("top_k"):
        expected.append(TopKLogitsWarper(warp["top_k"]))
    if warp.get("top_p", 1.0) < 1.0:
        expected.append(TopPLogitsWarper(warp["top_p"]))
    probs = torch.softmax(expected(None, logits.clone()), -1)[0].double()  # (12,)
    config, processors = as_inverse_cdf(GenerationConfig(do_sample=True, **{"temperature": 1.0, "top_k": 0,
                                                                             "top_p": 1.0, **warp}))
    assert not config.do_sample and isinstance(processors[0], InverseCdfSampler)
    n = 100_000
    scores = processors(None, logits.expand(n, -1).clone())  # (n, 12): one finite entry per row
    assert (torch.isfinite(scores).sum(-1) == 1).all()
    assert_close_to(frequencies(scores.argmax(-1), 12), probs, n)
    if "top_k" in warp:
        assert (probs > 0).sum() <= warp["top_k"]


def test_greedy_configs_are_left_as_they_are():
    from transformers import GenerationConfig

    greedy = GenerationConfig(do_sample=False)
    assert as_inverse_cdf(greedy) == (greedy, None)


def test_sampling_is_repeatable_for_a_fixed_seed_and_varies_across_seeds(assets, tokenizer):
    model = load_causal_lm(str(assets["llama"]))
    ids, mask = tokenize_prompts(tokenizer, PROMPTS * 4, 64)
    config = generation_config(sampling(max_new_tokens=8), tokenizer, [tokenizer.eos_token_id])
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(sample_responses(model, ids, mask, config, [tokenizer.eos_token_id])[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def lora_model(assets, arch: str, scale: float = 0.05):
    """A LoRA model whose adapters are not zero (B random), as after some training."""
    model = add_lora(load_causal_lm(str(assets[arch])), r=4, alpha=8, target_modules="all-linear")
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, scale)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GPT-2's Conv1D holds its weight transposed
def test_merged_adapters_compute_the_adapters_logits_and_leave_the_model_as_it_was(assets, tokenizer, arch):
    from peft.tuners.lora import LoraLayer

    model = lora_model(assets, arch)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    before = {n: p.clone() for n, p in model.named_parameters()}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        adapters = model(input_ids=ids, attention_mask=mask).logits
        with sampling_weights(model):
            assert not any(isinstance(m, LoraLayer) for m in model.modules())
            merged = model(input_ids=ids, attention_mask=mask).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask).logits
    assert (adapters - plain).abs().max() > 1e-2  # the adapters do change the model
    assert torch.allclose(merged, adapters, atol=2e-5)
    assert {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)} == layers
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert base is model.get_base_model()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_lora_model_samples_what_its_adapters_would(assets, tokenizer, arch, monkeypatch):
    """In float32 the merged weights' logits differ from the adapters' by float rounding only, so a
    fixed seed draws the same tokens."""
    import p3o.models.sampling_weights as weights

    model = lora_model(assets, arch)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS * 4, 64)
    config = generation_config(sampling(max_new_tokens=10), tokenizer, [tokenizer.eos_token_id])
    torch.manual_seed(5)
    merged = sample_responses(model, ids, mask, config, [tokenizer.eos_token_id])[0]
    with model.disable_adapter():  # adapters off: nothing merged, and another policy
        torch.manual_seed(5)
        plain = sample_responses(model, ids, mask, config, [tokenizer.eos_token_id])[0]
    monkeypatch.setattr(weights, "sampling_weights", lambda m, **kw: __import__("contextlib").nullcontext())
    torch.manual_seed(5)
    unmerged = sample_responses(model, ids, mask, config, [tokenizer.eos_token_id])[0]
    assert torch.equal(merged, unmerged)
    assert not torch.equal(merged, plain)


def test_merged_adapters_on_a_bf16_base_round_once_and_match_autocast(assets, tokenizer):
    """With the frozen base held in bf16 (--mixed_precision bf16), W + delta is summed in float32 and
    rounded to bf16 once: its logits under autocast agree with the adapters' within bf16 rounding."""
    model = lora_model(assets, "llama")
    hold_frozen_base_in(model, torch.bfloat16)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapters = model(input_ids=ids, attention_mask=mask).logits.float()
        with sampling_weights(model):
            packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
            merged = model(input_ids=ids, attention_mask=mask).logits.float()
    if bf16_matmul_units():
        layers = 7 * model.config.num_hidden_layers + 1  # q k v o gate up down per layer, and the output head
        assert len(packed) == layers
    spread = adapters.std()
    assert (merged - adapters).abs().max() < 0.05 * spread
    assert (merged - adapters).abs().mean() < 0.005 * spread


def bf16_matmul_units() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not bf16_matmul_units(), reason="oneDNN bf16 is not supported on this CPU")
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("rows", [(16,), (3, 40), "last"])  # a decoding step; a prefill; its last position
def test_a_prepacked_bf16_weight_computes_bit_identical_outputs(conv1d, rows):
    """For the inputs `generate` gives a layer: whole rows, and the head's slice of the last position."""
    from transformers.pytorch_utils import Conv1D

    from p3o.models.sampling_weights import _packed

    torch.manual_seed(0)
    layer = Conv1D(48, 64) if conv1d else torch.nn.Linear(64, 48)
    layer.to(torch.bfloat16)
    x = torch.randn(3, 40, 64)[:, -1:, :] if rows == "last" else torch.randn(*rows, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        got = _packed(layer, layer.weight)(x)
    assert got.dtype == expected.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_layers_that_cannot_merge_exactly_are_left_as_they_are(assets):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(load_causal_lm(str(assets["llama"])),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, lora_dropout=0.0))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with sampling_weights(model):
        assert [m for m in model.modules() if isinstance(m, LoraLayer)] == layers  # DoRA: not a plain W + BA
    plain = lora_model(assets, "llama")
    with plain.disable_adapter(), sampling_weights(plain):
        assert any(isinstance(m, LoraLayer) for m in plain.modules())  # adapters off: nothing to merge


def test_the_two_level_draw_crosses_blocks_and_the_ragged_last_one():
    """Mass spread over three blocks of `BLOCK` entries and a partial fourth, with masked entries
    at block edges: each block and each entry drawn as often as its probability says."""
    from p3o.rl.sampling import BLOCK

    torch.manual_seed(0)
    V = 3 * BLOCK + 7
    probs = torch.zeros(V)
    chosen = [0, BLOCK - 1, BLOCK + 5, 2 * BLOCK, 3 * BLOCK + 6]  # first/last of blocks, the ragged tail
    probs[chosen] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    n = 20_000
    tokens = draw(probs.expand(n, -1))
    assert_close_to(frequencies(tokens, V), probs.double(), n)


def test_rows_the_two_level_draw_would_put_on_a_masked_token_are_drawn_again(monkeypatch):
    """u = the whole mass (rounding at its extreme): the block search lands past the last positive
    entry, and the row is drawn again with one cumulative sum, never on a masked token."""
    from p3o.rl.sampling import BLOCK

    probs = torch.zeros(2, 2 * BLOCK)
    probs[0, 3], probs[0, BLOCK + 2] = 0.5, 0.5
    probs[1, 10] = 1.0
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, **kw))
    assert draw(probs).flatten().tolist() == [BLOCK + 2, 10]


def test_non_finite_probabilities_stop_sampling_with_a_clear_error():
    probs = torch.tensor([[0.5, 0.5], [float("nan"), 0.5]])
    with pytest.raises(FloatingPointError, match="not finite"):
        draw(probs)


# --- the lean LoRA forward of the training passes (p3o.models.lean_lora) ------------------------------

def forward_and_grads(model, ids, mask, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    (logits.square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("alpha", [8, 6])  # scale 2 (a power of two: exact) and 1.5
def test_the_lean_lora_forward_computes_peft_values_and_gradients(assets, tokenizer, autocast, alpha):
    from p3o.models.lean_lora import lean_lora_forward

    model = add_lora(load_causal_lm(str(assets["llama"])), r=4, alpha=alpha, target_modules="all-linear")
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    if autocast:
        hold_frozen_base_in(model, torch.bfloat16)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    peft_logits, peft_grads = forward_and_grads(model, ids, mask, autocast)
    assert lean_lora_forward(model) == 7 * model.config.num_hidden_layers
    lean_logits, lean_grads = forward_and_grads(model, ids, mask, autocast)
    if alpha == 8:  # scaling by 2 commutes exactly with every rounding
        assert torch.equal(lean_logits, peft_logits)
        assert all(torch.equal(lean_grads[n], peft_grads[n]) for n in peft_grads)
    tol = dict(atol=5e-2, rtol=5e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    assert torch.allclose(lean_logits, peft_logits, **tol)
    assert all(torch.allclose(lean_grads[n], peft_grads[n], **tol) for n in peft_grads)
    with torch.no_grad(), model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference = model(input_ids=ids, attention_mask=mask).logits.float()  # adapters off: peft's own path
    assert not torch.allclose(reference, lean_logits, atol=1e-3)


def test_layers_reading_one_input_keep_one_bf16_copy_of_it_for_backward(assets, tokenizer):
    """q, k and v read one input, as gate and up do: under the lean forward autograd keeps one bf16
    cast of it, not one per layer and branch. Per decoder layer that leaves three inputs of the
    hidden width kept in bf16: the attention's (q, k, v), o's and the MLP's (gate, up)."""
    from p3o.models.lean_lora import lean_lora_forward

    def kept_bf16_inputs(model) -> int:
        storages = set()

        def pack(t):
            if t.dtype == torch.bfloat16 and t.shape[-1] == model.config.hidden_size and t.numel() == rows * width:
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
        return len(storages)

    model = add_lora(load_causal_lm(str(assets["llama"])), r=4, alpha=8, target_modules="all-linear")
    hold_frozen_base_in(model, torch.bfloat16)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    rows, width, layers = ids.numel(), model.config.hidden_size, model.config.num_hidden_layers
    peft_kept = kept_bf16_inputs(model)
    lean_lora_forward(model)
    assert kept_bf16_inputs(model) == 3 * layers < peft_kept
    from p3o.models import lean_lora
    assert lean_lora._last_cast[2]() is None  # once the backward has run, nothing holds the last cast


@pytest.mark.parametrize("autocast", [False, True])
def test_the_lean_gated_mlp_computes_the_same_bits_and_keeps_a_third_less(assets, tokenizer, autocast):
    """silu(gate) * up with silu(gate) recomputed in the backward: the same values and gradients,
    bit for bit, with one (rows, intermediate) activation fewer kept per layer."""
    from p3o.models.lean_mlp import lean_gated_mlp

    def kept_intermediates(model) -> int:
        storages = set()

        def pack(t):
            if t.shape[-1] == model.config.intermediate_size and t.numel() == ids.numel() * t.shape[-1]:
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_and_grads(model, ids, mask, autocast)
        return len(storages)

    torch.manual_seed(0)
    model = load_causal_lm(str(assets["llama"]))
    if autocast:
        model = add_lora(model, r=4, alpha=8, target_modules="all-linear")
        hold_frozen_base_in(model, torch.bfloat16)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    plain_logits, plain_grads = forward_and_grads(model, ids, mask, autocast)
    plain_kept = kept_intermediates(model)
    assert lean_gated_mlp(model) == model.config.num_hidden_layers
    lean_logits, lean_grads = forward_and_grads(model, ids, mask, autocast)
    assert torch.equal(lean_logits, plain_logits)
    assert all(torch.equal(lean_grads[n], plain_grads[n]) for n in plain_grads)
    assert kept_intermediates(model) == plain_kept - model.config.num_hidden_layers


def test_layers_the_lean_forward_would_change_keep_pefts(assets):
    from peft import LoraConfig, get_peft_model

    from p3o.models.lean_lora import lean_lora_forward

    for config in (dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_dropout=0.0, lora_bias=True)):
        model = get_peft_model(load_causal_lm(str(assets["llama"])),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **config))
        assert lean_lora_forward(model) == 0, config
    gpt2 = add_lora(load_causal_lm(str(assets["gpt2"])), r=4, alpha=8, target_modules="all-linear")
    assert lean_lora_forward(gpt2) == 0  # Conv1D bases hold W transposed: peft's forward
