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
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage not in (2, 3):
        raise UsageError("DeepSpeed is supported with ZeRO stage 2 or 3 only (zero_stage in the accelerate config)")
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UsageError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                         "(configs/accelerate/fsdp.yaml)")


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(accelerator) -> bool:
    """Parameters are split between processes (FSDP2, ZeRO-3): every forward pass is then a collective."""
    from accelerate.utils import DistributedType

    if is_deepspeed(accelerator):
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def loading_whole(accelerator):
    """Under ZeRO-3 transformers' `from_pretrained` partitions the weights as it loads them (zero.Init:
    accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says), and a
    partitioned policy cannot be copied into p3o's frozen reference. Load whole; `prepare` partitions."""
    if not (is_deepspeed(accelerator) and is_sharded(accelerator)):
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def configure_deepspeed(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """Before `prepare`: the DeepSpeed config p3o's engine needs. One engine step per minibatch with no
    loss scaling by DeepSpeed (p3o divides by the global normaliser itself), p3o's clipping, whole
    weights gatherable for saving under ZeRO-3, and a micro-batch size (only DeepSpeed's bookkeeping)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["gradient_accumulation_steps"] = 1
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["train_batch_size"] = micro_batch * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
    config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    accelerator.gradient_accumulation_steps = 1


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
    if is_deepspeed(accelerator):
        return _deepspeed_optimizer_state(accelerator, model)
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
    if is_deepspeed(accelerator):
        if not by_name:
            raise UsageError("this checkpoint's optimiser state was written without FSDP or DeepSpeed; resume it with "
                             "DDP or one process")
        _load_deepspeed_optimizer_state(accelerator, model, state)
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


def _deepspeed_optimizer_state(accelerator, engine) -> dict:
    """ZeRO's partitioned AdamW state gathered whole by parameter name (a collective), in the layout of
    torch's full optimizer state dict, so that it loads under FSDP2, DDP, one process or DeepSpeed."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero, names = engine.optimizer, {id(p): n for n, p in engine.module.named_parameters()}
    _link_zero_optimizer_state(zero)
    step = next((int(s["step"]) for s in zero.optimizer.state.values() if "step" in s), 0)
    groups = getattr(zero, "bit16_groups", None) or zero.fp16_groups  # ZeRO-2, ZeRO-3: each group's own parameters
    state, param_groups = {}, []
    for params, live in zip(groups, zero.param_groups):
        param_groups.append({**{k: v for k, v in live.items() if k != "params"}, "params": [names[id(p)] for p in params]})
        for param in params:
            shape = getattr(param, "ds_shape", param.shape)
            state[names[id(param)]] = {"step": torch.tensor(float(step)), **{
                key: safe_get_full_optimizer_state(param, key).reshape(shape).cpu() for key in ("exp_avg", "exp_avg_sq")}}
    return {"state": state, "param_groups": param_groups}


def _set_full(param, value: torch.Tensor, key: str | None = None) -> None:
    """This process's share of a whole fp32 master weight (`key` None) or AdamW moment. DeepSpeed's
    safe_set_* fail under ZeRO-3 for a parameter smaller than the processes (PPO's 1-element value-head
    bias: "start (1) + length (1) exceeds dimension size (1)"), so ZeRO-3 shares are written directly."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not hasattr(param, "ds_id"):
        return safe_set_full_fp32_param(param, value) if key is None else safe_set_full_optimizer_state(param, value, key)
    zero = param._z3_optimizer
    share, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    first = share.numel() * zero._get_param_partition_rank(param)
    value = torch.nn.functional.pad(value.flatten(), (0, max(0, first + share.numel() - value.numel())))
    share.data.copy_(value.narrow(0, first, share.numel()))


def _link_zero_optimizer_state(zero) -> None:
    """ZeRO-1/2 link each parameter to its slice of AdamW's state once, after the first group's first step,
    when the later groups (p3o's no-decay group) have no state yet (DeepSpeed 0.19.8): link again."""
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _load_deepspeed_optimizer_state(accelerator, engine, state: dict) -> None:
    zero = engine.optimizer
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat  # ZeRO-2, 3
    for flat in flats:  # AdamW's state for this process's fp32 partitions: made here before the first step
        if not zero.optimizer.state[flat]:
            zero.optimizer.state[flat].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat),
                                              exp_avg_sq=torch.zeros_like(flat))
    _link_zero_optimizer_state(zero)
    for name, param in engine.module.named_parameters():
        if name in state["state"]:
            for key in ("exp_avg", "exp_avg_sq"):
                _set_full(param, state["state"][name][key].to(accelerator.device), key)
    step = float(next(iter(state["state"].values()))["step"])
    for flat in flats:
        zero.optimizer.state[flat]["step"] = torch.tensor(step)
    for live, saved in zip(zero.param_groups, state["param_groups"]):
        live["lr"] = saved["lr"]


def load_module_state(accelerator, model, state: dict) -> None:
    """Load some of `model`'s parameters from whole tensors (under FSDP2 each process keeps its shard)."""
    if is_deepspeed(accelerator):  # the module's weights and ZeRO's fp32 master copy (ZeRO-3: gathered to write)
        import deepspeed

        params = dict(model.module.named_parameters())
        for name, value in state.items():
            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):  # 0: written back on exit
                params[name].data.copy_(value)
            _set_full(params[name], value.to(accelerator.device))
        return
    if not is_sharded(accelerator):
        unexpected = accelerator.unwrap_model(model).load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise UsageError(f"the checkpoint holds tensors this model does not have: {', '.join(unexpected)}")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
