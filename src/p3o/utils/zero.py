"""DeepSpeed ZeRO-2/3 under `accelerate`, as p3o's update loop needs it.

p3o drives the DeepSpeed engine itself (see `distributed.backward` and `distributed.clip_and_step`):
accelerate's DeepSpeed `backward` steps the engine after every micro-batch it is not told to
accumulate, while p3o accumulates a minibatch's micro-batches, divides by the global normaliser
itself and counts skipped steps. So DeepSpeed gets gradient_accumulation_steps 1 (no loss scaling),
p3o's clipping, and a boundary flag per micro-batch.

Checkpoints hold the optimiser state whole and keyed by parameter name (torch's full optimiser state
dict), gathered and scattered with DeepSpeed's `safe_get_full_optimizer_state` /
`safe_set_full_optimizer_state`, so they resume under DeepSpeed, FSDP2, DDP or one process, on any
number of processes. Where those helpers do not reach (three gaps in DeepSpeed 0.19.8, the version
`constraints.txt` tests, and ZeRO-3's map of sub-groups to groups), DeepSpeed's internals are
used, each named where it is used: the test suite fails if a new DeepSpeed moves them.
"""
from __future__ import annotations

import contextlib

import torch

from p3o.errors import UsageError

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides its step count


def configure(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """Before `prepare`: what p3o's update loop needs of the DeepSpeed config, and one clear line for
    what it cannot honour. `micro_batch` is only DeepSpeed's bookkeeping (p3o feeds the engine itself)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UsageError(f"the DeepSpeed config has a {section!r} section, but p3o builds its own AdamW and "
                             "learning-rate schedule (--learning_rate, --lr_scheduler_type): remove the section")
    zero = config.setdefault("zero_optimization", {})
    for offload in ("offload_optimizer", "offload_param"):
        if zero.get(offload, {}).get("device", "none") != "none":
            raise UsageError(f"DeepSpeed {offload} is not supported by p3o yet: set its device to none, or use "
                             "--accelerate_config zero3 (ZeRO-3 shards weights, gradients and optimiser state)")
    config["gradient_accumulation_steps"] = 1
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["train_batch_size"] = micro_batch * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm  # 0: none
    zero["stage3_gather_16bit_weights_on_model_save"] = True  # whole weights for saving under ZeRO-3
    accelerator.gradient_accumulation_steps = 1


@contextlib.contextmanager
def loading_whole(accelerator):
    """Under ZeRO-3 transformers' `from_pretrained` partitions the weights as it loads them (zero.Init:
    accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says), and a
    partitioned policy cannot be copied into p3o's frozen reference. Load whole; `prepare` partitions."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def full_optimizer_state(engine) -> dict:
    """ZeRO's partitioned AdamW state gathered whole by parameter name (a collective), in the layout of
    torch's full optimiser state dict. Only the main process, which writes it, keeps the moments:
    the others would hold a whole copy of them in CPU memory for nothing."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero, names = engine.optimizer, {id(p): n for n, p in engine.module.named_parameters()}
    keep = engine.global_rank == 0
    _link_optimizer_state(zero)
    step = next((int(s["step"]) for s in zero.optimizer.state.values() if "step" in s), 0)
    state, param_groups = {}, []
    for params, live in zip(_groups(zero), zero.param_groups, strict=True):
        param_groups.append({**{k: v for k, v in live.items() if k != "params"}, "params": [names[id(p)] for p in params]})
        for param in params:
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 parameters are empty outside a gather
            moments = {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}  # every process calls it
            if keep:
                state[names[id(param)]] = {"step": torch.tensor(float(step)),
                                           **{key: value.reshape(shape).cpu() for key, value in moments.items()}}
    return {"state": state, "param_groups": param_groups}


def load_optimizer_state(engine, state: dict) -> None:
    """The inverse of `full_optimizer_state`: each process keeps its partition of every moment."""
    zero, device = engine.optimizer, engine.device
    flats = _fp32_partitions(zero)
    for flat in flats:  # AdamW makes its state at its first step: make it now, so there is somewhere to load
        if not zero.optimizer.state[flat]:
            zero.optimizer.state[flat].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat),
                                              exp_avg_sq=torch.zeros_like(flat))
    _link_optimizer_state(zero)
    for name, param in engine.module.named_parameters():
        if name in state["state"]:
            for key in MOMENTS:
                _set_full(param, state["state"][name][key].to(device), key)
    step = float(next(iter(state["state"].values()))["step"])
    for flat in flats:
        zero.optimizer.state[flat]["step"] = torch.tensor(step)
    for live, saved in zip(zero.param_groups, state["param_groups"]):
        live["lr"] = saved["lr"]


def load_module_state(engine, state: dict) -> None:
    """Some of the engine's parameters from whole tensors: the module's copy and ZeRO's fp32 master
    copy, which the next step would otherwise write back over them."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise UsageError(f"the checkpoint holds tensors this model does not have: {', '.join(unexpected)}")
    for name, value in state.items():
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):  # ZeRO-3: re-partitioned on exit
            params[name].data.copy_(value)
        _set_full(params[name], value.to(engine.device))


def _groups(zero) -> list[list[torch.nn.Parameter]]:
    """Each optimiser group's parameters: ZeRO-2's `bit16_groups`; ZeRO-3 splits a group into
    sub-groups of at most `sub_group_size` elements (`fp16_groups`), merged back here."""
    if not hasattr(zero, "sub_group_to_group_id"):
        return zero.bit16_groups
    groups = [[] for _ in zero.param_groups]
    for sub_group, params in enumerate(zero.fp16_groups):
        groups[zero.sub_group_to_group_id[sub_group]] += params
    return groups


def _fp32_partitions(zero) -> list[torch.Tensor]:
    """This process's flat fp32 master partition of each group (ZeRO-3: of each sub-group): what AdamW steps."""
    return getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat


def _set_full(param, value: torch.Tensor, key: str | None = None) -> None:
    """This process's share of a whole fp32 master weight (`key` None) or AdamW moment. DeepSpeed's
    safe_set_* fail under ZeRO-3 for a parameter with fewer elements than processes (PPO's one-element
    value-head bias: "start (1) + length (1) exceeds dimension size (1)"), so ZeRO-3 shares are
    written directly (DeepSpeed 0.19.8 internals)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not hasattr(param, "ds_id"):  # ZeRO-2
        return safe_set_full_fp32_param(param, value) if key is None else safe_set_full_optimizer_state(param, value, key)
    zero = param._z3_optimizer
    share, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    first = share.numel() * zero._get_param_partition_rank(param)
    value = torch.nn.functional.pad(value.flatten(), (0, max(0, first + share.numel() - value.numel())))
    share.data.copy_(value.narrow(0, first, share.numel()))


def _link_optimizer_state(zero) -> None:
    """ZeRO-2 links each parameter to its slice of AdamW's state once, after the first group's first
    step, when the later groups (p3o's no-decay group) have no state yet (DeepSpeed 0.19.8), and
    `safe_*_full_optimizer_state` then miss them: link again (ZeRO-3 needs no link)."""
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
