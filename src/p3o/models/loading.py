"""Load Hugging Face tokenizers and causal LMs from a local directory or a hub name, safely.

Weights load through `from_pretrained` (safetensors where the checkpoint has them); remote code runs
only with `trust_remote_code=True`. A path ending in `.gguf` is a model too: config, tokenizer and
weights come from the file (transformers' `gguf_file=`, needs the `gguf` package), dequantised to the
asked dtype, and the model then trains and saves as an ordinary safetensors checkpoint.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from p3o.data.turns import special_ids, stop_token_ids
from p3o.errors import UsageError

log = logging.getLogger(__name__)


GGUF_INSTALL = "pip install 'p3o[gguf]' (or pip install gguf)"


# Where configs keep the context length: Llama-likes and most others, GPT-2 (and its older n_ctx),
# MPT, Qwen-1 and ChatGLM, and others.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length")


CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # class names that generate text


def context_length(model_config) -> int | None:
    """The model's context in tokens, where its config says (None for a config that says nothing)."""
    return next((value for f in CONTEXT_FIELDS if isinstance(value := getattr(model_config, f, None), int) and value > 0),
                None)


def is_gguf(name: str) -> bool:
    return str(name).lower().endswith(".gguf")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1 or is_gguf(name)


def pretrained_source(name: str, what: str = "model") -> tuple[str, dict]:
    """(what to pass to `from_pretrained`, extra keyword arguments). A `.gguf` file is read from its
    directory with `gguf_file=` (transformers wants the two apart); anything else as given."""
    if not is_gguf(name):
        return name, {}
    path = Path(name).expanduser()
    if not path.is_file():
        raise UsageError(f"{what} {name} does not exist; give a .gguf file, a model directory or a hub name")
    from transformers.utils import is_gguf_available

    if not is_gguf_available():  # transformers would fail deep inside loading, with a traceback
        raise UsageError(f"reading {name} needs the gguf package (0.10 or newer): {GGUF_INSTALL}")
    return str(path.parent), {"gguf_file": path.name}


def gguf_model_kwargs(extra: dict) -> dict:
    """Model-loading arguments for a GGUF source: unpack every weight into a dense tensor. Left to
    itself, transformers keeps the blocks packed wherever a `kernels` matmul exists (GPUs), and such
    a model can neither train nor save."""
    if "gguf_file" not in extra:
        return extra
    from transformers import GgufConfig

    return {**extra, "quantization_config": GgufConfig(dequantize=True)}


def as_plain_model(model):
    """Forget that a model came from a GGUF file: its weights are dense tensors by now, but a model
    still marked quantised (`hf_quantizer`, `config.quantization_config`) refuses `save_pretrained`
    (GGUF is not serialisable) and training. transformers 5.23 clears the marks itself when asked to
    dequantise; without `dequantize=True` (and in 5.x before it) they stay, hence this safety net."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "quantization_method" in vars(model):
        del model.quantization_method
    if "is_quantized" in vars(model):
        model.is_quantized = False
    return model


def adapter_base(name: str) -> str | None:
    """The base model a PEFT LoRA adapter directory (adapter_config.json, no config.json) was trained
    on, as its adapter_config.json names it; None for anything else."""
    import json

    path = Path(str(name)).expanduser()
    if not ((path / "adapter_config.json").is_file() and not (path / "config.json").is_file()):
        return None
    config = json.loads((path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    kind = config.get("task_type")
    if kind not in (None, "CAUSAL_LM") or not base:
        problem = f"for {kind}, not a causal language model" if base else "that names no base model"
        raise UsageError(f"{name} is a PEFT adapter {problem}: merge it into its base model (peft's "
                         "merge_and_unload) and give that")
    return base


def _check_exists(name: str, what: str) -> None:
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise UsageError(f"{what} {name} does not exist; give a model directory or a hub name")


def _not_found(name: str, what: str, exc: Exception) -> UsageError:
    where = "" if Path(name).exists() else " (no such local directory, and the hub did not provide it)"
    return UsageError(f"could not load a {what} from {name}{where}: {one_line(exc)}; give a model directory "
                      "(config.json, weights and tokenizer files), a .gguf file or a hub name")


def one_line(exc: Exception, limit: int = 300) -> str:
    """A library's error message on one line (some end their first line with a colon and list the
    rest below), cut at `limit` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Tokenizer with left padding (for batched generation) and a pad token (EOS if it had none)."""
    from transformers import AutoTokenizer

    _check_exists(name, "tokenizer")
    if (base := adapter_base(name)) is not None and not (Path(name).expanduser() / "tokenizer_config.json").is_file():
        name = base  # an adapter saved without its tokenizer uses its base model's
    source, extra = pretrained_source(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        raise _not_found(name, "tokenizer", exc) from None
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    """Left padding (for batched generation) and a pad token (EOS if it had none), in place."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Any id will do: masks come from positions, and padding sits only where the mask is 0.
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
        log.info("tokenizer %s has no pad token; padding with %r", tokenizer.name_or_path, fallback)
        tokenizer.pad_token = fallback
    return tokenizer


def load_causal_lm(name: str, trust_remote_code: bool = False, dtype: str = "float32", what: str = "model"):
    """An `AutoModelForCausalLM` with dropout switched off (RL log-ratios must be deterministic).

    `dtype` is a torch dtype name or "auto" (as saved); training wants float32 master weights. A PEFT
    LoRA adapter directory loads as its base model with the adapter merged in: the model it is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_exists(name, what)
    if (base := adapter_base(name)) is not None:
        return _merged_adapter(name, load_causal_lm(base, trust_remote_code, dtype, f"{what}'s base model"))
    source, extra = pretrained_source(name, what)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:
        raise _not_found(name, what, exc) from None
    saved = getattr(config, "architectures", None) or []
    if saved and not any(a.endswith(CAUSAL_LM_HEADS) for a in saved):
        # e.g. a reward model: it would load with a fresh, random language-model head
        raise UsageError(f"{what} {name} was saved as {', '.join(saved)}, not a causal language model; give a "
                         "policy (an *ForCausalLM checkpoint such as the SFT model)")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, trust_remote_code=trust_remote_code,
                                                     dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                                     **gguf_model_kwargs(extra))
    except ValueError as exc:
        raise UsageError(f"{what} {name} is not a causal language model ({type(config).__name__}): "
                         f"{one_line(exc)}") from None
    except (OSError, SafetensorError) as exc:  # weights missing, truncated or unreadable
        raise UsageError(f"could not read the weights of {what} {name}: {one_line(exc)}; give a complete "
                         "checkpoint (config.json with model.safetensors, or a .gguf file)") from None
    except pickle.UnpicklingError:  # torch's weights_only refused what the pickle would run or build
        raise UsageError(f"{what} {name}: its pytorch_model.bin holds more than tensors (code or objects a "
                         "weights-only load refuses, for safety); convert it to safetensors where you trust "
                         "it") from None
    disable_dropout(model)
    return as_plain_model(model)


def _merged_adapter(name: str, base):
    """`base` with the adapter in directory `name` merged into its weights, every weight trainable
    again (peft freezes the base; merge_and_unload leaves it so)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError(f"{name} is a LoRA adapter: reading it needs peft (pip install 'p3o[lora]')") from None
    try:
        model = PeftModel.from_pretrained(base, str(Path(name).expanduser())).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # missing or mismatched adapter weights
        raise UsageError(f"could not apply the adapter {name} to its base model: {one_line(exc)}") from None
    log.info("%s: a LoRA adapter, merged into its base model %s", name, base.name_or_path)
    return model.requires_grad_(True)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout, including attention dropout kept as a float attribute (Llama-style)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Ids that end a response: the tokenizer's EOS and its chat template's end of turn
    (`p3o.data.turns.stop_token_ids`, the same that end SFT and DPO data), plus the generation
    config's EOS ids that are special tokens of this tokenizer. A config id that is an ordinary word
    (a config left at its defaults) never ends a response."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    ids = stop_token_ids(tokenizer, [i for i in extra if i in special_ids(tokenizer)])
    vocab = model.get_input_embeddings().num_embeddings
    return [i for i in ids if 0 <= i < vocab]
