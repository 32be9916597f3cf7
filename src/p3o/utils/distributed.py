"""The few cross-process operations p3o needs beyond what `accelerate` wraps, on `torch.distributed`.

With one process (no process group) every function here is the identity, so the pure maths that
calls them reads the same on 1 or N processes.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os

import torch

from p3o.errors import UsageError
from p3o.utils import zero


def make_accelerator(**kwargs):
    """accelerate's `Accelerator(**kwargs)`. On a machine without GPUs, a launch of several processes
    would run each process alone where accelerate finds no backend of its own: DeepSpeed is given gloo,
    and plain DDP (`ddp.yaml`, `--multi_gpu`) is run as accelerate's multi-CPU (gloo) setup. A launch
    that still ends with one process per run is refused (N runs would write one directory)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    uses = {name: os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"
            for name in ("DEEPSPEED", "FSDP")}
    launched = launched_processes()
    if uses["DEEPSPEED"] and not torch.cuda.is_available():
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    elif launched > 1 and not uses["FSDP"] and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    allow_another_precision(kwargs.get("mixed_precision"))
    accelerator = Accelerator(**kwargs)
    if launched > 1 and accelerator.num_processes == 1:
        raise UsageError(f"launched as {launched} processes, but accelerate set up each as a run of its own; on a "
                         "machine without GPUs launch with torchrun or ACCELERATE_USE_CPU=true (docs/distributed.md)")
    return accelerator


def allow_another_precision(mixed_precision: str | None) -> None:
    """accelerate keeps one state per process and refuses an `Accelerator` whose mixed precision differs
    from the first one's ("restart your runtime"). One process may run several stages, each with its
    own (the instruct demo, `p3o pipeline`, a notebook calling the trainers one after another). In a
    single process that state holds nothing else a later stage needs, so it is cleared; a distributed
    launch keeps its own."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if mixed_precision is not None and current is not None and current != mixed_precision and world_size() == 1:
        AcceleratorState._reset_state()


def wait_for_all() -> None:
    """A barrier across the processes of a launch, for code between stages (`p3o pipeline`): it
    starts torch's default group where no Accelerator has yet (nccl on GPUs, gloo otherwise, as
    accelerate would; accelerate and DeepSpeed then take the group as it is). One process: nothing."""
    if launched_processes() == 1:
        return
    dist = torch.distributed
    if not dist.is_initialized():
        on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
        dist.init_process_group(backend="gloo" if on_cpu else "nccl")
    dist.barrier()


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_process(flag: bool, device) -> bool:
    """Whether `flag` holds on any process (a collective under several processes: all must call it)."""
    if world_size() == 1:
        return bool(flag)
    return sum_across_processes(torch.tensor([float(flag)], device=device)).item() > 0


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


def launched_processes() -> int:
    """How many processes the launcher started, before any process group exists: 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shut_down() -> None:
    """Destroy the process group while the interpreter is fully alive. A gloo group still referenced
    by a DDP module when Python finalises aborts the process now and then (SIGABRT, "terminate called
    without an active exception"), so the modules go first."""
    gc.collect()  # DDP modules sit in reference cycles; free them (and their hold on the group) now
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_supported(accelerator) -> None:
    """DDP, FSDP2 and DeepSpeed ZeRO-2/3 are supported; refuse what is not, in one line, before any work."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage not in (2, 3):
        raise UsageError("DeepSpeed is supported with ZeRO stage 2 or 3 only (zero_stage in the accelerate config)")
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UsageError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                         "(as p3o's --accelerate_config fsdp has it)")


def is_deepspeed(accelerator) -> bool:
    """The model is a DeepSpeed engine, which p3o feeds and steps itself (`backward`, `clip_and_step`)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(accelerator) -> bool:
    """Parameters are split between processes (FSDP2, ZeRO-3): every forward pass is then a collective."""
    from accelerate.utils import DistributedType

    if is_deepspeed(accelerator):
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def configure_for_updates(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """Before `prepare`: DeepSpeed is told p3o's micro-batch size and clipping (see `p3o.utils.zero`);
    nothing to do otherwise."""
    if is_deepspeed(accelerator):
        zero.configure(accelerator, micro_batch, max_grad_norm)


@contextlib.contextmanager
def micro_batch(accelerator, model, last: bool):
    """Around one micro-batch's forward and backward: DDP and FSDP synchronise gradients across
    processes on a step's last micro-batch only (DeepSpeed is told in `backward`)."""
    if last or is_deepspeed(accelerator):
        yield
        return
    with accelerator.no_sync(model):
        yield


def backward(accelerator, model, loss: torch.Tensor, last: bool) -> None:
    """Accumulate `loss`'s gradients, unscaled: the caller divides by the global normaliser. A DeepSpeed
    engine is driven directly, since accelerate's backward would step it after this micro-batch."""
    if is_deepspeed(accelerator):
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss)  # its gradient_accumulation_steps is 1: no scaling
    else:
        accelerator.backward(loss)


def clip_and_step(accelerator, model, optimizer, scheduler, max_grad_norm: float, loss_finite: bool) -> tuple[float, bool]:
    """Clip the gradients to a global norm of `max_grad_norm` (0: no clipping) and step the optimiser
    and schedule, unless any process has a non-finite loss or gradient: that step is dropped on all of
    them, as it would poison the weights and Adam's moments. Gradients are cleared either way. Returns
    the norm before clipping and whether the step was taken.

    A DeepSpeed engine clips, checks and steps in one call: it drops a step whose global gradient norm
    is not finite, and does not look at the loss."""
    if is_deepspeed(accelerator):
        model.step()  # clips, steps AdamW unless the global norm is not finite, clears the gradients
        norm = model.get_global_grad_norm()
        grad_norm, stepped = (math.inf if norm is None else float(norm)), model.was_step_applied()
    else:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf))
        bad = float(not (math.isfinite(grad_norm) and loss_finite))
        stepped = sum_across_processes(torch.tensor([bad], device=accelerator.device)).item() == 0
    if stepped:
        optimizer.step()  # under DeepSpeed accelerate's wrapper steps nothing (the engine has)
        scheduler.step()  # p3o's schedule, not the engine's: it moves only with steps taken
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


@contextlib.contextmanager
def loading_whole(accelerator):
    """Models loaded in the block stay whole until `prepare` (ZeRO-3 would partition them as they load)."""
    if not (is_deepspeed(accelerator) and is_sharded(accelerator)):
        yield
        return

    with zero.loading_whole(accelerator):
        yield


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
    """The optimiser's state to save: under FSDP2 and DeepSpeed gathered whole and keyed by parameter
    name (a collective), so that it loads on any number of processes; otherwise its own state dict."""
    if is_deepspeed(accelerator):
        return zero.full_optimizer_state(model)
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(accelerator, model, optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state`: every process reads the whole state and keeps its shard.
    A state written under FSDP2 or DeepSpeed (keyed by parameter names) loads under either, DDP or one
    process; one written without (keyed by position) loads only under DDP or one process."""
    by_name = bool(state.get("state")) and isinstance(next(iter(state["state"])), str)
    if is_deepspeed(accelerator):
        if not by_name:
            raise UsageError("this checkpoint's optimiser state was written without FSDP or DeepSpeed; resume it with "
                             "DDP or one process")

        zero.load_optimizer_state(model, state)
        return
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
    if is_deepspeed(accelerator):
        zero.load_module_state(model, state)
        return
    if not is_sharded(accelerator):
        unexpected = accelerator.unwrap_model(model).load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise UsageError(f"the checkpoint holds tensors this model does not have: {', '.join(unexpected)}")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
