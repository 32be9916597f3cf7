"""The optimiser and its learning-rate schedule, as every stage builds them."""
from __future__ import annotations

import math

import torch

from p3o.errors import UsageError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm gains are left alone (as `transformers.Trainer` does).
    Frozen parameters (LoRA's base) are not handed to the optimiser at all."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters (torch's defaults for betas and eps)."""
    check_trainable(model)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps)


def check_trainable(model: torch.nn.Module) -> None:
    """A model with something to train; else one line now, not a traceback from backward() after the
    first rollout (or, beside PPO's value head, a policy that never changes)."""
    if any(p.requires_grad for p in model.parameters()):
        return
    if any(hasattr(module, "peft_config") for module in model.modules()):
        raise UsageError("the LoRA model's adapters are frozen (peft's PeftModel.from_pretrained loads them so): "
                         "load it with is_trainable=True")
    raise UsageError("the model has no trainable parameters (requires_grad is False on every one, as peft's "
                     "merge_and_unload leaves them): call model.requires_grad_(True), or train LoRA adapters "
                     "(use_peft)")


def lr_scheduler(name: str, optimizer, total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0):
    """A transformers schedule (`linear`, `cosine`, `constant`, ...) over `total_steps` optimiser
    steps, after a linear warm-up of `warmup_steps`, or of `warmup_ratio` of them when that is 0.
    It advances only with steps taken (`clip_and_step`), so a skipped step does not move it."""
    from transformers import get_scheduler

    warmup = warmup_steps or math.ceil(warmup_ratio * total_steps)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    except ValueError as exc:  # an unknown name: one line, not a traceback from transformers
        raise UsageError(f"--lr_scheduler_type {name!r}: {exc}") from None
