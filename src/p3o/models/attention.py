"""Attention's backward pass in float32 under CPU bf16 autocast.

CPU autocast runs `scaled_dot_product_attention` in bf16, and PyTorch's CPU flash-attention
backward is slow in bf16: on this project's CPU (torch 2.13) it took 37% of SmolLM2-135M's LoRA
update, about three times the cost of recomputing the attention in float32 and taking its float32
backward. With `--mixed_precision bf16` on a CPU, p3o's wrapper of `transformers`' sdpa attention
does exactly that for forwards that record a gradient: the forward is autocast's own (the same
values: log-probabilities, ratios, KLs and samples do not change), and the backward takes the
gradient of the same attention in float32. Gradient checkpointing recomputes through the same
wrapper. It is installed for the process (`transformers`' attention table is global) and acts only
on CPU tensors under CPU autocast with gradients on.

The float32 gradient is written out (`_float32_grads`: the softmax's probabilities, then the
four matmuls of attention's backward, each key-value head's query heads together so that keys and
values are never repeated) where the call is plain attention: no dropout, a boolean mask shared by
the heads (as `transformers` builds for sdpa) or none, and sequences of at most 160 tokens. Against SDPA's
float32 flash kernel run forward and backward again, with SmolLM2's 9 query and 3 key-value heads
on this project's 2-core CPU (medians of 15 alternated calls): 5.7 against 9.8 ms at its update's
shapes (8 sequences of 102 tokens), 1.44x faster at 128 tokens, 1.31x at 160, but 0.94x at 192 and
0.89x at 256 (about 0.5x at 1024), where the kernel, which never holds the (L, L) probabilities,
wins; longer sequences keep it. The same float32 gradients (about 2e-7 apart, relative to a float64
reference). Anything else is recomputed through SDPA in float32 as before.
"""
from __future__ import annotations

import torch


def float32_attention_backward_on_cpu() -> None:
    """Install the wrapper around `transformers`' sdpa attention (once per process)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(sdpa, "p3o_float32_backward", False):
        return

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not (torch.is_grad_enabled() and query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and any(t.requires_grad for t in (query, key, value))):
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        return _Float32Backward.apply(query, key, value, attention_mask, sdpa, module, args, kwargs), None

    attention.p3o_float32_backward, attention.wrapped = True, sdpa
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention


class _Float32Backward(torch.autograd.Function):
    """sdpa as autocast runs it, forward; the gradient of its float32 recomputation, backward."""

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, sdpa, module, args, kwargs):
        ctx.save_for_backward(query, key, value)
        ctx.call = (attention_mask, sdpa, module, args, kwargs)
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)[0]

    @staticmethod
    def backward(ctx, grad):
        attention_mask, sdpa, module, args, kwargs = ctx.call
        saved = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            written = None if args else _float32_grads(module, *saved, attention_mask, kwargs, grad)
        if written is not None:
            return (*(g.to(t.dtype) if needed else None for g, t, needed in zip(written, saved, ctx.needs_input_grad)),
                    None, None, None, None, None)
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            inputs = [t.detach().float().requires_grad_(needed) for t, needed in zip(saved, ctx.needs_input_grad)]
            output = sdpa(module, *inputs, attention_mask, *args, **kwargs)[0]
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(output, wanted, grad.float()))
        return (*(next(grads).to(t.dtype) if needed else None for t, needed in zip(saved, ctx.needs_input_grad[:3])),
                None, None, None, None, None)


# Keyword arguments `transformers`' models pass their attention function that leave SDPA's arithmetic
# alone (dropout only at 0). Any other (a position bias, softcapping, attention sinks, a paged cache)
# leaves the gradient to the SDPA recomputation.
PLAIN_KWARGS = {"dropout", "scaling", "is_causal", "position_ids", "cache_position", "use_cache", "output_attentions",
                "output_hidden_states", "sliding_window"}
MAX_KEYS = 160  # longer sequences: SDPA's kernel was the faster (on this project's 2-core CPU; module docstring)
ROW_LIMIT = 1 << 22  # float32 elements of one tensor of probabilities (16 MiB) a chunk of batch rows may hold


def _float32_grads(module, query, key, value, mask, kwargs, grad):
    """The float32 gradients of SDPA(query, key, value, mask) with respect to its three inputs, as
    `transformers`' sdpa attention calls it (its grouped heads, causal flag and scale), or None
    where the call is not plain attention (see PLAIN_KWARGS) or its sequences are longer than MAX_KEYS.

    query (B, H, Lq, D); key, value (B, Hkv, L, D); mask None or boolean (B or 1, 1, Lq, L), True:
    attend; grad (B, Lq, H, D), as `transformers`' attention returns its output."""
    B, H, Lq, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    if (not set(kwargs) <= PLAIN_KWARGS or kwargs.get("dropout", 0.0) != 0.0 or H % Hkv or value.shape[1] != Hkv
            or value.shape[-1] != D or key.shape[0] != B or L > MAX_KEYS or H * Lq * L > ROW_LIMIT):
        return None
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
                             or mask.shape[-2:] != (Lq, L) or mask.shape[0] not in (1, B)):
        return None  # additive masks too: a row masked with a finite minimum is not SDPA's row of zeros
    causal = kwargs.get("is_causal")
    causal = Lq > 1 and mask is None and (getattr(module, "is_causal", True) if causal is None else causal)
    if causal and L != Lq:
        return None
    scale = D ** -0.5 if kwargs.get("scaling") is None else kwargs["scaling"]
    if mask is None and causal:
        mask = torch.ones(Lq, L, dtype=torch.bool, device=query.device).tril()[None, None]  # (1, 1, Lq, L)
    rows = max(1, ROW_LIMIT // (H * Lq * L))
    grad = grad.transpose(1, 2)  # (B, H, Lq, D)
    parts = [_chunk_grads(query[b], key[b], value[b], None if mask is None else mask[b] if len(mask) > 1 else mask,
                          grad[b], scale)
             for b in (slice(i, i + rows) for i in range(0, B, rows))]
    return tuple(torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts))


def _chunk_grads(query, key, value, mask, grad, scale):
    """`_float32_grads` for a few batch rows. With P = softmax(S), S = scale q k^T + mask and out = P v:
    dv = P^T dout, dP = dout v^T, dS = P (dP - rowsum(P dP)), dq = scale dS k, dk = scale dS^T q."""
    B, H, Lq, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    g = H // Hkv
    q = query.float().reshape(B, Hkv, g * Lq, D)  # each key-value head's g query heads, one after another
    k, v = key.float(), value.float()  # (B, Hkv, L, D)
    dout = grad.float().reshape(B, Hkv, g * Lq, D)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).view(B, Hkv, g, Lq, L)
    if mask is not None:  # added as 0 / -inf: a broadcast masked_fill over the heads took 4x as long
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        scores = scores.add_(bias[:, :, None])  # (b, 1, 1, Lq, L): every head of the group
    probs = torch.softmax(scores, dim=-1)
    nothing_allowed = scores.amax(-1, keepdim=True) == float("-inf")  # such a row's output is 0 in SDPA
    probs.masked_fill_(nothing_allowed, 0.0)
    dv = torch.matmul(probs.view(B, Hkv, g * Lq, L).transpose(-1, -2), dout)  # (B, Hkv, L, D)
    dprobs = torch.matmul(dout, v.transpose(-1, -2)).view(B, Hkv, g, Lq, L)
    dscores = dprobs.sub_((probs * dprobs).sum(-1, keepdim=True)).mul_(probs).mul_(scale).view(B, Hkv, g * Lq, L)
    dq = torch.matmul(dscores, k).view(B, H, Lq, D)
    dk = torch.matmul(dscores.transpose(-1, -2), q)  # (B, Hkv, L, D)
    return dq, dk, dv
