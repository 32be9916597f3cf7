"""Checkpoints of a `p3o train` run: everything needed to continue bit-for-bit, written atomically.

A checkpoint is `output_dir/checkpoint-<step>/`: the policy (safetensors, `save_pretrained`, so it
is also a usable model), PPO's value head, `optimizer.pt`, `scheduler.pt`, `rng.pt` (loaded with
`weights_only=True`) and `trainer_state.json` (step, optimiser steps, skipped updates, the KL
controller's beta). It is written into a hidden temporary directory, every file fsynced, then
renamed into place, so a crash mid-write never leaves a directory that looks complete. The data
position and every random draw follow from (seed, step) (`p3o.utils.seeding`), so the step counter
is the whole data position.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from p3o.errors import UsageError
from p3o.models.value_head import VALUE_HEAD_FILE, split_state_dict
from p3o.utils.io import atomic_write_text, save_pretrained_atomically

STATE_FILE = "trainer_state.json"
PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Settings a resumed run may change; any other difference would change the trajectory.
RESUMABLE_CHANGES = {"max_steps", "save_steps", "save_total_limit", "resume", "overwrite", "logging_steps",
                     "log_completions", "disable_progress_bar", "report_to", "max_consecutive_skips", "eval_steps"}


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first (a temporary or renamed-away one never matches)."""
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := PATTERN.match(p.name))
             and (p / STATE_FILE).is_file()] if out.is_dir() else []
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(trainer, out: Path, limit: int | None) -> Path:
    """Write checkpoint-<step> atomically and keep the newest `limit`. Every process must call it
    (gathering a sharded state dict is a collective); only the main process writes."""
    acc = trainer.accelerator
    state_dict = acc.get_state_dict(trainer.policy)
    final = out / f"checkpoint-{trainer.state.step}"
    if acc.is_main_process:
        tmp = out / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        extra = {}
        if trainer.algorithm.value_head:
            state_dict, extra[VALUE_HEAD_FILE] = split_state_dict(state_dict)
        save_pretrained_atomically(trainer.unwrapped_policy, trainer.tokenizer, tmp, state_dict=state_dict,
                                   extra_tensors=extra)
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        atomic_write_text(tmp / STATE_FILE, json.dumps(training_state(trainer), indent=1))  # last: marks it complete
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(out)
        for old in checkpoints(out)[:-limit] if limit else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def training_state(trainer) -> dict:
    s = trainer.state
    return {"step": s.step, "optimizer_steps": s.optimizer_steps, "skipped_updates": s.skipped_updates,
            "consecutive_skips": s.consecutive_skips, "kl_control": trainer.kl_control.state_dict()}


def load_training_state(trainer, path: Path) -> None:
    """Optimiser, scheduler, counters, beta and RNG from `path`; the policy (and value head) weights
    were loaded from it already, when the trainer was built."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if trainer.algorithm.value_head:
        trainer.trained_module.value_head.load_state_dict(load_file(str(path / VALUE_HEAD_FILE)))
    for name in ("step", "optimizer_steps", "skipped_updates", "consecutive_skips"):
        setattr(trainer.state, name, state[name])
    trainer.kl_control.load_state_dict(state["kl_control"])
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))


def check_resumable(saved: dict, current: dict) -> None:
    """Refuse to resume with settings that would change the trajectory."""
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        detail = ", ".join(f"--{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise UsageError(f"--resume: the run was started with other settings ({detail}); resume with the "
                         "settings in its config.yaml, or start a new --output_dir")


def _rng_state() -> dict:
    """Global RNG states as plain lists and tensors, so that `weights_only=True` can load them."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
