"""Small tensor helpers shared by every loss and by the rollout engine.

Shape legend: B = sequences, T = response tokens, V = vocabulary.
Masking convention: a response mask is 1 on real response tokens (the first EOS included) and 0 on
padding; every reduction over tokens goes through `masked_sum` / `masked_mean`.
"""
from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1. `where`, not a product, so inf/NaN on padding cannot leak."""
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1; 0 where the mask is empty (never NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def first_true_indices(flags: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) index of the first True in each row, or T where a row has none.

    Naive version: [next((t for t in range(T) if row[t]), T) for row in flags].
    """
    T = flags.shape[-1]
    positions = torch.arange(T, device=flags.device).expand_as(flags)  # (B, T)
    return torch.where(flags, positions, torch.full_like(positions, T)).min(-1).values


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """(B, T) generated ids -> (B, T) mask: 1 up to and including the first EOS, 0 after it.

    The mask comes from the position of the first generated EOS, never from comparing ids with the
    pad id (pad often equals EOS, and a response may legitimately contain the pad token).
    """
    T = response_ids.shape[-1]
    if eos_token_ids:
        is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
        last = first_true_indices(is_eos)  # (B,) index of the first EOS, T if none
    else:
        last = torch.full(response_ids.shape[:1], T, device=response_ids.device)
    positions = torch.arange(T, device=response_ids.device)  # (T,)
    return (positions[None, :] <= last[:, None]).long()  # (B, T)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature)[..., index] without a float32 copy of the (B, T, V) logits.

    Naive version: torch.log_softmax(logits.float() / temperature, -1).gather(-1, index[..., None])[..., 0].
    logits (B, T, V) in any float dtype, index (B, T) -> (B, T), in float32 at least. Taken a block of rows at a
    time (gather minus logsumexp, each in float32); only `logits` itself is kept for the backward
    pass, which recomputes each block's softmax. At a 49k vocabulary the float32 copies of the
    logits (the copy, the logsumexp's input kept for backward, its gradient) were the update's
    largest tensors.
    """
    return _SelectiveLogSoftmax.apply(logits, index, float(temperature))


def _block_elements(device: torch.device) -> int:
    """float32 elements of one block's temporaries. On a CPU 2 MiB, so that a block's chain of
    element-wise passes (cast, exp, scale) runs in the cores' L2 caches: at SmolLM2's 49k vocabulary,
    forward and backward of 512 rows took 68 ms against 99 with 8 MiB blocks (2 AMD EPYC cores;
    docs/performance.md). Elsewhere 8 MiB, fewer kernel launches."""
    return 1 << 19 if device.type == "cpu" else 1 << 21


def _blocks(shape: torch.Size, device: torch.device):
    """(b, t) slices covering a (B, T, V) tensor, each about `_block_elements` logits: whole rows
    several at a time, or pieces of one row when a row is longer."""
    B, T, V = shape
    elements = _block_elements(device)
    if T * V <= elements:
        step = max(1, elements // max(1, T * V))
        for b in range(0, B, step):
            yield slice(b, b + step), slice(None)
    else:
        step = max(1, elements // max(1, V))
        for b in range(B):
            for t in range(0, T, step):
                yield slice(b, b + 1), slice(t, t + step)


def _scaled(block: torch.Tensor, temperature: float) -> torch.Tensor:
    block = block.to(torch.promote_types(block.dtype, torch.float32))
    return block / temperature if temperature != 1.0 else block


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, temperature):
        shape = logits.shape
        logits3, index3 = logits.reshape(-1, *shape[-2:]) if logits.dim() != 3 else logits, index.reshape(-1, shape[-2])
        out = torch.empty(index3.shape, dtype=torch.promote_types(logits.dtype, torch.float32),
                          device=logits.device)  # (B, T)
        lse = torch.empty_like(out)
        for b, t in _blocks(logits3.shape, logits.device):
            x = _scaled(logits3[b, t], temperature)  # (b, t, V) float32
            lse[b, t] = torch.logsumexp(x, dim=-1)
            out[b, t] = x.gather(-1, index3[b, t].unsqueeze(-1)).squeeze(-1) - lse[b, t]
        ctx.save_for_backward(logits, index, lse)
        ctx.temperature = temperature
        return out.reshape(index.shape)

    @staticmethod
    def backward(ctx, grad):
        logits, index, lse = ctx.saved_tensors
        temperature, shape = ctx.temperature, logits.shape
        logits3 = logits.reshape(-1, *shape[-2:]) if logits.dim() != 3 else logits
        index3, grad3 = index.reshape(-1, shape[-2]), grad.reshape(-1, shape[-2])
        grad_logits = torch.empty(logits3.shape, dtype=logits.dtype, device=logits.device)
        for b, t in _blocks(logits3.shape, logits.device):
            g = grad3[b, t].unsqueeze(-1)  # (b, t, 1)
            # d/dx (x_i - logsumexp x) = onehot(i) - softmax(x), times the incoming gradient; / temperature
            block = (_scaled(logits3[b, t], temperature) - lse[b, t].unsqueeze(-1)).exp_().mul_(-g)
            block.scatter_add_(-1, index3[b, t].unsqueeze(-1), g)
            grad_logits[b, t] = block / temperature if temperature != 1.0 else block
        return grad_logits.reshape(shape), None, None
