"""Every random draw comes from (seed, stream, step), so a run is reproducible and resumable
without carrying hidden RNG state from one step to the next."""
from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, stream: str, index: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, stream: str, index: int = 0) -> torch.Generator:
    """A CPU generator for shuffling; independent of the global RNG."""
    return torch.Generator().manual_seed(derived_seed(seed, stream, index))


def seed_global_rng(seed: int, stream: str, index: int = 0) -> None:
    """Seed the global CPU/CUDA RNGs (used by `generate`'s sampler) for one step."""
    torch.manual_seed(derived_seed(seed, stream, index))
