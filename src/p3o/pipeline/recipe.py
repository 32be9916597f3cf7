"""`p3o pipeline --config recipe.yaml`: SFT -> reward model -> RL on the user's own data.

A recipe is YAML with an `output_dir` and up to three sections, `sft`, `rm` and `train`, each holding
the options of that command (`p3o sft --help`, ...). The stages are chained: the reward model starts
from the SFT model and RL trains the SFT model against the reward model, unless a section names its
own. A section may carry `dataset_format: tldr|hh` to convert its dataset first (`p3o convert`);
for `sft` and `train` the converted preference rows give prompt + chosen and prompt-only data.
Every section is checked before the first stage starts.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from p3o.core.checkpoint import COSMETIC_SETTINGS
from p3o.data.converters import CONVERTERS, convert_rows
from p3o.data.formats import load_completions, load_preferences
from p3o.data.files import LOCAL_SUFFIXES, read_rows
from p3o.errors import UsageError
from p3o.models.loading import _check_exists, _looks_local
from p3o.options import did_you_mean, read_yaml_config, typed
from p3o.reward import load_reward_function
from p3o.reward.train import RewardConfig, run_rm
from p3o.rl.algorithms import get_algorithm
from p3o.rl.config import TrainConfig, derive_sizes
from p3o.rl.train import run_train
from p3o.sft.train import SFTConfig, run_sft
from p3o.utils.checkpoints import (TrainingInterrupted, latest_checkpoint, moved_along,
                                   signal_during_a_final_save, with_former_defaults)
from p3o.utils.distributed import launched_processes, launched_rank, wait_for_all
from p3o.utils.io import atomic_write_text

STAGES = ("sft", "rm", "train")


def load_recipe(path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe's stage configs (dataclasses), checked and chained, without running anything."""
    recipe = read_yaml_config(path)
    unknown = set(recipe) - {"output_dir", *STAGES}
    if unknown:
        raise UsageError(f"{path}: unknown section {sorted(unknown)[0]!r}; a recipe has output_dir, sft, rm, train")
    out = Path((overrides or {}).get("output_dir") or recipe.get("output_dir") or "")
    if not str(out):
        raise UsageError(f"{path}: give output_dir (in the recipe or as --output_dir)")
    if not any(stage in recipe for stage in STAGES):
        raise UsageError(f"{path}: a recipe needs at least one of the sections sft, rm, train")
    overrides = overrides or {}
    stages = _chain(recipe, out, path, overrides.get("overwrite", False), overrides.get("resume", False))
    return {"output_dir": out, **stages}


def _chain(recipe: dict, out: Path, path: str, overwrite: bool, resume: bool = False) -> dict[str, Any]:
    classes = {"sft": SFTConfig, "rm": RewardConfig, "train": TrainConfig}
    # a stage starts from what an earlier stage of this recipe makes, and from nothing else
    made = {"model_name_or_path": str(out / "sft")} if "sft" in recipe else {}
    defaults = {"sft": {}, "rm": dict(made),
                "train": {**made, **({"reward_model": str(out / "rm")} if "rm" in recipe else {})}}
    stages = {}
    for name in STAGES:
        if name not in recipe:
            continue
        if not isinstance(recipe[name] or {}, dict):
            raise UsageError(f"{path}: section {name} must be a mapping of options")
        section = dict(recipe[name] or {})
        fmt = section.pop("dataset_format", None)
        if fmt is not None and fmt not in CONVERTERS:
            raise UsageError(f"{path}: {name}.dataset_format must be one of {', '.join(CONVERTERS)}")
        fields = {f.name for f in dataclasses.fields(classes[name])}
        values = dict(defaults[name])
        if "reward_fn" in section:  # RL against a reward function instead of the recipe's reward model
            values.pop("reward_model", None)
        values.update(section)
        values.update(output_dir=str(out / name), overwrite=overwrite, **({"resume": True} if resume else {}))
        bad = set(values) - fields
        if bad:
            key = sorted(bad)[0]
            hint = did_you_mean(key, fields, values[key])
            raise UsageError(f"{path}: unknown option {key!r} in section {name}{hint}; see "
                             f"`p3o {name} --help`")
        try:
            stages[name] = (classes[name](**typed(classes[name], values, f"{path}: {name}")), fmt)
        except UsageError as exc:  # a check of the stage's config: say which section
            raise UsageError(exc if str(exc).startswith(str(path)) else f"{path}: section {name}: {exc}") from None
    return stages


def run_recipe(path: str, overrides: dict[str, Any] | None = None) -> Path:
    """Run the recipe's stages in order. With overrides["resume"], a stage that finished with the same
    recipe settings is kept, one interrupted after a checkpoint continues from it, and one that failed
    before any checkpoint starts again: a recipe whose last stage failed is fixed and run again
    without redoing the others."""
    recipe = load_recipe(path, overrides)
    out = recipe["output_dir"]
    check_stages(recipe, out)
    # Under a launcher every process runs the recipe; the main one writes what lies between stages,
    # and all wait for it: for the checks above before anything is written, and for converted data
    # before a stage reads it. A stage itself ends once its model is saved on every process (its
    # final barrier), so the next one never loads a model mid-save.
    main = launched_rank() == 0
    wait_for_all()
    runners = {"sft": run_sft, "rm": run_rm, "train": run_train}
    redone = False  # a stage ran: every later one runs again from the start, on its new inputs
    for name in STAGES:
        if name in recipe:
            cfg, fmt = recipe[name]
            stamp = _stage_stamp(cfg, fmt)
            if cfg.resume and not redone and _finished(cfg, name, stamp):
                if main:
                    print(f"\n== p3o pipeline: {name} finished already in {cfg.output_dir}: kept", flush=True)
                continue
            if cfg.resume and (redone or latest_checkpoint(Path(cfg.output_dir)) is None):
                cfg = dataclasses.replace(cfg, resume=False, overwrite=True)  # failed before its first checkpoint,
                #   or made from an earlier stage that has run again since
            if main:
                (Path(cfg.output_dir) / STAMP).unlink(missing_ok=True)  # not finished until it is written again
            if fmt is not None:
                cfg = _with_converted_data(cfg, fmt, name, out / "data", write=main)
                wait_for_all()
            if main:
                print(f"\n== p3o pipeline: {name} -> {cfg.output_dir}", flush=True)
            signal_during_a_final_save()  # forget an earlier run's
            runners[name](cfg)
            if main:
                atomic_write_text(Path(cfg.output_dir) / STAMP, json.dumps(stamp, indent=1, sort_keys=True))
            redone = True
            if signal_name := signal_during_a_final_save():  # the stage is complete; the rest waits
                raise TrainingInterrupted(f"stopped by {signal_name} as stage {name} finished; continue with the "
                                          "same command plus --resume")
    return out


STAMP = "pipeline_stage.json"  # a stage's recipe settings, written when it finished


def _stage_stamp(cfg, fmt: str | None) -> dict:
    """What a stage was asked for (before a stage resolves or caps anything), less what does not change
    its model; the data as the recipe names it, with its format. And where the stage was (output_dir,
    not compared): paths into the pipeline's folder are compared relative to it, so a moved pipeline resumes."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in COSMETIC_SETTINGS}
    return json.loads(json.dumps({**settings, "dataset_format": fmt, "output_dir": cfg.output_dir}))


def _finished(cfg, stage: str, stamp: dict) -> bool:
    """The stage finished with these recipe settings; one that finished with others is refused (resuming
    over it would mix runs)."""
    path = Path(cfg.output_dir) / STAMP
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    saved = with_former_defaults(saved, stamp)  # a stamp from before a setting existed: its former value
    moved = moved_along(saved, saved.get("output_dir"), stamp["output_dir"])  # older stamps lack it: as they are
    changed = sorted(k for k in set(saved) | set(stamp)
                     if k != "output_dir" and saved.get(k) != stamp.get(k) and moved.get(k) != stamp.get(k))
    if changed:
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {stamp.get(k)!r}" for k in changed[:3])
        raise UsageError(f"--resume: stage {stage} finished in {cfg.output_dir} with other settings ({detail}); "
                         "pass --overwrite to run it again, or use another output_dir")
    return True


def check_stages(recipe: dict, out: Path, processes: int | None = None) -> None:
    """What each stage will read and write, checked before the first stage runs: a mistake in the
    train section is reported before hours of SFT, not after. `processes`: of the launch (default:
    this one's)."""
    made = []  # what the earlier stages of this recipe will write
    processes = processes or launched_processes()
    precisions = {name: recipe[name][0].mixed_precision for name in STAGES if name in recipe}
    if processes > 1 and len(set(precisions.values())) > 1:  # accelerate keeps one state per launched process
        detail = ", ".join(f"{name} {value}" for name, value in precisions.items())
        raise UsageError(f"on {processes} processes every stage must use the same mixed_precision ({detail}): "
                         "set it alike in every section")
    for name in STAGES:
        if name not in recipe:
            continue
        cfg, fmt = recipe[name]
        check_inputs(name, cfg, fmt, made, processes, where=f"{name}: ")
        made.append(Path(cfg.output_dir))
        stage_out = Path(cfg.output_dir)
        if cfg.resume:  # a finished stage whose settings changed: refused before any stage runs
            _finished(cfg, name, _stage_stamp(cfg, fmt))
        if stage_out.is_dir() and any(stage_out.iterdir()) and not (cfg.overwrite or cfg.resume):
            raise UsageError(f"{name}: {stage_out} is not empty; pass --overwrite to replace its files, or choose "
                             "another --output_dir")


def check_inputs(stage: str, cfg, fmt: str | None = None, made: list[Path] = (), processes: int | None = None,
                 where: str = "") -> None:
    """A stage's models, data files and their rows, reward functions and batch sizes (on `processes`),
    as the stage will read them; paths under `made` (earlier stages' outputs) are not there yet."""
    processes = processes or launched_processes()
    for flag in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path", "reward_model"):
        value = getattr(cfg, flag, None)
        for path in [value] if isinstance(value, str) else value or []:
            if not any(Path(path).resolve().is_relative_to(m.resolve()) for m in made):
                _check_exists(path, f"{where}--{flag}")
    for flag in ("dataset", "eval_dataset"):
        data = getattr(cfg, flag, None)
        if data and (_looks_local(data) or data.endswith(LOCAL_SUFFIXES)) and not Path(data).exists():
            raise UsageError(f"{where}--{flag} {data} does not exist; give a data file or a `datasets` name")
        if data and fmt is None and Path(data).is_file():  # its rows as the stage will read them, now
            _check_rows(stage, cfg, data, held_out=flag == "eval_dataset")
    for flag in ("reward_fn", "monitor_reward_fn"):
        value = getattr(cfg, flag, None)
        for spec in [value] if isinstance(value, str) else value or []:
            load_reward_function(spec)
    if isinstance(cfg, TrainConfig):
        derive_sizes(cfg, processes)


def _check_rows(stage: str, cfg, data: str, held_out: bool) -> None:
    """A local data file read as `stage` will read it (columns, formats, empty replies), before any
    stage runs; the prompts of an RL stage (held-out ones too, DPO's included) only for their column."""
    if stage == "sft":
        load_completions(data, prompt_column=cfg.prompt_column, completion_column=cfg.completion_column)
    elif stage == "rm" or (not held_out and get_algorithm(cfg.algo).offline):
        load_preferences(data, prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                         rejected_column=cfg.rejected_column)
    else:
        rows = read_rows(data)
        if rows and cfg.prompt_column not in rows[0]:
            raise UsageError(f"{stage}: {data} has no column {cfg.prompt_column!r} (columns: {', '.join(rows[0])}); "
                             "set prompt_column in the recipe")


def _with_converted_data(cfg, fmt: str, stage: str, data_dir: Path, write: bool = True):
    """Convert the stage's dataset with `p3o convert`'s converter and point the stage at the result
    (written by the main process only: `write`)."""
    target = data_dir / f"{stage}-{fmt}.jsonl"
    if write:  # the other processes only need its path
        rows, _ = convert_rows(fmt, read_rows(cfg.dataset, cfg.dataset_split, cfg.dataset_config), cfg.dataset)
        if stage == "sft":
            rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        elif stage == "train" and not get_algorithm(cfg.algo).offline:  # DPO learns the pairs themselves
            rows = [{"prompt": r["prompt"]} for r in rows]
        data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return dataclasses.replace(cfg, dataset=str(target), dataset_split="train", dataset_config=None)
