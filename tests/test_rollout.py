"""Generation and log-probabilities: left padding, exact sampling, masks from positions."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from p3o.models.loading import load_causal_lm
from p3o.rl.rollout import (
    generation_config,
    pad_prompts,
    sample_responses,
    token_logprobs,
)
from p3o.utils.ops import (
    first_true_indices,
    masked_mean,
    response_mask_from_eos,
    selective_log_softmax,
)

PROMPTS = ["story : big cat sees the dog .", "dog", "quick sad goat likes the fish and the cow ."]


def tokenize_prompts(tokenizer, texts, max_length):
    return pad_prompts(tokenizer, [tokenizer(t)["input_ids"] for t in texts], max_length)


def sampling(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0):
    return SimpleNamespace(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_logprobs_match_the_sampler_under_left_padding(assets, tokenizer, arch):
    model = load_causal_lm(str(assets[arch]))
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    assert (mask[:, 0] == 0).any() and mask[:, -1].all()  # left padding
    config = generation_config(sampling(temperature=0.7), tokenizer, [tokenizer.eos_token_id])
    config.output_logits, config.return_dict_in_generate = True, True
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    response = out.sequences[:, ids.shape[1]:]
    response_mask = response_mask_from_eos(response, [tokenizer.eos_token_id])
    sampler = torch.log_softmax(torch.stack(out.logits, 1) / 0.7, -1).gather(-1, response[..., None])[..., 0]
    forward = token_logprobs(model, ids, mask, response, response_mask, temperature=0.7)
    assert torch.allclose(forward, sampler * response_mask, atol=1e-5)
    # keeping only the response logits changes nothing
    full = token_logprobs(model, ids, mask, response, response_mask, temperature=0.7, logits_to_keep=False)
    assert torch.allclose(forward, full, atol=1e-6)


def test_sampling_ignores_processors_in_the_models_generation_config(assets, tokenizer):
    """A hub model's generation_config (top-k, bad words, repetition penalty ...) must not bend sampling."""
    model = load_causal_lm(str(assets["llama"]))
    model.generation_config.top_k = 2
    model.generation_config.bad_words_ids = [[tokenizer.convert_tokens_to_ids("cat")]]
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    ids, mask = tokenize_prompts(tokenizer, ["dog"] * 600, 64)
    torch.manual_seed(0)
    response, _ = sample_responses(model, ids, mask, generation_config(sampling(max_new_tokens=1), tokenizer,
                                                                     [tokenizer.eos_token_id]), [tokenizer.eos_token_id])
    assert response[:, 0].unique().numel() > 20  # top-k 2 would allow only 2 distinct tokens
    assert model.generation_config.top_k == 2  # the model's own config is restored


def test_top_k_when_asked(assets, tokenizer):
    model = load_causal_lm(str(assets["llama"]))
    ids, mask = tokenize_prompts(tokenizer, ["dog"] * 200, 64)
    response, _ = sample_responses(model, ids, mask, generation_config(sampling(max_new_tokens=1, top_k=3), tokenizer,
                                                                     [tokenizer.eos_token_id]), [tokenizer.eos_token_id])
    assert response[:, 0].unique().numel() <= 3


def test_response_mask_comes_from_the_first_eos_even_when_pad_equals_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, eos, eos],  # pad == eos after the end
                        [eos, 7, 8, 9, 9],  # a response that is only EOS
                        [5, 6, 7, 8, 9],  # no EOS: runs to max_new_tokens
                        [5, 0, 6, eos, 0]])  # a pad id (0) inside the response stays real
    mask = response_mask_from_eos(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert response_mask_from_eos(ids, [eos, 9])[2].tolist() == [1, 1, 1, 1, 1]
    assert response_mask_from_eos(ids, [eos, 7])[2].tolist() == [1, 1, 1, 0, 0]
    assert response_mask_from_eos(ids, []).all()  # a tokenizer without EOS


def test_prompts_longer_than_the_limit_keep_their_last_tokens_and_bos(tokenizer):
    long = " ".join(["cat"] * 20) + " dog"
    ids, mask = tokenize_prompts(tokenizer, [long, "dog"], 5)
    assert ids.shape == (2, 5)
    assert ids[0, -1] == tokenizer.convert_tokens_to_ids("dog")
    assert mask[1].tolist() == [0, 0, 0, 0, 1]
    bos = tokenizer.bos_token_id
    ids, _ = pad_prompts(tokenizer, [[bos, 5, 6, 7, 8, 9], [bos, 5]], 4)
    assert ids.tolist() == [[bos, 7, 8, 9], [tokenizer.pad_token_id] * 2 + [bos, 5]]


def test_small_ops_against_naive_versions():
    flags = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0]]).bool()
    naive = [next((t for t in range(3) if row[t]), 3) for row in flags.tolist()]
    assert first_true_indices(flags).tolist() == naive
    logits = torch.randn(2, 4, 11)
    index = torch.randint(0, 11, (2, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]
    assert torch.allclose(selective_log_softmax(logits, index), expected, atol=1e-6)
    values = torch.tensor([[1.0, float("inf")], [3.0, 5.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(values, mask).item() == 3.0  # inf on padding does not leak
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not NaN


def test_which_ids_end_a_response(tokenizer):
    from p3o.errors import UsageError
    from p3o.models.loading import eos_token_ids
    from p3o.models.tiny import build_tiny_model, build_word_tokenizer

    model = build_tiny_model(tokenizer, "llama", num_layers=1, hidden_size=16, num_heads=2)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("cat"), tokenizer.bos_token_id]
    # the tokenizer's EOS, plus config ids that are special tokens (a chat model's end of turn); an
    # ordinary word left in a default config never ends a response
    assert eos_token_ids(tokenizer, model) == sorted([tokenizer.eos_token_id, tokenizer.bos_token_id])
    no_eos = build_word_tokenizer(["cat", "dog"])
    no_eos.eos_token = None
    no_eos.chat_template = None
    model.generation_config.eos_token_id = no_eos.convert_tokens_to_ids("cat")
    with pytest.raises(UsageError, match="has no EOS token and no chat template that ends a turn"):
        eos_token_ids(no_eos, model)  # responses could never end: refused in one line


def test_a_tokenizer_with_no_special_tokens_still_pads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from p3o.models.loading import load_tokenizer

    core = Tokenizer(models.WordLevel(vocab={"cat": 0, "dog": 1}, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token_id == 0 and tokenizer.padding_side == "left"
    ids, mask = tokenize_prompts(tokenizer, ["cat dog", "dog"], 8)
    assert mask.tolist() == [[1, 1], [0, 1]]


def test_completions_keep_the_space_that_separates_them_from_the_prompt(tokenizer):
    from p3o.rl.rollout import decode_completions

    ids, mask = tokenize_prompts(tokenizer, ["story : big cat", "dog"], 8)
    response = torch.tensor([[tokenizer.convert_tokens_to_ids("runs"), tokenizer.eos_token_id, 0],
                             [tokenizer.convert_tokens_to_ids("sees"), tokenizer.convert_tokens_to_ids("the"), 9]])
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # a word tokenizer joins words with spaces: the completion continues the prompt after a space
    assert decode_completions(tokenizer, ids, mask, response, response_mask) == [" runs", " sees the"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_preallocated_kv_cache_samples_what_the_concatenating_one_does(assets, tokenizer, arch):
    from p3o.rl.kv_cache import PreallocatedLayer, preallocated_cache

    model = load_causal_lm(str(assets[arch]))
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    config = generation_config(sampling(max_new_tokens=12), tokenizer, [tokenizer.eos_token_id])
    config.output_logits, config.return_dict_in_generate = True, True
    runs = []
    for cache in (None, preallocated_cache(model, ids.shape[1] + 12)):
        torch.manual_seed(3)
        runs.append(model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                   **({"past_key_values": cache} if cache is not None else {})))
    plain, preallocated = runs
    assert torch.equal(plain.sequences, preallocated.sequences)
    for a, b in zip(plain.logits, preallocated.logits):
        assert torch.allclose(a, b, atol=1e-6)
    layer = preallocated.past_key_values.layers[0]
    assert isinstance(layer, PreallocatedLayer) and layer.keys.data_ptr() == layer.key_buffer.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_under_bf16_autocast_the_preallocated_cache_holds_bf16_and_attention_sees_the_same_numbers(
        assets, tokenizer, arch):
    """Rotary embeddings leave keys in float32 and attention casts them to bf16 at every token: the
    cache stores that bf16 once, so the logits are the concatenating cache's bit for bit."""
    from p3o.rl.kv_cache import preallocated_cache

    model = load_causal_lm(str(assets[arch]))
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)
    config = generation_config(sampling(max_new_tokens=12), tokenizer, [tokenizer.eos_token_id])
    config.output_logits, config.return_dict_in_generate = True, True
    runs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for cache in (None, preallocated_cache(model, ids.shape[1] + 12)):
            torch.manual_seed(3)
            runs.append(model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                       **({"past_key_values": cache} if cache is not None else {})))
    plain, preallocated = runs
    assert torch.equal(plain.sequences, preallocated.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, preallocated.logits))
    layer = preallocated.past_key_values.layers[0]
    assert layer.key_buffer.dtype == layer.value_buffer.dtype == torch.bfloat16
    if arch == "llama":  # the concatenating cache held the rotated keys in float32
        assert plain.past_key_values.layers[0].keys.dtype == torch.float32


def test_the_preallocated_kv_cache_falls_back_to_concatenation_beyond_its_buffers():
    from p3o.rl.kv_cache import PreallocatedLayer

    layer, chunks = PreallocatedLayer(capacity=4), [torch.randn(2, 3, n, 5) for n in (3, 1, 2)]
    for i, chunk in enumerate(chunks):
        keys, values = layer.update(chunk, -chunk)
        expected = torch.cat(chunks[:i + 1], dim=-2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
    layer, (first, second) = PreallocatedLayer(capacity=8), chunks[:2]
    layer.update(first, first)
    layer.batch_select_indices(torch.tensor([1]))  # replaces the views: the buffers no longer hold the cache
    keys, _ = layer.update(second[1:], second[1:])
    assert torch.equal(keys, torch.cat([first[1:], second[1:]], dim=-2))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_groups_sharing_their_prompt_give_the_same_logprobs_and_gradients(assets, tokenizer, arch, attention, k):
    from transformers import AutoModelForCausalLM

    from p3o.rl.rollout import group_token_logprobs

    model = AutoModelForCausalLM.from_pretrained(str(assets[arch]), attn_implementation=attention)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64)  # left-padded prompts of different lengths
    ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # (3k, Lq): three groups
    B = len(ids)
    torch.manual_seed(0)
    response = torch.randint(5, len(tokenizer), (B, 7))
    lengths = torch.tensor([7, 3, 5, 7, 1, 6, 2, 7, 4])[:B]  # ragged
    response_mask = (torch.arange(7)[None] < lengths[:, None]).long()
    grads = []
    for fn in (token_logprobs, lambda *args: group_token_logprobs(*args, k=k)):
        model.zero_grad()
        logps = fn(model, ids, mask, response, response_mask, 0.8)
        (logps * torch.linspace(1, 2, B)[:, None]).sum().backward()  # weights differ between a group's rows
        grads.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grad), (grouped, grouped_grad) = grads
    assert torch.allclose(plain, grouped, atol=1e-5) and not grouped[response_mask == 0].any()
    assert plain_grad.keys() == grouped_grad.keys()
    for name in plain_grad:
        assert torch.allclose(plain_grad[name], grouped_grad[name], atol=1e-5, rtol=1e-4), name


def test_a_group_shares_its_prompt_only_where_that_is_cheaper():
    """Widths W/h of the benchmark's 1M and 10M Llamas and of SmolLM2-135M, and padded lengths
    where packing was measured faster or slower (`worth_sharing_prompts`'s docstring)."""
    from p3o.rl.rollout import worth_sharing_prompts

    width_1m, width_10m, width_smollm2 = 1282, 3202, 6146
    assert worth_sharing_prompts(4, 16, 32, width_1m)  # GRPO on the 1M model: 1.23x packed
    assert worth_sharing_prompts(4, 48, 48, width_1m)  # a longer prompt saves more: 1.44x
    assert not worth_sharing_prompts(4, 16, 96, width_1m)  # 0.87x: the packed square grows faster
    assert not worth_sharing_prompts(4, 16, 96, width_10m)  # 0.95x
    assert not worth_sharing_prompts(4, 16, 160, width_10m)  # 0.82x
    assert worth_sharing_prompts(4, 38, 32, width_smollm2)  # SmolLM2's chat prompts: 166 tokens for 280
    assert worth_sharing_prompts(2, 16, 32, width_1m)  # pairs, as the benchmark's RLOO runs them
    assert not worth_sharing_prompts(2, 1, 2048, width_smollm2)  # a one-token prompt saves nothing
    assert not worth_sharing_prompts(1, 38, 32, width_smollm2)
    assert not worth_sharing_prompts(4, 38, 32, 0.0)  # a model whose layout is unknown


def test_layer_width_counts_a_layers_weights_per_hidden_unit(assets):
    """The tiny Llama's W/h, against its config counted by hand: q and o (h x heads*head_dim each),
    k and v (h x kv_heads*head_dim), the gated MLP (3 h x ff), two norms, and the final norm spread
    over the layers; the embedding and head not counted."""
    from p3o.rl.rollout import layer_width

    model = load_causal_lm(str(assets["llama"]))
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = (2 * c.hidden_size * c.num_attention_heads * head_dim + 2 * c.hidden_size * c.num_key_value_heads
                 * head_dim + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
    expected = (per_layer + c.hidden_size / c.num_hidden_layers) / c.hidden_size
    assert not c.attention_bias and not c.mlp_bias
    assert layer_width(model) == pytest.approx(expected, rel=1e-12)


def test_the_engine_shares_prompts_within_each_group_of_responses(assets, tmp_path):
    from conftest import train_config

    from p3o.rl.train import build_trainer

    expected = {"p3o-v2": 2, "rloo": 2, "grpo": 4, "ppo": 1, "remax": 1}  # PPO's value head reads every position
    for algo, group in expected.items():
        assert build_trainer(train_config(assets, tmp_path, algo=algo)).prompt_group == group, algo


def test_grpos_packed_groups_of_four_give_the_rollouts_logprobs_unpacked(assets, tmp_path):
    """The engine's reference and old passes over GRPO groups (k = 4) packed, against each response
    run as its own sequence."""
    from conftest import train_config

    from p3o.rl.rollout import batched_logprobs_and_values
    from p3o.rl.train import build_trainer

    trainer = build_trainer(train_config(assets, tmp_path, algo="grpo", max_steps=1))
    assert trainer.prompt_group == 4
    rollout, _, _ = trainer.collect_rollout(0)
    assert trainer.packed_group(rollout) == 4  # packing pays at these lengths: the packed pass ran
    unpacked = batched_logprobs_and_values(trainer.ref_policy, rollout, 1.0, 8, prompt_group=1)[0]
    assert torch.allclose(rollout.ref_token_logp, unpacked, atol=1e-5)
    assert rollout.response_mask.sum(-1).min() < rollout.response_mask.shape[1]  # ragged: some responses end early


def tiny(config_class, model_class, **kw):
    config = config_class(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, **kw)
    return model_class(config)


def test_pairs_share_a_prompt_only_where_one_packed_sequence_is_exact():
    from transformers import (
        MambaConfig,
        MambaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from p3o.rl.rollout import group_token_logprobs, shares_prompt_forward

    windowed = tiny(MistralConfig, MistralForCausalLM, sliding_window=4)  # y1 would leak into y2's window
    assert not shares_prompt_forward(windowed)
    assert shares_prompt_forward(tiny(MistralConfig, MistralForCausalLM, sliding_window=None))
    assert shares_prompt_forward(tiny(Qwen2Config, Qwen2ForCausalLM))  # its window is off by default
    assert not shares_prompt_forward(MambaForCausalLM(MambaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2)))

    class Wrapped(torch.nn.Module):  # as DistributedDataParallel holds the model: as `.module`, no `.config`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    model = tiny(Qwen2Config, Qwen2ForCausalLM)
    ids = torch.randint(3, 60, (4, 5))
    ids[1], ids[3] = ids[0], ids[2]  # two pairs
    mask, response = torch.ones_like(ids), torch.randint(3, 60, (4, 6))
    response_mask = torch.ones_like(response)
    assert shares_prompt_forward(Wrapped(model))
    assert torch.allclose(group_token_logprobs(Wrapped(model), ids, mask, response, response_mask),
                          token_logprobs(model, ids, mask, response, response_mask), atol=1e-5)


@pytest.mark.parametrize("alibi", [False, True], ids=["rotary", "alibi"])
def test_falcon_packs_pairs_only_without_alibi_and_trains_either_way(assets, tokenizer, tmp_path, alibi):
    """ALiBi biases follow the mask's token count, not the positions given, so one packed sequence
    cannot be exact: Falcon's position scheme decides, not its name (the packed forward crashed)."""
    from conftest import train_config
    from transformers import FalconConfig, FalconForCausalLM

    from p3o.rl.rollout import group_token_logprobs, shares_prompt_forward
    from p3o.rl.train import build_trainer

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          alibi=alibi, new_decoder_architecture=False, multi_query=True, bias=False,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    model = FalconForCausalLM(config).eval()
    assert shares_prompt_forward(model) is not alibi
    if not alibi:
        ids, mask = tokenize_prompts(tokenizer, PROMPTS[:2], 64)
        ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)  # two pairs
        response = torch.randint(5, len(tokenizer), (4, 5))
        response_mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4, 5])[:, None]).long()
        assert torch.allclose(group_token_logprobs(model, ids, mask, response, response_mask),
                              token_logprobs(model, ids, mask, response, response_mask), atol=1e-5)
    model.save_pretrained(tmp_path / "falcon")
    tokenizer.save_pretrained(tmp_path / "falcon")
    trainer = build_trainer(train_config(assets, tmp_path, model_name_or_path=str(tmp_path / "falcon"), max_steps=1))
    assert (trainer.prompt_group == 2) is not alibi
    trainer.train()


def test_models_with_a_cache_of_their_own_sample_with_it():
    from transformers import MambaConfig, MambaForCausalLM

    from p3o.rl.kv_cache import preallocated_cache

    model = MambaForCausalLM(MambaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2))
    assert preallocated_cache(model, 12) is None
    ids = torch.randint(3, 60, (2, 4))
    config = generation_config(sampling(max_new_tokens=5), SimpleNamespace(pad_token_id=0), [1])
    response, _ = sample_responses(model, ids, torch.ones_like(ids), config, [1])
    assert response.shape[0] == 2 and 1 <= response.shape[1] <= 5


def test_a_sliding_window_wider_than_the_packed_pair_keeps_packing_exact():
    """Phi-3 ships sliding_window 2047: a pair packed into fewer tokens never reaches the window."""
    from transformers import MistralConfig, MistralForCausalLM

    from p3o.rl.rollout import group_token_logprobs, shares_prompt_forward

    model = tiny(MistralConfig, MistralForCausalLM, sliding_window=17)  # exactly the packed length: the edge
    ids = torch.randint(3, 60, (4, 5))
    ids[1], ids[3] = ids[0], ids[2]
    mask, response = torch.ones_like(ids), torch.randint(3, 60, (4, 6))
    response_mask = torch.ones_like(response)
    assert shares_prompt_forward(model, 5 + 2 * 6) and not shares_prompt_forward(model, 18) \
        and not shares_prompt_forward(model)
    assert torch.allclose(group_token_logprobs(model, ids, mask, response, response_mask),
                          token_logprobs(model, ids, mask, response, response_mask), atol=1e-5)


@pytest.mark.parametrize("config, fields, context", [
    ("MptConfig", {"max_seq_len": 256}, 256), ("GPT2Config", {"n_positions": 300}, 300),
    ("LlamaConfig", {"max_position_embeddings": 320}, 320), ("PretrainedConfig", {"seq_length": 200}, 200),
    ("PretrainedConfig", {"n_ctx": 180}, 180), ("BloomConfig", {}, None)])
def test_the_context_is_read_under_each_family_s_name_and_prompts_are_cut_to_it(config, fields, context):
    """MPT says max_seq_len, Qwen-1 and ChatGLM seq_length, old GPT-2 configs n_ctx: read as the context,
    long prompts are cut to fit it instead of crashing the forward (BLOOM's ALiBi has no limit)."""
    import transformers

    from p3o.errors import UsageError
    from p3o.rl.rollout import prompt_budget

    cfg = getattr(transformers, config)(**fields)
    assert prompt_budget(cfg, max_new_tokens=16) == (context - 16 if context else 1024)
    if context:
        with pytest.raises(UsageError, match=f"context of {context} tokens"):
            prompt_budget(cfg, max_new_tokens=context)
