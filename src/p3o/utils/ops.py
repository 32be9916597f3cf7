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


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without materialising the (B, T, V) log-softmax.

    Naive version: torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1).
    logits (B, T, V), index (B, T) -> (B, T), in float32 at least.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T)
