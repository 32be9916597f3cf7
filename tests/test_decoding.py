"""p3o's own decoding loop (`p3o.rl.decoding`, `--decoding_loop p3o`): for Llama-style models it
samples exactly what `generate` samples (the same tokens for a fixed seed, EOS and padding alike),
its forward computes the model's logits, and every model or option it does not serve goes to
`generate`."""
from __future__ import annotations

import pytest
import torch
from conftest import train_config
from test_rollout import PROMPTS, sampling, tokenize_prompts

from p3o.models.lora import add_lora, hold_frozen_base_in
from p3o.rl.decoding import fast_decoder
from p3o.rl.rollout import generation_config, sample_responses
from p3o.rl.sampling import as_inverse_cdf


def tiny(tokenizer, arch: str, seed: int = 0):
    """A tiny random Llama-style model in eval mode, biases (where it has them) not zero."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    size = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    config = {"llama": lambda: LlamaConfig(**size),  # grouped-query attention: 2 query heads per key-value head
              "llama-bias": lambda: LlamaConfig(attention_bias=True, mlp_bias=True, **size),
              "qwen2": lambda: Qwen2Config(**size)}[arch]()  # biases on q, k and v
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def with_adapters(model):
    model = add_lora(model, r=4, alpha=8, target_modules="all-linear")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


def prompts(tokenizer):
    """Pairs of rows sharing a prompt (run once by the loop), one prompt alone, left padding."""
    ids, mask = tokenize_prompts(tokenizer, [p for p in PROMPTS for _ in range(2)] + ["the cow"], 64)
    assert (mask[:, 0] == 0).any()
    return ids, mask


def both_loops(model, ids, mask, config, eos, seed=3):
    out = {}
    for loop in ("transformers", "p3o"):
        torch.manual_seed(seed)
        out[loop] = sample_responses(model, ids, mask, config, eos, loop=loop)
    return out["transformers"], out["p3o"]


def served(model, config) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return fast_decoder(base, as_inverse_cdf(config)[0]) is not None


@pytest.mark.parametrize("arch", ["llama", "llama-bias", "qwen2"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("warp", [dict(), dict(temperature=0.7, top_k=8, top_p=0.9), "greedy"])
def test_the_loop_samples_generates_tokens_for_a_fixed_seed(tokenizer, arch, lora, warp):
    model = tiny(tokenizer, arch)
    model = with_adapters(model) if lora else model
    ids, mask = prompts(tokenizer)
    eos = [tokenizer.eos_token_id]
    config = generation_config(sampling(max_new_tokens=8, **(warp if isinstance(warp, dict) else {})), tokenizer,
                               eos, greedy=warp == "greedy")
    assert served(model, config)
    (theirs, their_mask), (ours, our_mask) = both_loops(model, ids, mask, config, eos)
    assert torch.equal(ours, theirs) and torch.equal(our_mask, their_mask)
    if warp != "greedy":  # the tokens are drawn, not fixed: another seed draws others
        torch.manual_seed(4)
        assert not torch.equal(sample_responses(model, ids, mask, config, eos)[0], ours)


def test_eos_ends_a_row_and_later_positions_hold_the_pad_token(tokenizer):
    model = tiny(tokenizer, "llama")
    ids, mask = prompts(tokenizer)
    greedy = generation_config(sampling(max_new_tokens=8), tokenizer, [tokenizer.eos_token_id], greedy=True)
    tokens = sample_responses(model, ids, mask, greedy, [tokenizer.eos_token_id])[0]
    stop = int(tokens[0, 2])  # a token the first row says third: as an EOS it ends that row there
    config = generation_config(sampling(max_new_tokens=8), tokenizer, [stop], greedy=True)
    (theirs, their_mask), (ours, our_mask) = both_loops(model, ids, mask, config, [stop])
    assert torch.equal(ours, theirs) and torch.equal(our_mask, their_mask)
    assert our_mask[0].sum() <= 3 and (ours[0, int(our_mask[0].sum()):] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_padding_the_loop_calls_attention_as_transformers_does(tokenizer, dtype):
    """Prompts of one length: `transformers` passes attention no mask (the causal flag, SDPA's
    own grouped heads), and so does the loop."""
    model = tiny(tokenizer, "llama")
    ids, mask = tokenize_prompts(tokenizer, ["the cow", "the cow", "big cat", "big cat"], 64)
    assert mask.all()
    config = generation_config(sampling(max_new_tokens=8), tokenizer, [tokenizer.eos_token_id])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        (theirs, _), (ours, _) = both_loops(model, ids, mask, config, [tokenizer.eos_token_id])
    assert torch.equal(ours, theirs)


def test_right_padded_prompts_and_eager_attention_go_to_generate(tokenizer, monkeypatch):
    import p3o.rl.decoding as decoding

    model = tiny(tokenizer, "llama")
    config = generation_config(sampling(max_new_tokens=4), tokenizer, [tokenizer.eos_token_id])
    ids, mask = prompts(tokenizer)
    monkeypatch.setattr(decoding.FastDecoder, "sample", lambda *a, **k: pytest.fail("the loop ran"))
    right_ids, right_mask = ids.flip(1), mask.flip(1)  # the same prompts, padded on the right
    tokens, _ = sample_responses(model, right_ids, right_mask, config, [tokenizer.eos_token_id])
    assert tokens.shape[0] == ids.shape[0]
    model.set_attn_implementation("eager")  # it rounds attention differently from sdpa
    assert not served(model, config)


def test_under_bf16_autocast_on_a_bf16_base_the_loop_samples_generates_tokens(tokenizer):
    """--mixed_precision bf16 with LoRA: the frozen base in bf16, the weights prepacked for oneDNN."""
    model = with_adapters(tiny(tokenizer, "llama"))
    hold_frozen_base_in(model, torch.bfloat16)
    ids, mask = prompts(tokenizer)
    config = generation_config(sampling(max_new_tokens=8), tokenizer, [tokenizer.eos_token_id])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert served(model, config)
        (theirs, _), (ours, _) = both_loops(model, ids, mask, config, [tokenizer.eos_token_id])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_loops_forward_computes_the_models_logits(tokenizer, arch):
    """The prompt (all rows) and then one more token, against the model's own forward in float32."""
    model = with_adapters(tiny(tokenizer, arch))
    ids, mask = prompts(tokenizer)
    config = as_inverse_cdf(generation_config(sampling(max_new_tokens=4), tokenizer, [tokenizer.eos_token_id]))[0]
    decoder = fast_decoder(model.get_base_model(), config)
    B, L = ids.shape
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    decoder._empty_cache(B, L + 1, ids.device)
    allowed = (torch.ones(L, L, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]) | torch.eye(L, dtype=torch.bool)
    next_ids = torch.arange(B)[:, None] % 7 + 5  # (B, 1) any tokens
    with torch.no_grad():
        ours = decoder.forward(ids, positions, 0, allowed)  # (B, V)
        allowed_next = torch.cat([mask.bool(), torch.ones(B, 1, dtype=torch.bool)], 1)[:, None, None, :]
        ours_next = decoder.forward(next_ids, positions[:, -1:] + 1, L, allowed_next)
        full_mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
        theirs = model(input_ids=torch.cat([ids, next_ids], 1), attention_mask=full_mask).logits  # (B, L + 1, V)
    assert torch.allclose(ours, theirs[:, -2], atol=2e-5)
    assert torch.allclose(ours_next, theirs[:, -1], atol=2e-5)


def test_models_and_options_it_does_not_serve_go_to_generate(tokenizer, assets):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from p3o.models.loading import load_causal_lm

    eos = [tokenizer.eos_token_id]
    config = generation_config(sampling(max_new_tokens=4), tokenizer, eos)
    plain = as_inverse_cdf(config)[0]
    assert fast_decoder(load_causal_lm(str(assets["gpt2"])), plain) is None  # another architecture
    llama = tiny(tokenizer, "llama")
    assert fast_decoder(llama, plain) is not None
    for option in (dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2), dict(num_beams=2),
                   dict(min_new_tokens=2), dict(suppress_tokens=[5])):
        other = as_inverse_cdf(config)[0]
        for key, value in option.items():
            setattr(other, key, value)
        assert fast_decoder(llama, other) is None, option
    windowed = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                           max_window_layers=0, layer_types=["sliding_attention"] * 2)
    assert fast_decoder(AutoModelForCausalLM.from_config(windowed).eval(), plain) is None
    dora = add_lora(tiny(tokenizer, "llama"), r=4, alpha=8, target_modules="all-linear")
    for module in dora.modules():
        if hasattr(module, "use_dora"):
            module.use_dora = {name: True for name in module.use_dora}
    assert fast_decoder(dora.get_base_model(), plain) is None
    # Sampling a model it does not serve still works, through `generate`
    ids, mask = prompts(tokenizer)
    tokens, token_mask = sample_responses(load_causal_lm(str(assets["gpt2"])), ids, mask, config, eos)
    assert tokens.shape[0] == ids.shape[0] and token_mask.shape == tokens.shape


def test_the_trainer_option_picks_the_loop_and_both_collect_the_same_rollout(assets, tmp_path):
    from p3o.rl.train import build_trainer

    rollouts = {}
    for loop in ("p3o", "transformers"):
        trainer = build_trainer(train_config(assets, tmp_path / loop, max_steps=1, decoding_loop=loop))
        rollouts[loop] = trainer.collect_rollout(0)[0]
    assert torch.equal(rollouts["p3o"].response_ids, rollouts["transformers"].response_ids)
    assert torch.equal(rollouts["p3o"].response_mask, rollouts["transformers"].response_mask)


def test_on_smollm2_in_bf16_the_loop_samples_generates_tokens(smollm2):
    """The real model, its chat template and BPE tokenizer, bf16 weights under bf16 autocast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is the capital of France?", "Name a fruit.", "Say hello.")]
    ids, mask = tokenize_prompts(tokenizer, [t for t in texts for _ in range(2)], 128)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    config = generation_config(sampling(max_new_tokens=12), tokenizer, eos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert served(model, config)
        (theirs, their_mask), (ours, our_mask) = both_loops(model, ids, mask, config, eos)
    assert torch.equal(ours, theirs) and torch.equal(our_mask, their_mask)
