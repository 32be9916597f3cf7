"""p3o's own decoding loop for Llama-style models (`--decoding_loop p3o`, the default on a CPU).

Why: `generate` runs each sampled token through about 60 small operations per layer, each with its
module calls, hooks and per-step bookkeeping. On 2 CPU cores that was about 60% of sampling
SmolLM2-135M: its matmuls took about 20 ms of the 52 ms a token. This loop runs the same arithmetic
with fewer, larger operations and no modules:

* q, k and v are one matmul (their weights concatenated), and gate and up are another. The weights
  are taken once per rollout: LoRA adapters merged, cast to the autocast dtype (as autocast casts
  them at every call), and prepacked for oneDNN where that is bf16 on a CPU.
* Rotary embeddings turn queries and keys in one pass; keys and values are written into buffers
  sized for the whole response.
* A prompt that several rows share (the k responses of a prompt) runs once; its keys and values
  are copied to each row.

The same arithmetic as `transformers`' forward of these models, operation by operation: the
model's own norm modules and rotary embedding, `transformers`' `rotate_half`, attention (SDPA
called as `transformers` calls it: its mask, or none and the causal flag where nothing is padded,
the query heads grouped the same way) and residuals in the same dtypes; only the matmuls' grouping
differs. The tokens are drawn exactly as `generate` draws
them (`InverseCdfSampler`, the same random numbers), EOS ends a row, and later positions hold the
pad token. Tested against `generate`: the same tokens for a fixed seed. One rounding caveat: a
float32 matmul's result can depend on how many rows it has, so running a shared prompt once can
move a float32 logit by about 1e-8 (none in bf16 on the tests); a drawn token then differs only if
its random number falls that close to a boundary. Log-probabilities for training always come from
the training forward.

Served: `transformers`' own Llama and Qwen2 classes (SmolLM, Llama 2 and 3, TinyLlama, Qwen2 and
2.5) with sdpa attention, full attention in every layer, plain or LoRA linear layers, and
left-padded prompts. Anything else (another architecture or remote code, eager attention, sliding
windows, DoRA, quantised layers, beam search, repetition penalties) gets `None` from `fast_decoder`,
and `generate` samples it.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half  # Qwen2's is the same function

MODEL_TYPES = ("llama", "qwen2")  # decoder layers exactly: RMSNorm, rotary GQA attention, SiLU-gated MLP
MODULES = ("transformers.models.llama.", "transformers.models.qwen2.")  # their code, not a remote one
# GenerationConfig options that `generate` turns into logits processors or stopping rules this loop
# does not apply: any of them set (non-default) leaves sampling to `generate`.
UNHANDLED_OPTIONS = ("encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                     "min_length", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                     "forced_eos_token_id", "sequence_bias", "stop_strings", "min_p", "typical_p", "epsilon_cutoff",
                     "eta_cutoff", "exponential_decay_length_penalty", "guidance_scale", "watermarking_config",
                     "renormalize_logits", "remove_invalid_values", "max_time", "prompt_lookup_num_tokens",
                     "assistant_model")


def fast_decoder(model, gen_config) -> "FastDecoder | None":
    """A `FastDecoder` over `model`'s current weights, or None where this loop does not serve it
    (see the module's docstring). Call it inside the autocast context sampling runs under."""
    from p3o.rl.kv_cache import supports_static_cache

    config = getattr(model, "config", None)
    if (getattr(config, "model_type", None) not in MODEL_TYPES or not type(model).__module__.startswith(MODULES)
            or getattr(config, "_attn_implementation", None) != "sdpa"  # eager or flex attention round otherwise
            or os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1" or model.device.type != "cpu"
            or not _plain_sampling(gen_config) or getattr(config, "hidden_act", None) != "silu"
            or getattr(config, "pretraining_tp", 1) != 1
            or (model.training and getattr(config, "attention_dropout", 0.0))
            or not supports_static_cache(model)):  # every layer full attention (no sliding window)
        return None
    inner = getattr(model, "model", None)
    if (type(getattr(inner, "embed_tokens", None)) is not torch.nn.Embedding or not _is_rms_norm(inner.norm)
            or not hasattr(inner, "rotary_emb")):
        return None
    dtype = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
             else inner.embed_tokens.weight.dtype)  # what every matmul computes in
    head = _linear(model.get_output_embeddings(), dtype)
    layers = [_layer(layer, dtype) for layer in inner.layers]
    if head is None or any(layer is None for layer in layers):
        return None
    return FastDecoder(config, inner.embed_tokens.weight, inner.rotary_emb, layers, inner.norm, head)


class FastDecoder:
    """The model's forward, lean, over its own KV cache; `sample` is `generate`'s sampling loop."""

    def __init__(self, config, embedding, rotary, layers, norm, head):
        self.embedding, self.rotary, self.layers, self.norm, self.head = embedding, rotary, layers, norm, head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def sample(self, query_ids: torch.Tensor, query_mask: torch.Tensor, gen_config, sampler=None) -> torch.Tensor:
        """(B, Lq) left-padded prompts -> response ids (B, T), T <= max_new_tokens, as `generate`
        returns them after the prompt: pad after a row's EOS, and no column after every row ended.
        `sampler`: an `InverseCdfSampler` (sampling); None: greedy."""
        B, Lq = query_ids.shape
        T = gen_config.max_new_tokens
        mask = query_mask.bool()
        # Each distinct prompt runs once: (U, Lq) ids and mask; `inverse` maps the B rows to them.
        distinct, inverse = torch.unique(torch.cat([query_ids, query_mask.long()], 1), dim=0, return_inverse=True)
        distinct_ids, distinct_mask = distinct[:, :Lq], distinct[:, Lq:].bool()
        self._empty_cache(len(distinct), Lq + T, query_ids.device)
        # Without padding `transformers` passes attention no mask (SDPA's causal flag instead), and
        # so does this loop: None. With padding, a padding query attends to itself only, so no row
        # of the mask is empty (nothing real reads it).
        padded = not bool(mask.all())
        causal = torch.ones(Lq, Lq, dtype=torch.bool, device=mask.device).tril()  # (Lq, Lq)
        allowed = ((causal & distinct_mask[:, None, None, :]) | torch.eye(Lq, dtype=torch.bool, device=mask.device)
                   if padded else None)  # (U, 1, Lq, Lq)
        logits = self.forward(distinct_ids, _positions(distinct_mask), 0, allowed)[inverse]  # (B, V)
        self.cache = [(keys[inverse], values[inverse]) for keys, values in self.cache]  # (B, Hkv, Lq + T, hd)

        eos = torch.tensor(_as_list(gen_config.eos_token_id), dtype=torch.long, device=query_ids.device)
        pad = gen_config.pad_token_id if gen_config.pad_token_id is not None else (eos[0].item() if len(eos) else 0)
        allowed = torch.zeros(B, 1, 1, Lq + T, dtype=torch.bool, device=mask.device)
        allowed[:, 0, 0, :Lq] = mask
        position = _positions(mask)[:, -1:]  # (B, 1): the last prompt token's
        unfinished = torch.ones(B, dtype=torch.bool, device=query_ids.device)
        tokens = []
        for t in range(T):
            scores = logits.float()  # (B, V), as `generate` takes them
            token = sampler.next_tokens(scores) if sampler is not None else scores.argmax(-1, keepdim=True)  # (B, 1)
            token = torch.where(unfinished[:, None], token, pad)
            tokens.append(token)
            unfinished &= ~torch.isin(token[:, 0], eos)
            if t == T - 1 or not unfinished.any():
                break
            allowed[:, 0, 0, Lq + t] = True
            position = position + 1
            logits = self.forward(token, position, Lq + t, allowed[..., : Lq + t + 1] if padded else None)
        self.cache = []
        return torch.cat(tokens, dim=1)  # (B, T)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int,
                allowed: torch.Tensor | None) -> torch.Tensor:
        """ids, positions (B, S) at cache positions start .. start+S-1; allowed (B, 1, S, start+S), or
        None for causal attention over every position -> the last position's logits (B, V). Writes
        the S positions' keys and values."""
        h = F.embedding(ids, self.embedding)  # (B, S, D)
        cos, sin = self.rotary(h, positions)  # (B, S, hd) each
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, hd): one rotation for every head
        for layer, (keys, values) in zip(self.layers, self.cache):
            h = layer(h, cos, sin, keys, values, start, allowed)
        return self.head(self.norm(h[:, -1]))  # (B, V)

    def _empty_cache(self, rows: int, capacity: int, device) -> None:
        from p3o.rl.kv_cache import storage_dtype

        dtype = storage_dtype(torch.empty(0, dtype=self.embedding.dtype, device=device))
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        self.cache = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                      for _ in self.layers]


class _Layer:
    """One decoder layer: x + attention(norm(x)), then x + mlp(norm(x)); the norms are the model's."""

    def __init__(self, norms, qkv, out, gate_up, down, heads: int, kv_heads: int, head_dim: int, scaling: float):
        self.norm1, self.norm2 = norms
        self.qkv, self.out, self.gate_up, self.down = qkv, out, gate_up, down
        self.heads, self.kv_heads, self.head_dim, self.scaling = heads, kv_heads, head_dim, scaling

    def __call__(self, h, cos, sin, keys, values, start: int, allowed):
        B, S, _ = h.shape
        H, Hkv, hd = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(self.norm1(h))  # (B, S, (H + 2 Hkv) hd)
        qk = qkv[..., : (H + Hkv) * hd].view(B, S, H + Hkv, hd)
        qk = qk * cos + rotate_half(qk) * sin  # queries' and keys' rotary embeddings at once
        end = start + S
        keys[:, :, start:end] = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, S, hd)
        values[:, :, start:end] = qkv[..., (H + Hkv) * hd:].view(B, S, Hkv, hd).transpose(1, 2)
        attended = _attention(qk[:, :, :H].transpose(1, 2), keys[:, :, :end], values[:, :, :end], allowed,
                              self.scaling)
        h = h + self.out(attended)  # (B, S, D)
        gate, up = self.gate_up(self.norm2(h)).chunk(2, dim=-1)  # (B, S, I) each
        return h + self.down(F.silu(gate) * up)


class _Linear:
    """x W^T + b with W taken once: in the compute dtype, prepacked for oneDNN where bf16 on a CPU
    (the same numbers as the plain matmul; `p3o.models.sampling_weights`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        from p3o.models.sampling_weights import packable

        self.packed = packable(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16) if self.packed else weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _layer(layer, dtype: torch.dtype) -> _Layer | None:
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if (attention is None or mlp is None or not all(hasattr(attention, n) for n in names)
            or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            or not (_is_rms_norm(layer.input_layernorm) and _is_rms_norm(layer.post_attention_layernorm))
            or set(attention._modules) != set(names)):  # nothing else inside (Qwen3's q/k norms, ...)
        return None
    head_dim, scaling, config = (getattr(attention, name, None) for name in ("head_dim", "scaling", "config"))
    if head_dim is None or config is None or scaling is None or abs(scaling - head_dim ** -0.5) > 1e-12:
        return None
    qkv = _fused([attention.q_proj, attention.k_proj, attention.v_proj], dtype)
    gate_up = _fused([mlp.gate_proj, mlp.up_proj], dtype)
    out, down = _linear(attention.o_proj, dtype), _linear(mlp.down_proj, dtype)
    if None in (qkv, gate_up, out, down):
        return None
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    return _Layer(norms, qkv, out, gate_up, down, config.num_attention_heads, config.num_key_value_heads, head_dim,
                  scaling)


def _weight_and_bias(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The (out, in) weight and bias `module` computes with: a plain Linear's own, a LoRA layer's
    with its adapters merged (or its base's, adapters off); None for anything else."""
    from p3o.models.sampling_weights import merged_weight, plain_linear

    if type(module) is torch.nn.Linear and plain_linear(module):
        return module.weight, module.bias
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    if not isinstance(module, LoraLayer) or type(module.get_base_layer()) is not torch.nn.Linear or module.merged:
        return None
    base = module.get_base_layer()
    if not plain_linear(base):
        return None
    if module.disable_adapters or not any(a in module.lora_A for a in module.active_adapters):
        return base.weight, base.bias
    weight = merged_weight(module)
    return None if weight is None else (weight, base.bias)


def _fused(modules, dtype) -> _Linear | None:
    """One `_Linear` computing `modules` side by side (their outputs concatenated)."""
    parts = [_weight_and_bias(m) for m in modules]
    if any(p is None for p in parts):
        return None
    weights = [w.to(dtype) for w, _ in parts]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # (sum of outs, in)
    biases = [b for _, b in parts]
    if all(b is None for b in biases):
        return _Linear(weight, None)
    if any(b is None for b in biases):
        return None
    return _Linear(weight, torch.cat([b.to(dtype) for b in biases]))


def _linear(module, dtype) -> _Linear | None:
    return None if module is None else _fused([module], dtype)


def _is_rms_norm(module) -> bool:
    return type(module).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Left-padded (B, L) mask -> position ids (B, L), numbered as `generate` numbers them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    """q (B, H, S, hd), keys and values (B, Hkv, L, hd), allowed (B, 1, S, L) or None (causal, no
    padding) -> (B, S, H hd). SDPA called as `transformers`' sdpa attention calls it."""
    B, H, S, hd = q.shape
    groups = H // keys.shape[1]
    if allowed is None:  # no mask: the causal flag for a prompt, and SDPA's own grouped heads
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=S > 1, scale=scale, enable_gqa=groups > 1)
        return out.transpose(1, 2).reshape(B, S, H * hd)
    if S == 1:  # one query: each key-value head's query heads as its queries (`transformers`' pack_gqa)
        out = F.scaled_dot_product_attention(q.reshape(B, H // groups, groups, hd), keys, values, attn_mask=allowed,
                                             scale=scale)
        return out.reshape(B, 1, H * hd)
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)  # (B, H, S, hd)
    return out.transpose(1, 2).reshape(B, S, H * hd)


def _plain_sampling(gen_config) -> bool:
    """Whether `generate` would apply nothing to this (greedy, after `as_inverse_cdf`) config that
    this loop leaves out."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    return (not gen_config.do_sample and (gen_config.num_beams or 1) == 1 and gen_config.max_new_tokens is not None
            and (gen_config.num_return_sequences or 1) == 1 and gen_config.use_cache
            and all(getattr(gen_config, name, None) in (getattr(default, name, None), None)
                    for name in UNHANDLED_OPTIONS)
            and gen_config.repetition_penalty in (None, 1.0) and not gen_config.min_new_tokens)


def _as_list(ids) -> list[int]:
    return [] if ids is None else [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
