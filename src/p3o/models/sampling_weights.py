"""The weights a decoding step reads, made cheap to read for the length of one `generate`.

Sampling on a CPU runs a chain of small matmuls per token (a handful of rows each), so what each
matmul costs beyond its arithmetic decides its speed. For the block of `sampling_weights(model)`:

* **LoRA adapters merged.** Each LoRA layer becomes a copy of its base layer holding
  W + scale * B A, in W's dtype: one matmul per layer instead of three (the base and the two thin
  adapter ones, each its own kernel call) and none of peft's per-layer Python. The model's own
  weights are never written (merging in place and back, as peft's `merge_adapter` does, rounds a
  bf16 base a little more each time); the copies are freed after the block.
* **bf16 weights prepacked on a CPU.** oneDNN's bf16 matmul reorders a plain weight into its
  blocked layout at every call; a weight reordered once (`torch.ops.mkldnn._reorder_linear_weight`)
  skips that, with bit-identical results (tested). These are the frozen weights that
  `hold_frozen_base_in` keeps in bf16 under `--mixed_precision bf16`: the merged LoRA layers and the
  output head.

The policy sampled is the same one up to the rounding of the merged weight; the log-probabilities
the algorithms use come from the training forward as always, so ratios and KLs are unchanged. A
layer that cannot be merged this way (DoRA, a quantised or hooked base, adapters switched off) is
left as it is.
"""
from __future__ import annotations

import contextlib
import copy

import torch


@contextlib.contextmanager
def sampling_weights(model, prepack: bool = True):
    """`model` with merged (and, on a CPU in bf16, prepacked) layers for the block; as it was after.
    `prepack=False` for a compiled decoding step: the compiler cannot take a prepacked weight that
    changes between rollouts, so the merged layers stay plain `Linear`s."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is optional (p3o[lora]): then no model has adapters
        LoraLayer = ()

    swaps, adapted = [], ()
    try:
        for name, module in list(model.named_modules()):
            if name.startswith(adapted):  # the base layer and adapters of a LoRA layer handled whole
                continue
            if isinstance(module, LoraLayer):
                adapted += (name + ".",)
                twin = _merged(module, prepack)
            elif prepack and plain_linear(module) and packable(module.weight):
                twin = _packed(module, module.weight)
            else:
                twin = None
            if twin is not None:
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent)
                swaps.append((owner, child, module))
                setattr(owner, child, twin)
        yield
    finally:
        for owner, child, module in reversed(swaps):
            setattr(owner, child, module)


def plain_linear(module) -> bool:
    """A Linear (or GPT-2's Conv1D) that computes only x W^T + b: no hooks, no forward of its own."""
    from transformers.pytorch_utils import Conv1D

    return (type(module) in (torch.nn.Linear, Conv1D) and "forward" not in vars(module)
            and not module._forward_hooks and not module._forward_pre_hooks
            and module.weight.dtype in (torch.float32, torch.bfloat16, torch.float16))


def merged_weight(layer) -> torch.Tensor | None:
    """A peft LoRA layer's base weight with its active adapters merged in (a new tensor, in the base
    weight's dtype and layout), or None where that would not compute the layer's function."""
    base = layer.get_base_layer()
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if (layer.merged or layer.disable_adapters or not adapters or not plain_linear(base)
            or any(layer.use_dora.get(a, False) or getattr(layer, "lora_bias", {}).get(a, False) for a in adapters)):
        return None
    weight, dtype = base.weight, base.weight.dtype
    for a in adapters:
        A, B = layer.lora_A[a].weight.to(dtype), layer.lora_B[a].weight.to(dtype)  # (r, in), (out, r)
        # W + s B A, accumulated in float32 and rounded to W's dtype once (a Conv1D holds W as (in, out)).
        weight = torch.addmm(weight, *((A.T, B.T) if layer.fan_in_fan_out else (B, A)), alpha=layer.scaling[a])
    return weight


def _merged(layer, prepack: bool = True):
    """`layer`'s base layer with its active adapters merged into a new weight, or None where that
    would not compute the same function."""
    weight = merged_weight(layer)
    if weight is None:
        return None
    base = layer.get_base_layer()
    if prepack and packable(weight):
        return _packed(base, weight)
    twin = copy.copy(base)
    twin._parameters = {**base._parameters, "weight": torch.nn.Parameter(weight, requires_grad=False)}
    return twin


def packable(weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(torch.nn.Module):
    """x W^T + b with W a bf16 weight reordered once for oneDNN (CPU). Inputs are cast to bf16, as
    autocast would cast them for the plain layer."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
        super().__init__()
        self.packed, self.bias, self.out_features = packed, bias, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, bias, "none", [], "")


def _packed(base, weight: torch.Tensor):
    """A `PackedLinear` computing `base` with `weight` (Linear: (out, in); Conv1D: (in, out))."""
    from transformers.pytorch_utils import Conv1D

    weight = weight.T.contiguous() if isinstance(base, Conv1D) else weight  # (out, in)
    return PackedLinear(torch.ops.mkldnn._reorder_linear_weight(weight, 16), base.bias, weight.shape[0])
