"""`p3o frontier`: sweep algorithms x beta x seeds, and draw each algorithm's KL-reward frontier.

Every run is an ordinary `p3o train` (a subprocess with one thread, so independent runs fill the
cores) that evaluates itself on held-out prompts before training, every `eval_steps` and at the end
(eval.jsonl). Each evaluation is a point (KL to the reference, proxy reward, gold reward); an
algorithm's frontier is the set of its points that no other point of the same algorithm beats with
less or equal KL (docs/p3o.md section 6). A finished run is never run again.

Output directory: base/ (the embedded task's data, SFT model and reward model), runs/<run>/ (one
`p3o train` run each, logs/<run>.log its output), points.csv (every point), frontier.png,
frontier.md (the best reward each algorithm reaches within KL budgets) and frontier.json.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from p3o.core.checkpoint import COSMETIC_SETTINGS
from p3o.errors import UsageError
from p3o.eval.plots import plot_frontier
from p3o.eval.winrate import WinrateConfig, run_winrate, win_rate_interval
from p3o.models.loading import _check_exists, _looks_local
from p3o.options import option, read_yaml_config, typed
from p3o.pipeline.demo import build_task_base
from p3o.reward import load_reward_function
from p3o.rl.algorithms import ALGORITHMS, default_setting, get_algorithm
from p3o.rl.config import P3OConfig, trl_names
from p3o.tasks import get_task
from p3o.utils.checkpoints import same_setting
from p3o.utils.io import atomic_write_text

log = logging.getLogger("p3o")
KL_BUDGETS = (0.5, 1.0, 2.0, 5.0, 10.0)  # nats: the columns of frontier.md
POINT_FIELDS = ("algo", "beta", "seed", "step", "kl", "kl_stderr", "reward", "reward_stderr", "gold", "gold_stderr",
                "length", "run")


@dataclass
class FrontierConfig:
    output_dir: str = option(None, "Sweep directory; run again to continue it (finished runs are kept).", required=True)
    task: str | None = option("summarize", "Embedded task (summarize or dialogue): its data, SFT model and reward model are built in output_dir/base. Give an empty value to sweep your own models instead.")
    quick_base: bool = option(False, "Build the embedded task's SFT model and reward model with the demo's quick sizes (faster, weaker) instead of its full ones.")
    model_name_or_path: str | None = option(None, "Your own SFT policy (when --task is empty).")
    reward_model: str | None = option(None, "Your reward model (or --reward_fn).")
    reward_fn: str | None = option(None, "Your reward function package.module:fn or file.py:fn.")
    gold_reward_fn: str | None = option(None, "A gold reward function to plot beside the proxy (the embedded tasks have one).")
    dataset: str | None = option(None, "Training prompts.")
    eval_dataset: str | None = option(None, "Held-out prompts every point is measured on.")
    preference_dataset: str | None = option(None, "Preference pairs for dpo.")
    algos: str = option("p3o-v1,p3o-v2,ppo,dpo", "Arms to sweep, comma-separated: algorithms (p3o-v1, p3o-v2, ppo, grpo, rloo, dpo, ...) or the authors' variants p3o-v1-authors and p3o-v2-authors (docs/p3o.md section 8).")
    betas: str = option("0.01,0.05,0.2", "KL coefficients of the RL algorithms, comma-separated.")
    dpo_betas: str = option("0.05,0.1,0.3", "beta_dpo values of dpo and online-dpo, comma-separated.")
    seeds: str = option("0,1", "Seeds, comma-separated; with several, each KL budget's best setting gets a bootstrap interval over seeds.")
    max_steps: int = option(80, "Steps of every run.")
    eval_steps: int = option(20, "Evaluate (add a point) every N steps of each run.")
    eval_max_prompts: int | None = option(None, "Use at most this many held-out prompts per point.")
    pairs_per_step: int = option(16, "Prompts per step of every run.")
    max_new_tokens: int = option(32, "Tokens per response.")
    learning_rate: float = option(5e-5, "Learning rate of the RL runs.")
    dpo_learning_rate: float = option(5e-5, "Learning rate of the dpo runs.")
    epochs: int = option(2, "Passes over each rollout (RL algorithms; dpo takes 1).")
    train_config: str | None = option(None, "YAML of further `p3o train` settings for every run (keys are its flags).")
    num_workers: int = option(0, "Runs in parallel, one thread each; 0: one per CPU core.")
    judge: str | None = option(None, "Judge for the win-rate table (gold:TASK, reward_model:PATH, reward_fn:SPEC, ...); default gold:TASK for an embedded task, reward_fn:GOLD with --gold_reward_fn GOLD, else no win rates.")
    winrate_prompts: int = option(200, "Held-out prompts per win rate.")
    overwrite: bool = option(False, "Retrain the runs whose directory holds a run made with other settings (without it such a sweep is refused: no run is deleted silently).")
    disable_progress_bar: bool = option(False, "Hide progress bars.")

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise UsageError("--output_dir is required")
        if not self.task:
            missing = [f"--{n}" for n in ("model_name_or_path", "dataset", "eval_dataset") if not getattr(self, n)]
            if missing or not (self.reward_model or self.reward_fn):
                raise UsageError(f"without --task, give {', '.join(missing + ['--reward_model or --reward_fn'])}")
            if "dpo" in self.algo_list and not self.preference_dataset:
                raise UsageError("--algos includes dpo: give --preference_dataset (prompt, chosen, rejected)")
        for name, kind in (("betas", float), ("dpo_betas", float), ("seeds", int)):
            try:
                [kind(x) for x in getattr(self, name).split(",")]
            except ValueError:
                raise UsageError(f"--{name} must be {kind.__name__}s separated by commas, got {getattr(self, name)!r}") from None
        for arm in self.algo_list:
            arm_algorithm(arm)
        if self.max_steps < 1 or self.eval_steps < 1:
            raise UsageError("--max_steps and --eval_steps must be at least 1")

    @property
    def algo_list(self) -> list[str]:
        return [a.strip() for a in self.algos.split(",") if a.strip()]


# Arms beside the registered algorithms: an algorithm with settings of its own. The authors' P3O
# (docs/p3o.md section 8): Delta with the live KL, clipped rewards over a running std; V1 also
# takes its K steps in a row on each minibatch.
AUTHORS = {"delta_kl": "current", "reward_normalization": "running_std"}
ARMS = {"p3o-v2-authors": ("p3o-v2", AUTHORS),
        "p3o-v1-authors": ("p3o-v1", {**AUTHORS, "update_schedule": "consecutive"})}


def arm_algorithm(arm: str):
    """The registered algorithm an arm runs (refusing an unknown name with the known ones)."""
    if arm in ARMS:
        return get_algorithm(ARMS[arm][0])
    if arm not in ALGORITHMS:
        raise UsageError(f"unknown --algos entry {arm!r}; known: {', '.join([*ALGORITHMS, *ARMS])}")
    return get_algorithm(arm)


@dataclass(frozen=True)
class Run:
    algo: str  # the arm: an algorithm or one of ARMS
    beta: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.algo}-beta{self.beta:g}-seed{self.seed}"


def check_inputs(cfg: FrontierConfig) -> None:
    """Your models, data and reward functions exist (hub names are left to the runs)."""
    for flag in ("model_name_or_path", "reward_model"):
        if getattr(cfg, flag):
            _check_exists(getattr(cfg, flag), f"--{flag}")
    for flag in ("dataset", "eval_dataset", "preference_dataset"):
        path = getattr(cfg, flag)
        if path and _looks_local(path) and not Path(path).exists():
            raise UsageError(f"--{flag} {path} does not exist; give a data file or a `datasets` name")
    for flag in ("reward_fn", "gold_reward_fn"):
        if getattr(cfg, flag):
            load_reward_function(getattr(cfg, flag))


def plan_runs(cfg: FrontierConfig) -> list[Run]:
    runs = []
    for algo in cfg.algo_list:
        betas = cfg.betas if arm_algorithm(algo).kl_penalty else cfg.dpo_betas
        runs += [Run(algo, float(b), int(s)) for b in betas.split(",") for s in cfg.seeds.split(",")]
    return runs


def run_frontier(cfg: FrontierConfig) -> dict:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; give a directory")
    runs = plan_runs(cfg)
    # Before anything is written: a bad path, a typo in --train_config or a bad value is one clear
    # line, not N failed runs (nor a base built for nothing).
    if cfg.task:
        get_task(cfg.task)
    else:
        check_inputs(cfg)
    for run in runs:
        check_settings(run_settings(cfg, run, dict.fromkeys(SOURCES, "checked.py:fn"), out / "runs" / run.name), run)
    out.mkdir(parents=True, exist_ok=True)
    sources = _sources(cfg, out)
    settings = {r: run_settings(cfg, r, sources, out / "runs" / r.name) for r in runs}
    _refuse_replacing_other_runs(cfg, out, runs, settings)
    todo = [r for r in runs if not is_finished(out / "runs" / r.name, settings[r])]
    log.info("frontier: %d runs (%d finished already, %d to train) in %s", len(runs), len(runs) - len(todo), len(todo), out)
    failed = _train_all(cfg, out, todo, settings)
    points = collect_points(out, [r for r in runs if r not in failed], has_gold=bool(sources["gold"]))
    summary = summarise(points, cfg.algo_list)
    write_outputs(out, points, summary, cfg)
    judge = default_judge(cfg)
    if judge and not failed:
        win_rates(cfg, out, sources, judge, retrained={r.name for r in todo})
    elif not judge:
        log.info("frontier: no win rates (no judge): give --judge, or --gold_reward_fn, which then judges")
    if failed:
        logs = ", ".join(str(out / "logs" / f"{r.name}.log") for r in failed)
        raise UsageError(f"{len(failed)} of {len(runs)} runs failed (see {logs}); the frontier shows the others. "
                         "Fix the cause and run the same command again: finished runs are kept")
    return summary


SOURCES = ("model", "reward_model", "reward_fn", "dataset", "eval_dataset", "preferences", "gold")


def check_settings(settings: dict, run: Run) -> None:
    """A run's `p3o train` settings as `p3o train --config` would read them: no unknown key, every
    value of its type and in range."""
    where = f"run {run.name}"
    if unknown := sorted(set(settings) - {f.name for f in dataclasses.fields(P3OConfig)}):
        raise UsageError(f"{where}: unknown `p3o train` option {unknown[0]!r} (from --train_config?); see p3o train --help")
    P3OConfig(**typed(P3OConfig, settings, where))


def _refuse_replacing_other_runs(cfg: FrontierConfig, out: Path, runs: list[Run], settings: dict) -> None:
    """A run directory made with other settings is retrained (so deleted) only with --overwrite."""
    other = [r for r in runs
             if (out / "runs" / r.name).exists() and not _same_settings(out / "runs" / r.name, settings[r])]
    if other and not cfg.overwrite:
        names = ", ".join(r.name for r in other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise UsageError(f"{out / 'runs'} holds {names} made with other settings than these; pass --overwrite to "
                         "retrain them (their results are deleted), or use a new --output_dir")


def _sources(cfg: FrontierConfig, out: Path) -> dict:
    """Model, reward, data and gold of every run: the embedded task's base, or the user's own."""
    if cfg.task:
        _check_base(out / "base", {"task": cfg.task, "seed": 0, "quick": cfg.quick_base})
        base = build_task_base(cfg.task, out / "base", quick=cfg.quick_base, disable_progress_bar=cfg.disable_progress_bar)
        return {"model": str(base["sft"]), "reward_model": str(base["rm"]), "reward_fn": None,
                "dataset": str(base["prompts_train"]), "eval_dataset": str(base["prompts_eval"]),
                "preferences": str(base["prefs_train"]), "gold": f"p3o.tasks.{cfg.task}:gold_reward"}
    return {"model": cfg.model_name_or_path, "reward_model": cfg.reward_model, "reward_fn": cfg.reward_fn,
            "dataset": cfg.dataset, "eval_dataset": cfg.eval_dataset, "preferences": cfg.preference_dataset,
            "gold": cfg.gold_reward_fn}


def _check_base(base: Path, identity: dict) -> None:
    """The base models are reused only for the task and sizes they were built with."""
    marker = base / "base.json"
    if marker.is_file() and json.loads(marker.read_text()) != identity:
        raise UsageError(f"{base} was built with {marker.read_text().strip()}, not {json.dumps(identity)}; "
                         "use a new --output_dir for another task or base size")
    base.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(identity))


# Keys the sweep sets for each run, which --train_config may not override.
SWEPT = {"algo", "beta", "seed", "output_dir", "model_name_or_path", "dataset", "eval_dataset", "reward_model",
         "reward_fn", "monitor_reward_fn", "resume", "overwrite"}


def run_settings(cfg: FrontierConfig, run: Run, sources: dict, run_dir: Path) -> dict:
    """The `p3o train` config of one run."""
    algorithm = arm_algorithm(run.algo)
    offline = algorithm.offline
    settings = dict(
        algo=algorithm.name, beta=run.beta, seed=run.seed, model_name_or_path=sources["model"],
        dataset=sources["preferences"] if offline else sources["dataset"],
        reward_model=sources["reward_model"], reward_fn=sources["reward_fn"], monitor_reward_fn=sources["gold"],
        eval_dataset=sources["eval_dataset"], eval_steps=cfg.eval_steps, eval_max_prompts=cfg.eval_max_prompts,
        max_steps=cfg.max_steps, pairs_per_step=cfg.pairs_per_step, max_new_tokens=cfg.max_new_tokens,
        learning_rate=cfg.dpo_learning_rate if offline else cfg.learning_rate,
        epochs=algorithm.defaults.get("epochs", cfg.epochs), output_dir=str(run_dir), disable_progress_bar=True,
        logging_steps=max(1, cfg.max_steps // 4), log_completions=1,
        save_steps=cfg.eval_steps, save_total_limit=1, resume=True)  # a killed sweep continues each run
    if cfg.train_config:
        extra = read_yaml_config(cfg.train_config)
        for alias, name in trl_names().items():  # p3o train folds them so: config.yaml holds p3o's names
            if alias in extra:
                extra[name] = extra.pop(alias)
        if clash := sorted(SWEPT & set(extra)):
            raise UsageError(f"--train_config {cfg.train_config} sets {', '.join(clash)}, which the sweep sets for "
                             "each run; remove them (use --algos, --betas, --seeds and the model/data flags)")
        settings.update(extra)
    settings.update(ARMS.get(run.algo, ("", {}))[1])
    return {k: v for k, v in settings.items() if v is not None}


def is_finished(run_dir: Path, settings: dict) -> bool:
    """Trained to the end with these settings (a run trained with others is not reused)."""
    points = _read_jsonl(run_dir / "eval.jsonl")
    done = (run_dir / "model.safetensors").is_file() and bool(points) and points[-1]["step"] == settings["max_steps"]
    return done and _same_settings(run_dir, settings)


def _same_settings(run_dir: Path, settings: dict) -> bool:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return False
    saved = yaml.safe_load(config.read_text())
    settings = typed(P3OConfig, settings, str(run_dir))  # as the run read them: a list of modules joined, "1e-8" a float
    return all(same_setting(saved.get(k), v) for k, v in settings.items() if k not in COSMETIC_SETTINGS)


def _train_all(cfg: FrontierConfig, out: Path, todo: list[Run], settings: dict) -> list[Run]:
    """Train the runs in parallel subprocesses, one thread each; returns the ones that failed. A run
    left unfinished continues from its checkpoint; one made with other settings starts again (only
    with --overwrite: `_refuse_replacing_other_runs`)."""
    import shutil

    (out / "logs").mkdir(exist_ok=True)
    (out / "configs").mkdir(exist_ok=True)
    workers = cfg.num_workers or len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def train(run: Run) -> Run | None:
        run_dir = out / "runs" / run.name
        if run_dir.exists() and not _same_settings(run_dir, settings[run]):
            shutil.rmtree(run_dir)
        config = out / "configs" / f"{run.name}.yaml"
        config.write_text(yaml.safe_dump(settings[run], sort_keys=False))
        with open(out / "logs" / f"{run.name}.log", "a") as logfile:
            code = subprocess.run([sys.executable, "-m", "p3o", "train", "--config", str(config)], env=env,
                                  stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        log.info("frontier: %s %s", run.name, "done" if code == 0 else f"FAILED (exit {code})")
        return None if code == 0 else run

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for r in pool.map(train, todo) if r is not None]


def collect_points(out: Path, runs: list[Run], has_gold: bool) -> list[dict]:
    points = []
    for run in runs:
        for p in _read_jsonl(out / "runs" / run.name / "eval.jsonl"):
            points.append({"algo": run.algo, "beta": run.beta, "seed": run.seed, "step": p["step"], "kl": p["kl"],
                           "kl_stderr": p["kl_stderr"], "reward": p.get("reward"), "reward_stderr": p.get("reward_stderr"),
                           "gold": p.get("monitor_reward") if has_gold else None,
                           "gold_stderr": p.get("monitor_reward_stderr") if has_gold else None,
                           "length": p["length"], "run": run.name})
    return points


def pareto_frontier(points: list[dict], key: str) -> list[dict]:
    """The points no other point dominates (no more KL and at least as much `key`, one of them
    strictly): sorted by KL, each with more `key` than every point before it. Naive version:
    [p for p in points if not any(q["kl"] <= p["kl"] and q[key] >= p[key] and q != p for q in points)]."""
    frontier, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p["kl"], -p[key])):
        if p[key] > best:
            frontier.append(p)
            best = p[key]
    return frontier


def best_within(points: list[dict], key: str, budget: float) -> dict | None:
    """The point with the most `key` among those with KL <= budget."""
    inside = [p for p in points if p["kl"] <= budget]
    return max(inside, key=lambda p: p[key]) if inside else None


def summarise(points: list[dict], algos: list[str]) -> dict:
    keys = ["gold", "reward"] if points and points[0]["gold"] is not None else ["reward"]
    summary = {}
    for algo in algos:
        mine = [p for p in points if p["algo"] == algo]
        summary[algo] = {key: {"frontier": pareto_frontier(mine, key),
                               "best_within": {str(b): best_within(mine, key, b) for b in KL_BUDGETS},
                               "seed_mean_within": {str(b): best_setting_interval(mine, key, b) for b in KL_BUDGETS}}
                         for key in keys}
    return summary


def best_setting_interval(points: list[dict], key: str, budget: float, resamples: int = 2000) -> dict | None:
    """The best setting (beta, checkpoint) within a KL budget, judged by its mean over seeds, with a
    95% bootstrap interval over seeds that redoes the choice in every resample.

    Taking the best of many noisy points flatters every algorithm; choosing on seed means and
    resampling the seeds (each seed's runs together) puts the luck of that choice into the interval.
    A setting counts within the budget when its mean KL over the resampled seeds is. Needs every
    seed to have the setting; settings some seed lacks are left out."""
    import random

    by_setting: dict[tuple, dict[int, dict]] = {}
    for p in points:
        by_setting.setdefault((p["beta"], p["step"]), {})[p["seed"]] = p
    seeds = sorted({p["seed"] for p in points})
    settings = {s: runs for s, runs in by_setting.items() if len(runs) == len(seeds)}
    if not settings:
        return None

    def best(sample: list[int]) -> tuple[float, tuple] | None:
        inside = []
        for setting, runs in settings.items():
            kl = sum(runs[s]["kl"] for s in sample) / len(sample)
            if kl <= budget:
                inside.append((sum(runs[s][key] for s in sample) / len(sample), setting))
        return max(inside) if inside else None

    found = best(seeds)
    if found is None:
        return None
    rng = random.Random(0)
    values = sorted(b[0] for _ in range(resamples) if (b := best(rng.choices(seeds, k=len(seeds)))) is not None)
    low, high = (values[int(0.025 * len(values))], values[min(len(values) - 1, int(0.975 * len(values)))]) if values \
        else (found[0], found[0])
    return {"value": found[0], "beta": found[1][0], "step": found[1][1], "seeds": len(seeds), "ci_low": low,
            "ci_high": high, "resamples_within_budget": len(values) / resamples}


def write_outputs(out: Path, points: list[dict], summary: dict, cfg: FrontierConfig) -> None:
    rows = [{k: p[k] for k in POINT_FIELDS} for p in points]
    tmp = out / ".points.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=POINT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "points.csv")
    atomic_write_text(out / "frontier.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "frontier.md", frontier_table(summary))
    if points:
        plot_frontier(points, summary, out / "frontier.png", title=f"KL-reward frontier ({cfg.task or 'your task'})")


def frontier_table(summary: dict) -> str:
    """Markdown: per algorithm, the best reward (gold, else proxy) within each KL budget: the best
    single point, then the best setting's mean over seeds with its bootstrap interval."""
    key = "gold" if any("gold" in s for s in summary.values()) else "reward"
    name = "gold" if key == "gold" else "proxy"
    head = ["| algorithm | " + " | ".join(f"KL <= {b:g}" for b in KL_BUDGETS) + " |", "|---|" + "---|" * len(KL_BUDGETS)]
    lines = [f"Best held-out {name} reward within a KL budget (nats); each cell is the best point (any beta, seed "
             "or checkpoint) with KL <= the budget, +- its standard error over prompts.", "", *head]
    for algo, s in summary.items():
        cells = []
        for b in KL_BUDGETS:
            p = s[key]["best_within"][str(b)]
            cells.append("–" if p is None else f"{p[key]:.3f} ± {p[key + '_stderr']:.3f}")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    lines += ["", f"Best setting (beta, checkpoint) within a KL budget by its {name} reward averaged over seeds, with a "
              "95% bootstrap interval over seeds that repeats the choice of setting in each resample.", "", *head]
    for algo, s in summary.items():
        cells = []
        for b in KL_BUDGETS:
            p = s[key].get("seed_mean_within", {}).get(str(b))
            cells.append("–" if p is None else f"{p['value']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def representatives(cfg: FrontierConfig, algo: str) -> list[Run]:
    """The runs that stand for `algo` in the win-rate table, fixed before any result is seen: its
    default beta if swept (else the middle one), the final policy, one per seed."""
    algorithm = arm_algorithm(algo)
    betas = [float(b) for b in (cfg.betas if algorithm.kl_penalty else cfg.dpo_betas).split(",")]
    default = default_setting(algorithm, "beta")
    beta = default if default in betas else betas[len(betas) // 2]
    return [Run(algo, beta, int(seed)) for seed in cfg.seeds.split(",")]


def default_judge(cfg: FrontierConfig) -> str | None:
    """--judge, else the gold reward: the embedded task's, or --gold_reward_fn; None without either."""
    if cfg.judge:
        return cfg.judge
    if cfg.task:
        return f"gold:{cfg.task}"
    return f"reward_fn:{cfg.gold_reward_fn}" if cfg.gold_reward_fn else None


def win_rates(cfg: FrontierConfig, out: Path, sources: dict, judge: str, retrained: set[str] = frozenset()) -> dict:
    """Each algorithm's representative policies against the SFT policy and against PPO's of the same
    seed (when swept), on the same held-out prompts; winrates/*.json (kept across reruns) and
    winrates.md. The seeds' verdicts are pooled: the interval then counts every judged pair (the same
    prompts recur across seeds, so it is somewhat narrower than one that accounted for that)."""
    runs = {algo: representatives(cfg, algo) for algo in cfg.algo_list}
    table = {}
    for algo, mine in runs.items():
        for i, run in enumerate(mine):
            path = str(out / "runs" / run.name)
            opponents = {"SFT": sources["model"], **({"PPO": str(out / "runs" / runs["ppo"][i].name)} if "ppo" in runs else {})}
            for name, opponent in opponents.items():
                if path == opponent:
                    continue
                result_file = out / "winrates" / f"{algo}-vs-{name.lower()}-seed{run.seed}.json"
                wanted = WinrateConfig(model_a=path, model_b=opponent, dataset=sources["eval_dataset"], judge=judge,
                                       output_file=str(result_file), max_new_tokens=cfg.max_new_tokens,
                                       max_prompts=cfg.winrate_prompts, disable_progress_bar=cfg.disable_progress_bar,
                                       overwrite=True)
                if _stale(result_file, wanted, {Path(path).name, Path(opponent).name} & retrained):
                    run_winrate(wanted)
                table.setdefault((algo, name), []).append(json.loads(result_file.read_text()))
    pooled = {}
    for pair, results in table.items():
        wins, losses, ties = (sum(r[k] for r in results) for k in ("wins", "losses", "ties"))
        n = wins + losses + ties
        low, high = win_rate_interval(wins, losses, ties)
        pooled[pair] = {"win_rate": (wins + ties / 2) / n if n else None, "ci_low": low, "ci_high": high,
                        "wins": wins, "losses": losses, "ties": ties, "n": n, "seeds": len(results),
                        "per_seed": [r["win_rate"] for r in results]}
    opponent_names = ["SFT", *(["PPO"] if "ppo" in runs else [])]
    described = ", ".join(f"{a}: beta {r[0].beta:g}" for a, r in runs.items())
    lines = [f"Win rate of each algorithm's final policy at its default beta ({described}) against the SFT policy "
             f"and against PPO's of the same seed, judged by {judge} on {cfg.winrate_prompts} held-out prompts per seed, "
             f"pooled over seeds {cfg.seeds} (ties count one half; 95% interval; per-seed rates after it).", "",
             "| algorithm | " + " | ".join(f"vs {n}" for n in opponent_names) + " |", "|---|" + "---|" * len(opponent_names)]
    for algo in runs:
        cells = [(f"{r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] ("
                  + ", ".join("n/a" if x is None else f"{x:.2f}" for x in r["per_seed"]) + ")")
                 if (r := pooled.get((algo, n))) and r["n"] else "–"
                 for n in opponent_names]
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "winrates.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "winrates.json", json.dumps({f"{a} vs {n}": r for (a, n), r in pooled.items()}, indent=1))
    return pooled


def _stale(result_file: Path, wanted, retrained: set[str]) -> bool:
    """A win rate needs judging again unless one was made with the same judge, prompts and policies,
    and neither policy was retrained since."""
    if retrained or not result_file.is_file():
        return True
    saved = json.loads(result_file.read_text()).get("config", {})
    return any(saved.get(k) != getattr(wanted, k) for k in ("model_a", "model_b", "dataset", "judge", "max_prompts",
                                                            "max_new_tokens", "temperature", "seed"))


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a line cut off by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
