"""The few cross-process operations p3o needs beyond what `accelerate` wraps, on `torch.distributed`.

With one process (no process group) every function here is the identity, so the pure maths that
calls them reads the same on 1 or N processes.
"""
from __future__ import annotations

import contextlib
import gc
import os

import torch

from p3o.errors import UsageError


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


def check_supported(accelerator) -> None:
    """DDP and FSDP2 are supported; refuse what is not, in one line, before any work."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise UsageError("DeepSpeed is not supported yet: p3o steps its optimiser itself; launch with "
                         "configs/accelerate/fsdp.yaml (FSDP2 shards weights, gradients and optimiser state like "
                         "ZeRO-3) or configs/accelerate/ddp.yaml")
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UsageError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                         "(configs/accelerate/fsdp.yaml)")


def is_sharded(accelerator) -> bool:
    """Parameters are split between processes (FSDP2): every forward pass is then a collective."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def gathered(module):
    """An FSDP2 root's own parameters (embeddings, final norm, head) gathered for the block, so that
    its inner modules may be called directly (generation calls the language model inside PPO's
    wrapper, which skips the root's hooks). Nothing to do for an unsharded module."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def full_optimizer_state(accelerator, model, optimizer) -> dict:
    """The optimiser's state to save: under FSDP2 gathered whole (on the main process; a collective),
    so that it loads on any number of processes; otherwise its own state dict."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(accelerator, model, optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state`: every process reads the whole state and keeps its shard.
    A state written under FSDP2 (keyed by parameter names) loads sharded or not; one written without
    (keyed by position) loads only without."""
    by_name = bool(state.get("state")) and isinstance(next(iter(state["state"])), str)
    if not by_name and not is_sharded(accelerator):
        optimizer.load_state_dict(state)
        return
    if not by_name:
        raise UsageError("this checkpoint's optimiser state was written without FSDP; resume it with DDP or one "
                         "process (checkpoints written under FSDP resume either way)")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_module_state(accelerator, model, state: dict) -> None:
    """Load some of `model`'s parameters from whole tensors (under FSDP2 each process keeps its shard)."""
    if not is_sharded(accelerator):
        unexpected = accelerator.unwrap_model(model).load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise UsageError(f"the checkpoint holds tensors this model does not have: {', '.join(unexpected)}")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
