"""The benchmark's work, built once and shared by p3o and TRL: a tiny Llama policy per size, a
reward model of the same shape, a prompts file and a rule-based reward function.

Everything is built locally from a config (nothing is downloaded) into runs/bench/assets/<size>.
"""
from __future__ import annotations

import json
import random
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


def reward_fn(prompts, completions, **kwargs) -> list[float]:
    """How often the completion says the target word: the signature p3o's --reward_fn and TRL's
    reward_funcs both call."""
    return [float(completion.split().count(TARGET)) for completion in completions]


def asset_dir(size: str) -> Path:
    return ASSETS / size


def build_assets(size: str, num_prompts: int = 512, seed: int = 0) -> dict:
    """Build policy/, reward_model/ and prompts.jsonl for `size` unless already there; return
    their paths and parameter counts (info.json)."""
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
