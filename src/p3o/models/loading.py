"""Load Hugging Face tokenizers and causal LMs from a local directory or a hub name, safely.

Weights load through `from_pretrained` (safetensors where the checkpoint has them); remote code runs
only with `trust_remote_code=True`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from p3o.errors import UsageError

log = logging.getLogger(__name__)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def _check_exists(name: str, what: str) -> None:
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise UsageError(f"{what} {name} does not exist; give a model directory or a hub name")


def _not_found(name: str, what: str, exc: Exception) -> UsageError:
    where = "" if Path(name).exists() else " (no such local directory, and the hub did not provide it)"
    return UsageError(f"could not load a {what} from {name}{where}: {str(exc).splitlines()[0]}")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Tokenizer with left padding (for batched generation) and a pad token (EOS if it had none)."""
    from transformers import AutoTokenizer

    _check_exists(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name, "tokenizer", exc) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Any id will do: masks come from positions, and padding sits only where the mask is 0.
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
        log.info("tokenizer %s has no pad token; padding with %r", name, fallback)
        tokenizer.pad_token = fallback
    return tokenizer


def load_causal_lm(name: str, trust_remote_code: bool = False, dtype: str = "float32", what: str = "model"):
    """An `AutoModelForCausalLM` with dropout switched off (RL log-ratios must be deterministic).

    `dtype` is a torch dtype name or "auto" (as saved); training wants float32 master weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_exists(name, what)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name, what, exc) from None
    saved = getattr(config, "architectures", None) or []
    if saved and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in saved):
        # e.g. a reward model: it would load with a fresh, random language-model head
        raise UsageError(f"{what} {name} was saved as {', '.join(saved)}, not a causal language model; give a "
                         "policy (an *ForCausalLM checkpoint such as the SFT model)")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, trust_remote_code=trust_remote_code,
                                                     dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except ValueError as exc:
        raise UsageError(f"{what} {name} is not a causal language model ({type(config).__name__}): "
                         f"{str(exc).splitlines()[0]}") from None
    disable_dropout(model)
    return model


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
    from p3o.data.turns import special_ids, stop_token_ids

    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    ids = stop_token_ids(tokenizer, [i for i in extra if i in special_ids(tokenizer)])
    vocab = model.get_input_embeddings().num_embeddings
    return [i for i in ids if 0 <= i < vocab]
