"""One optimiser step accumulated over micro-batches, on any backend `p3o.utils.distributed` drives."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from p3o.utils.distributed import backward, clip_and_step, micro_batch


@dataclass
class StepResult:
    loss: float  # this process's loss, summed over its micro-batches (each already normalised)
    grad_norm: float  # the global gradient norm before clipping (inf or nan when the step was skipped for it)
    stepped: bool  # False: a non-finite loss or gradient on some process dropped the step on all
    extras: list  # what `part_loss` returned beside each micro-batch's loss, in order


def accumulate_and_step(accelerator, model, optimizer, scheduler, parts: Sequence,
                        part_loss: Callable[[Any], tuple[torch.Tensor, Any]], max_grad_norm: float) -> StepResult:
    """Forward and backward every micro-batch in `parts`, then clip and step once.

    `part_loss(part)` runs the forward (under autocast) and returns the part's loss, already divided
    by the normaliser of the whole step (its pairs, tokens or examples across processes), and
    anything else to hand back. Dividing by the step's normaliser, not the part's, is what makes
    accumulation and several processes equal one large batch. DDP and FSDP synchronise gradients on
    the last part only. The step is dropped on every process when any has a non-finite loss or
    gradient (`clip_and_step`); the caller counts that (`p3o.core.skips.count_skip`)."""
    total, extras = 0.0, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        with micro_batch(accelerator, model, last):
            with accelerator.autocast():
                loss, extra = part_loss(part)  # () scalar
            backward(accelerator, model, loss, last)
        total += loss.item()
        extras.append(extra)
    grad_norm, stepped = clip_and_step(accelerator, model, optimizer, scheduler, max_grad_norm, math.isfinite(total))
    return StepResult(total, grad_norm, stepped, extras)
