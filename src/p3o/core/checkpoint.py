"""What every stage's checkpoint holds beside its weights, and which settings a resume may change.

`output_dir/checkpoint-<step>/` holds the stage's weights (written by the stage), `optimizer.pt`
(whole, keyed so that it loads on any number of processes), `scheduler.pt`, `rng.pt` (all read
back with `weights_only=True`) and `trainer_state.json` (the stage's counters), written last: its
presence marks the checkpoint complete (`p3o.utils.checkpoints.write_checkpoint`, atomic).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from p3o.utils.checkpoints import STATE_FILE, rng_state, set_rng_state, write_checkpoint
from p3o.utils.distributed import full_optimizer_state, load_optimizer_state
from p3o.utils.io import atomic_write_text

# Settings that never change what a run trains: where and how often it writes and logs. Runs that
# differ only in them are the same run (a frontier sweep's, a pipeline's finished stage).
COSMETIC_SETTINGS = frozenset({"output_dir", "overwrite", "resume", "save_steps", "save_total_limit",
                               "disable_progress_bar", "logging_steps", "log_completions", "report_to"})
# Settings every stage's resumed run may change: those, when it gives up on non-finite steps and how
# often it evaluates; a stage adds its own.
RESUMABLE_RUN_SETTINGS = COSMETIC_SETTINGS | {"max_consecutive_skips", "eval_steps"}


def save_training_checkpoint(out: Path, step: int, state: dict, accelerator, model, optimizer, scheduler,
                             write_weights: Callable[[Path], None], limit: int | None) -> Path:
    """Write `out/checkpoint-<step>`: `write_weights(directory)` puts the weights (gathered by the
    caller beforehand), then the optimiser, the schedule, the RNG and `state` as trainer_state.json.
    Every process must call it (gathering a sharded optimiser state is a collective); only the main
    one writes. Keeps the newest `limit` checkpoints (None: all)."""
    optimizer_state = full_optimizer_state(accelerator, model, optimizer)

    def write(tmp: Path) -> None:
        write_weights(tmp)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1))  # last: marks it complete

    path = out / f"checkpoint-{step}"
    if accelerator.is_main_process:
        path = write_checkpoint(out, step, write, limit)
    accelerator.wait_for_everyone()
    return path


def load_training_checkpoint(path: Path, accelerator, model, optimizer, scheduler) -> dict:
    """The optimiser, the schedule and the RNG from checkpoint `path` (written on any number of
    processes); returns its trainer_state.json for the stage's counters. The weights are the
    stage's to load, first: the optimiser state names the parameters."""
    load_optimizer_state(accelerator, model, optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / STATE_FILE).read_text())
