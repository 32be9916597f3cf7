"""Run under torchrun by test_distributed.py: `p3o train`'s trainer, then every process writes its
own copy of the weights and the prompts it drew (and, with fixed responses, its first synchronised
gradient), so the tests can compare processes and process counts."""
import contextlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from p3o.cli.args import config_from_argv
from p3o.rl.config import TrainConfig
from p3o.rl.train import build_trainer
from p3o.utils.distributed import is_deepspeed, shut_down


def fixed_responses(trainer):
    """Replace sampling with a function of each prompt and the response's place in its group, so
    that runs on different numbers of processes see the same rollouts."""
    from p3o.utils.ops import response_mask_from_eos

    vocab = trainer.unwrapped_policy.get_input_embeddings().num_embeddings

    def generate(query_ids, query_mask, gen_config, stream, step, k=1):
        T = trainer.cfg.max_new_tokens
        sums = (query_ids * query_mask).sum(-1, keepdim=True)  # (B, 1)
        place = torch.arange(query_ids.shape[0], device=query_ids.device)[:, None] % k  # (B, 1)
        steps = torch.arange(T, device=query_ids.device)
        ids = (sums * (place + 1) + 7 * steps) % (vocab - 4) + 4  # (B, T), never a special token
        ends = (sums * (place + 2)) % (T + 2)  # an EOS at a prompt-dependent place (or none): ragged lengths
        ids = torch.where(steps == ends, torch.full_like(ids, trainer.eos_ids[0]), ids)
        mask = response_mask_from_eos(ids, trainer.eos_ids)
        trainer.local_tokens.append(int(mask.sum()))
        return ids, mask

    trainer.generate = generate
    trainer.local_tokens = []


def record_first_gradient(trainer, out: Path, rank: int):
    """Write the (synchronised) gradient at the first optimiser step, before Adam's sign-like step."""
    if is_deepspeed(trainer.accelerator):  # the engine's step clips and updates: read ZeRO's reduced, partitioned gradients before it
        return record_first_deepspeed_gradient(trainer, out, rank)
    step, module = trainer.optimizer.step, trainer.trained_module

    def record_then_step(*args, **kwargs):
        path = out / f"grad{rank}.safetensors"
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}  # FSDP: gathered
        if not path.exists():
            save_file({n: g.detach().contiguous().clone() for n, g in grads.items()}, str(path))
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step


def record_first_deepspeed_gradient(trainer, out: Path, rank: int):
    from deepspeed.utils import safe_get_full_grad

    engine, path = trainer.policy, out / f"grad{rank}.safetensors"
    step = engine.step

    def record_then_step(*args, **kwargs):
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}  # a collective (every rank)
        grads = {n: g.detach().reshape(getattr(p, "ds_shape", p.shape)).clone()
                 for (n, g), p in zip(grads.items(), engine.module.parameters()) if g is not None}
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        if trainer.cfg.max_grad_norm > 0:  # as clipped inside the step (and by clip_grad_norm_ without DeepSpeed)
            grads = {n: g * min(1.0, trainer.cfg.max_grad_norm / (float(norm) + 1e-6)) for n, g in grads.items()}
        if not path.exists():
            save_file({n: g.contiguous() for n, g in grads.items()}, str(path))
        return step(*args, **kwargs)

    engine.step = record_then_step


def record_sharding(trainer, out: Path, rank: int) -> None:
    """How many of each parameter's elements this process holds (FSDP: about a share)."""
    held = {name: (p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p).numel()
            for name, p in trainer.trained_module.named_parameters()}
    (out / f"held{rank}.json").write_text(json.dumps(held))


def poison_loss(trainer) -> None:
    """This process's loss is NaN (so are its gradients): every process must skip the step."""
    import dataclasses

    algorithm = trainer.algorithm

    def poisoned(batch, outputs, cfg):
        losses, stats = algorithm.loss(batch, outputs, cfg)
        return losses * float("nan"), stats

    trainer.algorithm = dataclasses.replace(algorithm, loss=poisoned)


@contextlib.contextmanager
def zero_config(overrides: dict):
    """For one run: entries of DeepSpeed's zero_optimization config beyond what p3o sets (the plugin's
    config outlives the run in this process, so they are taken out again)."""
    from p3o.utils import zero

    configure = zero.configure

    def configured(accelerator, *args):
        configure(accelerator, *args)
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].update(overrides)

    zero.configure = configured
    try:
        yield
    finally:
        zero.configure = configure
        from accelerate.state import AcceleratorState

        if overrides and AcceleratorState().deepspeed_plugin is not None:
            for key in overrides:
                AcceleratorState().deepspeed_plugin.deepspeed_config["zero_optimization"].pop(key, None)


def run(out: Path, fixed: bool, argv: list[str], poison_rank: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if argv[0] in ("train", "sft", "rm"):  # the whole command, as `p3o` runs it (but leaving the process group up)
        from p3o.cli import build_parser, run_command

        run_command(build_parser().parse_args(argv))
        return
    trainer = build_trainer(config_from_argv(TrainConfig, argv))
    acc = trainer.accelerator
    if fixed:
        fixed_responses(trainer)
        record_first_gradient(trainer, out, acc.process_index)
    if poison_rank == acc.process_index:
        poison_loss(trainer)
    history = trainer.train()
    rank = acc.process_index
    state = acc.get_state_dict(trainer.policy)  # whole on the main process (a collective under FSDP)
    if acc.is_main_process:
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))
    if not acc.is_main_process and not trainer.sharded:  # each process's own copy, to compare
        state = {k: v.detach().contiguous().clone() for k, v in trainer.trained_module.state_dict().items()}
        save_file(state, str(out / f"rank{rank}.safetensors"))
    record_sharding(trainer, out, rank)
    record = {"processes": acc.num_processes, "prompts": [trainer.prompt_indices(s) for s in range(trainer.cfg.max_steps)],
              "reward": [m["reward"] for m in history], "local_tokens": getattr(trainer, "local_tokens", None),
              "zero_stage": acc.state.deepspeed_plugin.zero_stage if is_deepspeed(acc) else None,
              "skipped_updates": trainer.state.skipped_updates, "optimizer_steps": trainer.state.optimizer_steps}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()


def force_fsdp_on_cpu() -> None:
    """FSDP2 as p3o/accelerate_configs/fsdp.yaml asks for it, on CPU: torch shards on CPU, but accelerate
    turns FSDP on only for GPU process types, so every Accelerator built from here on is switched
    to it after construction (the processes, the device and gloo stay as accelerate set them)."""
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class FSDPOnCPU(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for shared in (PartialState._shared_state, self.state._shared_state):  # both, or a later copy reverts it
                shared["distributed_type"] = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT")

    accelerate.Accelerator = FSDPOnCPU


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed on CPU builds its shared-memory collectives op on first use (a C++ JIT build of 20-45 s
    on a fresh machine): plain gloo collectives instead. p3o itself gives DeepSpeed gloo on CPU
    (p3o.utils.distributed.make_accelerator)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def forget_deepspeed_config() -> None:
    """A `p3o` command is one per process: its Accelerator's DeepSpeed config (which transformers then
    applies to every model it loads, partitioning it under ZeRO-3) must not outlive the run."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def main() -> None:
    """argv: an output directory and a JSON file of runs, each {"name", "fixed", "argv"}: one launch
    runs them all in turn (a launch costs seconds of imports; a tiny run far less). With
    P3O_TEST_FSDP=1 every run is sharded with FSDP2; with ACCELERATE_USE_DEEPSPEED, with ZeRO."""
    import os

    if os.environ.get("P3O_TEST_FSDP") == "1":
        force_fsdp_on_cpu()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":  # launched with p3o/accelerate_configs/zero*.yaml
        skip_deepspeed_shm_build()
    out, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    for spec in runs:
        with zero_config(spec.get("zero_optimization", {})):
            run(out / spec["name"], spec["fixed"], spec["argv"], spec.get("poison_rank"))
        forget_deepspeed_config()
    shut_down()  # as `p3o` does: a gloo group freed while Python finalises may abort the process


if __name__ == "__main__":
    main()
