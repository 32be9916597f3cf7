"""Run-directory writes that never leave a half-written file behind."""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from p3o.errors import UsageError

RUN_FILES = ("config.yaml", "metrics.jsonl", "completions.jsonl", "eval.jsonl")  # what a run writes before a step
TRACKER_DIR = "p3o"  # accelerate's trackers write under output_dir/p3o


def _refuse_overwriting_inputs(output_dir: str, inputs: dict[str, str | None]) -> None:
    out = Path(output_dir).resolve()
    for flag, value in inputs.items():
        if value and Path(value).exists() and Path(value).resolve() == out:
            raise UsageError(f"--output_dir is the same directory as --{flag}; choose another so the input is kept")


def _remove_partial_run(out: Path, existed: bool) -> None:
    """Undo a run that failed before its first step: its run files, and the directory if it made it."""
    if existed:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / TRACKER_DIR, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)


def remove_earlier_checkpoints(out: Path, inputs: dict[str, str | None]) -> None:
    """A run started from step 0 over an earlier one (--overwrite) removes that run's checkpoints
    (and its unfinished temporary ones): --resume would continue from them, and --save_total_limit
    would keep them instead of the new run's. One that holds an input of this run is refused instead."""
    stale = [p for pattern in ("checkpoint-*", ".checkpoint-*.tmp", ".saving-*") for p in out.glob(pattern)
             if p.is_dir()]
    for flag, value in inputs.items():
        where = Path(value).resolve() if value and Path(value).exists() else None
        for path in stale:
            if where is not None and where.is_relative_to(path.resolve()):
                raise UsageError(f"--{flag} {value} is in {path}, a checkpoint of the run in --output_dir that "
                                 "--overwrite would remove; copy it elsewhere first, or choose another --output_dir")
    for path in stale:
        if path.is_symlink():  # rmtree leaves a link in place (and says nothing)
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
    if stale:
        logging.getLogger("p3o").warning("--overwrite: removed %d checkpoint folder(s) of the run that was in %s",
                                         len(stale), out)


@contextlib.contextmanager
def run_directory(output_dir: str, overwrite: bool, inputs: dict[str, str | None], clean_up: bool = True,
                  fresh: bool = False):
    """The run's output directory, checked before anything is loaded: never one of the inputs, and
    non-empty only with `overwrite`. A run that fails before writing a metrics line removes what it
    wrote, so that running the same command again is not refused. `fresh`: the run starts from step
    0, so checkpoints an earlier run left there go (`remove_earlier_checkpoints`)."""
    _refuse_overwriting_inputs(output_dir, inputs)
    out = Path(output_dir)
    existed = out.exists()
    prepare_output_dir(output_dir, overwrite)
    if fresh and existed:
        remove_earlier_checkpoints(out, inputs)
    try:
        yield out
    except BaseException:
        logged = (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size
        saved = any((p / "trainer_state.json").is_file() for p in out.glob("checkpoint-*"))  # e.g. Ctrl-C's
        if clean_up and not logged and not saved:
            _remove_partial_run(out, existed)
        raise


def check_writable(folder: str | Path, flag: str = "--output_dir") -> None:
    """`folder` (an output directory, or the one an output file goes in) is a folder, or can be made one,
    that this user can write into. Checked before the work, so a run or an evaluation is not computed
    only to fail at its first write."""
    existing = Path(folder).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder; choose another place")
    if not _writable(existing):
        raise UsageError(f"{flag} {folder}: {existing} is not writable by this user; choose a place you can write to")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_output_dir(output_dir: str, overwrite: bool, inputs: dict[str, str | None]) -> None:
    """`run_directory`'s checks alone, creating nothing: before anything expensive is loaded."""
    _refuse_overwriting_inputs(output_dir, inputs)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; give a directory")
    check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise _not_empty(output_dir)


def prepare_output_dir(path: str, overwrite: bool) -> Path:
    """Create `path`; refuse a non-empty one unless `overwrite` (then only same-named files change)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {path} is a file; give a directory")
    check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise _not_empty(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _not_empty(path: str) -> UsageError:
    resume = (", --resume to continue from its latest checkpoint (in Python: train(resume_from_checkpoint=True))"
              if any(Path(path).glob("checkpoint-*")) else "")
    return UsageError(f"--output_dir {path} is not empty; pass --overwrite to replace its files{resume}, or choose "
                      "a new directory")


@functools.cache
def _umask() -> int:
    """The process's umask, read once (reading it sets it for a moment, which a thread forking then
    would pass on)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def with_umask_modes(directory: Path) -> None:
    """Give `directory` and everything in it the modes the umask allows (files 0666, folders 0777,
    less the umask), as `open()` would have: safetensors writes weights 0600 and `mkdtemp` makes 0700
    folders, which would otherwise outlive the rename into place."""
    mask = _umask()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():  # a link's target may lie outside
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename: as open() would make it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a crash loses at most the current line.
    A new file unless `append` (a resumed run continues its files)."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self.fh = path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def out_of_space(path: Path, exc: BaseException, what: str) -> UsageError | None:
    """One line for a write into `path` that failed because its disk is full, else None. torch and
    tokenizers report a full disk in errors of their own, not as OSError: their words count, torch's
    short write ("unexpected pos") only where the disk is in fact (nearly) full."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    full = (any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
            or "No space left on device" in text or "os error 28" in text)
    if not full and "unexpected pos" in text:
        try:
            full = shutil.disk_usage(path).free < 64 * 2**20
        except OSError:
            pass
    if not full:
        return None
    return UsageError(f"no space left on the device of {path} while writing {what}: free some space, then run "
                      "the same command with --resume (it continues from the last complete checkpoint)")


def save_pretrained_atomically(model, tokenizer, out: Path, state_dict=None, save_function=None,
                               extra_tensors: dict[str, dict] | None = None) -> None:
    """`save_pretrained` (safetensors) into a temporary directory, then move each file into `out`.
    `extra_tensors` maps further file names to state dicts saved beside it (e.g. PPO's value head)."""
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".saving-"))
    try:
        kwargs = {"state_dict": without_aliases(model, state_dict)} if state_dict is not None else {}
        if save_function is not None:
            kwargs["save_function"] = save_function
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        with_umask_modes(tmp)
        # Weights last: a directory whose weights file exists has everything else already.
        for item in sorted(tmp.iterdir(), key=lambda p: p.name.endswith((".safetensors", ".safetensors.index.json"))):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    except Exception as exc:
        if (full := out_of_space(out, exc, "the model")) is not None:  # asked before `finally` frees the space
            raise full from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def without_aliases(model, state_dict: dict) -> dict:
    """Drop the second names of tied parameters (lm_head = embeddings): a gathered state dict (FSDP)
    holds them as separate copies, which `save_pretrained` could not recognise as one tensor."""
    aliases = ({n for n, _ in model.named_parameters(remove_duplicate=False)}
               - {n for n, _ in model.named_parameters()})
    return {k: v for k, v in state_dict.items() if k not in aliases}


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of a run's JSONL file up to `max_step` (a resumed run rewrites what came after
    its checkpoint); a torn last line from a crash is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= max_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
