"""A leaner forward for LoRA layers in the training passes (the update, the old-log-prob pass).

Imported by the engine; peft's own forward stays in use everywhere else (the reference, with its
adapters off, and any layer this does not cover).
"""
from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F


def lean_lora_forward(peft_model) -> int:
    """Give every plain LoRA layer of `peft_model` (a Linear base, one active adapter, no dropout, no
    DoRA or other variant, no adapter bias) a leaner forward: x is cast once to the compute dtype
    (autocast's, else its own), shared by the base and adapter matmuls, and the scale multiplies the
    rank-r activation instead of the full-width output:

        y = x W^T + ((x A^T) * scale) B^T

    peft casts x twice under autocast (once per branch, each cast with its own backward) and scales
    the (rows, out) output. The same function; with a power-of-two scale (lora_alpha / lora_r = 2,
    the default) the same bits, since scaling by 2 is exact in floating point (tested). On
    SmolLM2-135M with LoRA r 16 in bf16 the update took 1.07x less time (CPU seconds of one thread,
    `benchmarks/levers.py --lever lean_lora`, on busy cores). Layers fed the same input one after
    another (q, k and v; gate and up) share its cast too: autograd keeps one bf16 copy of the input
    for their backward instead of one per layer (each layer's gradient is still widened on its own).
    On SmolLM2 that is half the layer inputs kept. A layer that is not plain,
    a call with adapters off (the reference) or with peft's extra arguments runs peft's own forward.
    Returns the layers changed."""
    from peft.tuners.lora import Linear as LoraLinear

    changed = 0
    for module in peft_model.modules():
        adapters = list(module.lora_A) if isinstance(module, LoraLinear) else []
        if (len(adapters) == 1 and type(module.get_base_layer()) is torch.nn.Linear and not module.lora_variant
                and isinstance(module.lora_dropout[adapters[0]], torch.nn.Identity)
                and module.lora_B[adapters[0]].bias is None and not module.fan_in_fan_out):
            module.forward = types.MethodType(_lean_forward, module)
            changed += 1
    return changed


def _lean_forward(self, x, *args, **kwargs):
    """`lean_lora_forward`'s forward of one LoRA Linear (x: (..., in) -> (..., out))."""
    if args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != list(self.lora_A):
        return type(self).forward(self, x, *args, **kwargs)
    adapter, base = self.active_adapters[0], self.get_base_layer()
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x_base, x_lora = _SharedCast.apply(x, _cast(x, dtype)) if x.dtype != dtype else (x, x)
    with torch.autocast(device, enabled=False):  # every operand is in `dtype` already
        out = F.linear(x_base, base.weight.to(dtype), None if base.bias is None else base.bias.to(dtype))  # (..., out)
        rank = F.linear(x_lora, self.lora_A[adapter].weight.to(dtype)) * self.scaling[adapter]  # (..., r)
        return out + F.linear(rank, self.lora_B[adapter].weight.to(dtype))


# The layer before's input and its cast, both held weakly: (weakref to x, x's version, weakref to the
# cast). The cast lives as long as autograd keeps it for a backward, and no longer.
_last_cast: tuple = (None, -1, None)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to `dtype`, without gradient; the same tensor again while x is the input the layer
    before cast, has not changed since, and its cast is still alive (q, k and v read one input, as
    gate and up do)."""
    global _last_cast
    x_ref, version, cast_ref = _last_cast
    cast = cast_ref() if x_ref is not None and x_ref() is x and version == x._version else None
    if cast is None or cast.dtype != dtype:
        with torch.no_grad():
            cast = x.to(dtype)
        _last_cast = (weakref.ref(x), x._version, weakref.ref(cast))
    return cast


class _SharedCast(torch.autograd.Function):
    """x's cast (made by `_cast`, perhaps shared with other layers) handed to this layer's two
    branches as views, so autograd keeps the one cast; the backward widens each branch's gradient to
    x's dtype before adding them, as peft's two separate casts do (so no extra rounding)."""

    @staticmethod
    def forward(ctx, x, cast):
        ctx.input_dtype = x.dtype
        return cast.view_as(cast), cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad_base, grad_lora):
        return grad_base.to(ctx.input_dtype) + grad_lora.to(ctx.input_dtype), None
