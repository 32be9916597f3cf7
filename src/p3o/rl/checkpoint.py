"""Checkpoints of a `p3o train` run: everything needed to continue bit-for-bit.

`output_dir/checkpoint-<step>/` holds the policy (safetensors, `save_pretrained`, so it is also a
usable model), PPO's value head, `optimizer.pt`, `scheduler.pt`, `rng.pt` (all read back with
`weights_only=True`) and `trainer_state.json` (step, optimiser steps, skipped updates, the KL
controller's beta). The data position and every random draw follow from (seed, step)
(`p3o.utils.seeding`), so the step counter is the whole data position. All but the weights are
written and read as for every stage (`p3o.core.checkpoint`); writing is atomic.
"""
from __future__ import annotations

from pathlib import Path

from p3o.core.checkpoint import RESUMABLE_RUN_SETTINGS, load_training_checkpoint, save_training_checkpoint
from p3o.errors import UsageError
from p3o.models.lora import is_lora, load_adapter
from p3o.models.value_head import VALUE_HEAD_FILE, split_state_dict
from p3o.rl.config import trl_names
from p3o.utils.distributed import load_module_state
from p3o.utils.io import save_pretrained_atomically

# Settings a resumed run may change; any other difference would change the trajectory.
# TRL's spellings are folded into p3o's (compared there); an older run's config.yaml may hold both.
RESUMABLE_CHANGES = RESUMABLE_RUN_SETTINGS | {"max_steps"} | set(trl_names())


def resumable_changes(cfg) -> set[str]:
    """RESUMABLE_CHANGES for this run: a longer (or shorter) --max_steps continues a run exactly only
    where the learning-rate schedule does not span the run (constant, warm-up in steps)."""
    spans_the_run = cfg.lr_scheduler_type not in ("constant", "constant_with_warmup") or (
        cfg.warmup_ratio > 0 and not cfg.warmup_steps)
    return RESUMABLE_CHANGES - {"max_steps"} if spans_the_run else RESUMABLE_CHANGES


def save_checkpoint(trainer, out: Path, limit: int | None) -> Path:
    """Write checkpoint-<step>. Every process must call it (gathering a sharded state dict is a
    collective); only the main process writes."""
    acc = trainer.accelerator
    state_dict = acc.get_state_dict(trainer.policy)  # FSDP2, ZeRO-3: gathered whole (a collective)

    def write_weights(tmp: Path) -> None:
        policy_state, extra = state_dict, {}
        if trainer.with_values:
            policy_state, extra[VALUE_HEAD_FILE] = split_state_dict(state_dict)
        save_pretrained_atomically(trainer.unwrapped_policy, trainer.tokenizer, tmp, state_dict=policy_state,
                                   extra_tensors=extra)

    return save_training_checkpoint(out, trainer.state.step, trainer.state_dict(), acc, trainer.policy,
                                    trainer.optimizer, trainer.scheduler, write_weights, limit)


def load_policy_weights(trainer, path: Path) -> None:
    """The policy's weights from checkpoint `path` into the built engine (any backend). A LoRA
    checkpoint holds the adapter instead, which `load_training_state` loads."""
    from safetensors.torch import load_file

    if is_lora(trainer.unwrapped_policy):
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise UsageError(f"{path} holds no model weights (model*.safetensors); is it a p3o checkpoint?")
    state = {name: tensor for file in files for name, tensor in load_file(str(file)).items()}
    policy = trainer.unwrapped_policy
    tied = ({n for n, _ in policy.named_parameters(remove_duplicate=False)} - {n for n, _ in policy.named_parameters()})
    missing = set(policy.state_dict()) - set(state) - tied
    if missing:
        raise UsageError(f"{path} lacks weights of this policy ({sorted(missing)[0]}, ...): was it written by "
                         "another model?")
    prefix = "policy." if trainer.trained_module is not policy else ""  # PPO: the LM inside the value-head wrapper
    load_module_state(trainer.accelerator, trainer.policy, {prefix + name: t for name, t in state.items()})


def load_training_state(trainer, path: Path) -> None:
    """Optimiser, scheduler, counters, beta and RNG from `path`, a LoRA adapter and PPO's value head;
    the full policy's weights come from `load_policy_weights`.
    Written by any number of processes, it loads on any other (the optimiser state is whole)."""
    from safetensors.torch import load_file

    if is_lora(trainer.unwrapped_policy):  # the base is the initial policy; the checkpoint holds the adapter
        load_adapter(trainer.unwrapped_policy, path)
    acc = trainer.accelerator
    if trainer.with_values:  # before the optimiser state, which names the head's parameters
        head = {f"value_head.{k}": v for k, v in load_file(str(path / VALUE_HEAD_FILE)).items()}
        load_module_state(acc, trainer.policy, head)
    state = load_training_checkpoint(path, acc, trainer.policy, trainer.optimizer, trainer.scheduler)
    trainer.load_state_dict(state)
