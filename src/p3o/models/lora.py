"""LoRA through `peft`: train low-rank adapters on a frozen policy, and use the same model with its
adapters switched off as the reference, so a LoRA run holds one copy of the weights (the full
fine-tune holds two: policy and reference) and optimiser state only for the adapters.

Checkpoints hold the adapter (`adapter_model.safetensors`, `adapter_config.json`); the final run
directory holds the merged model (a plain causal LM, so `p3o eval` and later stages read it like
any other) with the adapter itself under `adapter/`. `p3o sft` and `p3o rm` do the same; a reward
model's score head is trained whole beside the adapters (peft's `modules_to_save`).
"""
from __future__ import annotations

from pathlib import Path

from p3o.errors import UsageError

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def add_lora(model, r: int, alpha: float, target_modules: str, task_type: str = "CAUSAL_LM",
             modules_to_save: list[str] | None = None):
    """`model` wrapped in fresh LoRA adapters (B = 0, so it starts as `model` exactly); the modules
    named in `modules_to_save` (a classifier's head) are trained whole, as copies."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--use_peft needs peft: pip install 'p3o[lora]'") from None
    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    # No LoRA dropout: importance ratios must be exactly 1 at the first update (docs/p3o.md section 4).
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type=task_type,
                        modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UsageError(f"--lora_target_modules {target_modules!r}: {str(exc).splitlines()[0]}") from None


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class AdaptersDisabled:
    """The reference policy of a LoRA run: `peft_model` called with its adapters off. Not a module
    of its own, so freezing or moving "the reference" can never touch the trained adapters."""

    def __init__(self, peft_model):
        self.model = peft_model

    @property
    def config(self):
        return self.model.config

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)


def load_adapter(peft_model, directory: Path) -> None:
    """The adapter weights a checkpoint saved, into `peft_model` (whose base is the initial policy)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_model, load_file(str(directory / ADAPTER_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise UsageError(f"{directory} holds adapter weights this run has no place for "
                         f"({result.unexpected_keys[0]}, ...): was it trained with other --lora_* settings?")


def save_adapter_state(peft_model, directory: Path) -> None:
    """The adapter's weights (and a reward model's trained head) and its config, for `load_adapter`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(weights, str(directory / ADAPTER_WEIGHTS))
    peft_model.peft_config[peft_model.active_adapter].save_pretrained(str(directory))


def merged_lora_state_dict(peft_model) -> dict:
    """A peft model's weights under their plain checkpoint names with its active LoRA adapters
    merged, out of place: W + delta is computed in float32 into a new tensor and cast to W's dtype,
    so the frozen base (hence the reference, the base with adapters off) is never written. Merging in
    place and back, as peft's merge_adapter does, rounds a bf16/fp16 base a little more each time.
    A module trained whole (`modules_to_save`, as a reward model's head) gives its active copy."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    deltas, copies = {}, {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[f"{module_name}.base_layer.weight"] = sum(module.get_delta_weight(a).float() for a in adapters)
        elif isinstance(module, ModulesToSaveWrapper):
            active = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.modules_to_save]
            copies[f"{module_name}."] = f"{module_name}." + (f"modules_to_save.{active[0]}." if active else "original_module.")
    merged = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            continue
        wrapper = next((prefix for prefix in copies if name.startswith(prefix)), None)
        if wrapper is not None:  # the copy in use, under the module's own name; the other one is dropped
            if not name.startswith(copies[wrapper]):
                continue
            name = wrapper + name.removeprefix(copies[wrapper])
        weight = param.data
        if name in deltas:
            weight = (weight.float() + deltas[name]).to(weight.dtype)
        merged[name.removeprefix("base_model.model.").replace(".base_layer", "")] = weight
    return merged
