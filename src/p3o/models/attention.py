"""Attention's backward pass in float32 under CPU bf16 autocast.

CPU autocast runs `scaled_dot_product_attention` in bf16, and PyTorch's CPU flash-attention
backward is slow in bf16: on this project's CPU (torch 2.13) it took 37% of SmolLM2-135M's LoRA
update, about three times the cost of recomputing the attention in float32 and taking its float32
backward. With `--mixed_precision bf16` on a CPU, p3o's wrapper of `transformers`' sdpa attention
does exactly that for forwards that record a gradient: the forward is autocast's own (the same
values: log-probabilities, ratios, KLs and samples do not change), and the backward recomputes
the attention from the same inputs in float32 and returns its gradient. Gradient checkpointing
recomputes through the same wrapper. It is installed for the process (`transformers`' attention
table is global) and acts only on CPU tensors under CPU autocast with gradients on.
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
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            inputs = [t.detach().float().requires_grad_(needed) for t, needed in zip(saved, ctx.needs_input_grad)]
            output = sdpa(module, *inputs, attention_mask, *args, **kwargs)[0]
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(output, wanted, grad.float()))
        return (*(next(grads).to(t.dtype) if needed else None for t, needed in zip(saved, ctx.needs_input_grad[:3])),
                None, None, None, None, None)
