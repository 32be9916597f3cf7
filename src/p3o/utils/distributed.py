"""The few cross-process operations p3o needs beyond what `accelerate` wraps, on `torch.distributed`.

With one process (no process group) every function here is the identity, so the pure maths that
calls them reads the same on 1 or N processes.
"""
from __future__ import annotations

import gc
import os

import torch


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_processes(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `values` over every process (a collective: all must call it)."""
    if world_size() == 1:
        return values
    total = values.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def launched_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate launch) set it, before any process
    group exists: 0 when not launched as one of several."""
    return int(os.environ.get("RANK", "0"))


def shut_down() -> None:
    """Destroy the process group while the interpreter is fully alive. A gloo group still referenced
    by a DDP module when Python finalises aborts the process now and then (SIGABRT, "terminate called
    without an active exception"), so the modules go first."""
    gc.collect()  # DDP modules sit in reference cycles; free them (and their hold on the group) now
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
