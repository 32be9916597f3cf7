"""LoRA through `peft`: train low-rank adapters on a frozen policy, and use the same model with its
adapters switched off as the reference, so a LoRA run holds one copy of the weights (the full
fine-tune holds two: policy and reference) and optimiser state only for the adapters.

Checkpoints hold the adapter (`adapter_model.safetensors`, `adapter_config.json`); the final run
directory holds the merged model (a plain causal LM, so `p3o eval` and later stages read it like
any other) with the adapter itself under `adapter/`. `p3o sft` and `p3o rm` do the same; a reward
model's score head is trained whole beside the adapters (peft's `modules_to_save`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from p3o.errors import UsageError

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def get_peft_model_quietly(model, config):
    """peft's `get_peft_model`, without the FutureWarning its read of transformers' deprecated
    `is_gradient_checkpointing` prints on every run (peft's to fix, nothing the user can act on)."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def add_lora(model, r: int, alpha: float, target_modules: str, task_type: str = "CAUSAL_LM",
             modules_to_save: list[str] | None = None):
    """`model` wrapped in fresh LoRA adapters (B = 0, so it starts as `model` exactly); the modules
    named in `modules_to_save` (a classifier's head) are trained whole, as copies."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise UsageError("--use_peft needs peft: pip install 'p3o[lora]'") from None
    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    # No LoRA dropout: importance ratios must be exactly 1 at the first update (docs/p3o.md section 4).
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type=task_type,
                        modules_to_save=modules_to_save)
    try:
        return get_peft_model_quietly(model, config)
    except ValueError as exc:
        raise UsageError(f"--lora_target_modules {target_modules!r}: {str(exc).splitlines()[0]}") from None


def hold_frozen_base_in(peft_model, dtype) -> int:
    """Hold the frozen float32 weights that run through matmuls in `dtype` (bf16): every LoRA layer's
    base weight and the output head, so a forward under `dtype` autocast never re-casts them (on a
    CPU, sampling re-cast every weight at every token). Autocast casts a float32 weight to exactly
    these values, so every matmul computes what it computed before; adapters, norms and the
    optimiser stay float32. A tied input embedding becomes `dtype` with the head, and its output is
    widened back to float32, so the residual stream stays float32 as under autocast; its rows are
    then rounded to `dtype`, the one change to the model. The reference (adapters off) is these
    same weights, so the KL of the initial policy stays exactly 0. Returns the parameters cast;
    `in_saved_dtypes` widens them back for saving."""
    import torch
    from peft.tuners.lora import LoraLayer

    names = {id(p): n for n, p in peft_model.named_parameters()}
    heads = [m.get_base_layer() for m in peft_model.modules() if isinstance(m, LoraLayer)]
    heads.append(peft_model.get_output_embeddings())
    saved = getattr(peft_model, "p3o_saved_dtypes", {})
    for module in heads:
        for param in (module.parameters(recurse=False) if module is not None else ()):
            if param.requires_grad or param.dtype != torch.float32 or names.get(id(param)) in saved:
                continue
            saved[names[id(param)]] = param.dtype
            param.data = param.data.to(dtype)
    peft_model.p3o_saved_dtypes = saved
    embedding = peft_model.get_input_embeddings()
    if embedding.weight.dtype == dtype and names.get(id(embedding.weight)) in saved:
        widen = saved[names[id(embedding.weight)]]
        embedding.register_forward_hook(lambda module, args, output: output.to(widen))
    return len(saved)


@contextlib.contextmanager
def in_saved_dtypes(peft_model, merged: dict | None = None):
    """For saving: the output head and embedding `hold_frozen_base_in` narrowed, widened back to
    their loaded dtype for the block (exactly: bf16 -> float32 -> bf16 is lossless), so the saved
    config records that dtype (`save_pretrained` takes it from the first weight). LoRA base weights
    stay narrow: `merged_lora_state_dict` widens them as it merges. Given its `merged` state dict,
    the widened weights are its tensors, not second copies."""
    saved = {name: dtype for name, dtype in getattr(peft_model, "p3o_saved_dtypes", {}).items()
             if ".base_layer." not in name}
    params = dict(peft_model.named_parameters())
    held = {name: params[name].data for name in saved}
    try:
        for name, dtype in saved.items():
            twin = (merged or {}).get(name.removeprefix("base_model.model."))
            params[name].data = twin if twin is not None and twin.dtype == dtype else held[name].to(dtype)
        yield
    finally:
        for name, data in held.items():
            params[name].data = data


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


class InitialAdapters:
    """The reference policy of a LoRA run whose model came with adapters already trained (a
    `PeftModel` after LoRA SFT): the policy with its adapters as they were at the start, swapped in
    for the reference's no-grad forward. Turning them off would make the reference the base model,
    not the initial policy (TRL copies them into a frozen "ref" adapter). Holds a copy of the trained
    parameters only, not of the model."""

    def __init__(self, peft_model):
        self.model = peft_model
        self.initial = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}

    @property
    def config(self):
        return self.model.config

    def __call__(self, *args, **kwargs):
        import torch

        params = dict(self.model.named_parameters())
        held = {name: params[name].data for name in self.initial}
        # Autocast keeps its casts of trainable parameters by tensor until its region ends, and swapping
        # `.data` does not reach them: without clearing, the reference would run the current adapters' casts.
        torch.clear_autocast_cache()
        try:
            for name, start in self.initial.items():
                param = params[name]
                if start.device != param.device or start.dtype != param.dtype:  # placed by accelerate since
                    self.initial[name] = start = start.to(param.device, param.dtype)
                param.data = start
            return self.model(*args, **kwargs)
        finally:
            for name, data in held.items():
                params[name].data = data
            torch.clear_autocast_cache()  # nor may the policy's next forward run the initial adapters' casts


def check_trains_adapters_only(peft_model) -> None:
    """p3o trains a peft model's LoRA matrices (lora_A, lora_B) and `modules_to_save` only: its saved
    model merges those deltas, and its reference turns the adapters off. Anything else trained (base
    weights, biases, DoRA's magnitudes, IA3's scales) would make either wrong, so it is refused."""
    lora = ("lora_A.", "lora_B.", "lora_embedding_A.", "lora_embedding_B.")
    outside = [name for name, param in peft_model.named_parameters() if param.requires_grad
               and not ("modules_to_save" in name or (any(k in name for k in lora) and name.endswith("weight")))]
    if outside:
        raise UsageError(f"the peft model trains {len(outside)} weights besides LoRA's A and B matrices "
                         f"({outside[0]}, ...): p3o merges and turns off plain LoRA adapters only (no DoRA, IA3, "
                         "trained biases or base weights); freeze those, or use a plain LoraConfig")


def adapters_change_the_model(peft_model) -> bool:
    """Whether `peft_model` with its adapters on differs from it with them off: a LoRA B matrix that
    is not zero (trained, or PiSSA's initialisation), or a trained `modules_to_save` copy (A alone,
    with B zero, changes nothing). `check_trains_adapters_only` has refused anything else trained."""
    return any(param.requires_grad and ("modules_to_save" in name or (
        ("lora_B" in name or "lora_embedding_B" in name) and bool(param.detach().any())))
        for name, param in peft_model.named_parameters())


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
    merged, out of place: W + delta is computed in float32 into a new tensor and cast to W's dtype
    (its loaded dtype, where `hold_frozen_base_in` narrowed it), so the frozen base (hence the
    reference, the base with adapters off) is never written. Merging in place and back, as peft's
    merge_adapter does, rounds a bf16/fp16 base a little more each time.
    A module trained whole (`modules_to_save`, as a reward model's head) gives its active copy."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    lora_layers, copies = {}, {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                lora_layers[f"{module_name}.base_layer.weight"] = (module, adapters)
        elif isinstance(module, ModulesToSaveWrapper):
            active = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.modules_to_save]
            copies[f"{module_name}."] = f"{module_name}." + (f"modules_to_save.{active[0]}." if active else "original_module.")
    merged, saved = {}, getattr(peft_model, "p3o_saved_dtypes", {})  # widened back to the loaded dtype
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            continue
        wrapper = next((prefix for prefix in copies if name.startswith(prefix)), None)
        if wrapper is not None:  # the copy in use, under the module's own name; the other one is dropped
            if not name.startswith(copies[wrapper]):
                continue
            name = wrapper + name.removeprefix(copies[wrapper])
        weight, dtype = param.data, saved.get(name, param.dtype)
        if name in lora_layers:  # one layer's delta at a time: all of them at once would double the peak
            module, adapters = lora_layers[name]
            weight = (weight.float() + sum(module.get_delta_weight(a).float() for a in adapters)).to(dtype)
        elif weight.dtype != dtype:
            weight = weight.to(dtype)
        merged[name.removeprefix("base_model.model.").replace(".base_layer", "")] = weight
    return merged
