"""Checkpoint directories shared by every training command: found, written atomically, rotated.

A checkpoint is `output_dir/checkpoint-<step>/`, complete only once its state file exists; it is
written into a hidden temporary directory, every file fsynced, then renamed into place, so a crash
mid-write never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Callable

import torch

from p3o.errors import AlreadyFinished, UsageError
from p3o.utils.distributed import launched_rank, sum_across_processes
from p3o.utils.io import RUN_FILES, TRACKER_DIR, out_of_space, with_umask_modes

STATE_FILE = "trainer_state.json"
PATTERN = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger("p3o")


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first (a temporary or half-written one never matches)."""
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := PATTERN.match(p.name))
             and (p / STATE_FILE).is_file()] if out.is_dir() else []
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def write_checkpoint(out: Path, step: int, write: Callable[[Path], None], limit: int | None) -> Path:
    """`write(tmp)` fills a temporary directory (the state file last); it is fsynced and renamed to
    checkpoint-<step>, and only the newest `limit` checkpoints are kept."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        with_umask_modes(tmp)
        _fsync_tree(tmp)
    except Exception as exc:  # a half-written checkpoint must not keep the disk full
        full = out_of_space(out, exc, final.name)  # before the space is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from exc
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(out)
    for old in checkpoints(out)[:-limit] if limit else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict:
    """Global RNG states as plain lists and tensors, so that `torch.load(weights_only=True)` reads them."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def same_setting(a, b) -> bool:
    """Equal settings; one value and a list of just it are the same (config.yaml files written before
    reward_fn and reward_model took several values hold one string)."""
    return a == b or (isinstance(b, list) and b == [a]) or (isinstance(a, list) and a == [b])


# Settings added since older versions whose new default acts differently: what a run whose
# config.yaml lacks one ran with (it is compared as that value, not skipped).
FORMER_DEFAULTS = {"assistant_turns": "last"}


def with_former_defaults(saved: dict, current: dict) -> dict:
    """A run's saved settings with the values older versions ran with where it lacks one that
    `current` (the same kind of run now) has."""
    return {**{k: v for k, v in FORMER_DEFAULTS.items() if k in current}, **saved}


def moved_along(saved: dict, old_output_dir, new_output_dir) -> dict:
    """`saved` settings with the paths that lay beside the run's old output directory (in its parent:
    a pipeline's earlier stages, sibling runs) and are gone from there taken to the same place beside
    the new one: a run directory moved together with its neighbours resumes. A path still at its old
    place is kept (a copied run resumes from its inputs where they are, not from whatever lies at the
    same place beside the copy)."""
    if not (isinstance(old_output_dir, str) and isinstance(new_output_dir, str)):
        return saved
    old_root, new_root = Path(old_output_dir).parent, Path(new_output_dir).parent
    if old_root == new_root or not old_root.parts or old_root == Path(old_root.anchor):  # unmoved; or too wide
        return saved

    def moved(value):
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str) and value and Path(value).is_relative_to(old_root) and not Path(value).exists():
            return str(new_root / Path(value).relative_to(old_root))
        return value

    return {k: moved(v) for k, v in saved.items()}


def check_resumable(saved: dict, current: dict, changeable: set[str]) -> None:
    """Refuse to resume with settings that would change the trajectory."""
    # Settings one side lacks were added (or removed) by another p3o version since the run started:
    # not a change the user made, so a run resumes across versions (unless the default acts
    # differently from the older versions: FORMER_DEFAULTS).
    saved = with_former_defaults(saved, current)
    moved = moved_along(saved, saved.get("output_dir"), current.get("output_dir"))
    changed = sorted(k for k in set(saved) & set(current)
                     if k not in changeable and not same_setting(saved.get(k), current.get(k))
                     and not same_setting(moved.get(k), current.get(k)))
    if changed:
        detail = ", ".join(f"--{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise UsageError(f"--resume: the run was started with other settings ({detail}); resume with the "
                         "settings in its config.yaml, or start a new --output_dir")


def resume_point(output_dir: str, current: dict | None, changeable: set[str]) -> Path | None:
    """The latest complete checkpoint in `output_dir` for --resume, its run's config.yaml checked
    against `current` (unless None: the caller checks later); None (start from the beginning) when
    the directory is empty or absent."""
    import yaml

    out = Path(output_dir)
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        if _finished(out):
            if current is not None:  # the same command again, not another run's
                check_resumable(yaml.safe_load((out / "config.yaml").read_text()), current, changeable)
            raise AlreadyFinished(f"{out} holds a finished run (its model and card are saved) and no checkpoint to "
                                  "continue from: nothing to do (to train it further, run with --save_steps)")
        if not _started_only(out):
            raise UsageError(f"--resume: {out} holds no complete checkpoint (checkpoint-N with {STATE_FILE}) to "
                             "continue from; run without --resume and with --overwrite to start again")
        # Empty, or a start stopped before its first checkpoint: a requeued job may always pass --resume.
        log.info("--resume: %s has no checkpoint yet; starting from the beginning", out)
        return None
    if current is not None and (out / "config.yaml").is_file():
        check_resumable(yaml.safe_load((out / "config.yaml").read_text()), current, changeable)
    log.info("resuming from %s", checkpoint)
    return checkpoint


def resumable(out: Path) -> bool:
    """Whether --resume takes `out`: it holds a checkpoint, a finished run (nothing to do), or only
    what a start that stopped before its first checkpoint wrote (it starts over), or nothing."""
    return latest_checkpoint(out) is not None or _finished(out) or _started_only(out)


def _finished(out: Path) -> bool:
    return all((out / name).is_file() for name in ("config.yaml", "README.md")) and any(out.glob("model*.safetensors"))


def _started_only(out: Path) -> bool:
    return not out.is_dir() or all(_written_before_a_checkpoint(p.name) for p in out.iterdir())


def _written_before_a_checkpoint(name: str) -> bool:
    """Whether a run writes `name` into its output directory before its first checkpoint (its logs,
    the trackers' folder, temporary files): a directory holding only these has nothing to resume."""
    return (name in (*RUN_FILES, TRACKER_DIR) or (name.startswith(".") and name.endswith(".tmp"))
            or name.startswith(".saving-"))


def given_checkpoint(path: str | Path, current: dict, changeable: set[str]) -> Path:
    """A checkpoint directory named directly (`train(resume_from_checkpoint=DIR)`): complete, and
    written by a run with the same settings as `current` (its config.yaml beside it), as --resume checks."""
    import yaml

    checkpoint = Path(path)
    if not (checkpoint / STATE_FILE).is_file():
        raise UsageError(f"resume_from_checkpoint: {checkpoint} is not a complete checkpoint (a checkpoint-N "
                         f"directory with {STATE_FILE}); give one, or True for the latest in output_dir")
    if (checkpoint.parent / "config.yaml").is_file():
        check_resumable(yaml.safe_load((checkpoint.parent / "config.yaml").read_text()), current, changeable)
    return checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: a checkpoint was saved; the message says how to resume."""




_FINISHED_UNDER: list[str] = []  # signals that came during a final save, for `signal_during_a_final_save`


def signal_during_a_final_save() -> str | None:
    """The signal that came during the last run's final save, if one did (read once)."""
    signal_name = _FINISHED_UNDER[-1] if _FINISHED_UNDER else None
    _FINISHED_UNDER.clear()
    return signal_name


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current step (and save a checkpoint); a second
    Ctrl-C stops at once."""

    def __init__(self):
        self.requested: str | None = None

    @contextlib.contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, device) -> bool:
        """Whether any process has been asked to stop. Several processes must all stop (and save) at
        the same step, whichever got the signal first: a collective, called by all at every step."""
        import torch

        asked = sum_across_processes(torch.tensor([float(self.requested is not None)], device=device)).item() > 0
        if asked and self.requested is None:
            self.requested = "a signal to another process"
        return asked

    def finished_anyway(self, out: Path) -> None:
        """The signal came during the final save, which finished: the run is complete (exit 0, so a
        requeued `--resume` finds a finished run). What runs several (a pipeline) stops after it:
        `signal_during_a_final_save`."""
        log.log(_one_voice(), "%s came during the final save, which finished first: the run in %s is complete",
                self.requested, out)
        _FINISHED_UNDER.append(self.requested)

    def interrupted(self, step: int, path: Path) -> TrainingInterrupted:
        return TrainingInterrupted(f"stopped by {self.requested} after step {step}; checkpoint saved to {path}. "
                                   "Continue with the same command plus --resume")

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.log(_one_voice(), "%s: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
                self.requested)


def _one_voice() -> int:
    """A signal reaches every process of a launch alike: the main one says what happens (a warning),
    the others log it at INFO, which they do not show."""
    return logging.WARNING if launched_rank() == 0 else logging.INFO


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
