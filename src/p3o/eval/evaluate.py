"""`p3o eval`: several policies against one reference on the same held-out prompts (docs/p3o.md section 6).

Each policy answers every prompt `--num_samples` times (1 by default), from the same seeded random
streams, and gets: the mean sequence KL to the reference, KL = mean of l(y) - l_ref(y) over its own
samples y (nats; exactly 0 for the reference itself), the proxy reward, the gold reward where given,
the response length and, with `--beta`, the objective the policies were trained for, proxy reward -
beta * KL (TRL's rlhf_reward), each with its standard error. With several samples a prompt's values
are averaged first, so the standard error is over prompts (its samples are not independent draws
of the prompt set). The reference is loaded once; the policies one at a time.

`evaluate_models(cfg)` computes and returns the results (no files; for Python callers);
`run_eval(cfg)` also writes them: the JSON file, a Markdown table beside it, and optionally the samples.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from p3o.data.prompts import load_prompts
from p3o.errors import UsageError
from p3o.options import option
from p3o.utils.io import atomic_write_text, check_writable

log = logging.getLogger("p3o")

# Metric name in the results -> column of the Markdown table.
COLUMNS = {"kl": "KL (nats)", "reward": "reward", "gold": "gold reward", "length": "length (tokens)",
           "rlhf_reward": "reward − β·KL"}


@dataclass
class EvalSettings:
    """Every option of `p3o eval` but the list of policies; each field is a `--flag` of the same name."""

    ref_model: str = option(None, "Reference policy the KL is measured against (usually the SFT model).", required=True)
    dataset: str = option(None, "Held-out prompt-only data: a .jsonl/.json/.parquet/.csv file or a `datasets` name; `prompt` as text or chat messages.", required=True)
    output_file: str | None = option(None, "Results as JSON (keyed by model path); the Markdown table goes beside it as <stem>.md, the samples as <stem>.samples.jsonl. Required by `p3o eval`.")
    reward_fn: str | None = option(None, "Proxy reward function `package.module:fn` or `path/file.py:fn`, called as fn(prompts, completions, **columns).")
    reward_model: str | None = option(None, "Proxy reward: a sequence-classification reward model directory or hub name (one label).")
    gold_reward_fn: str | None = option(None, "A second, gold reward function (e.g. p3o.tasks.summarize:gold_reward), reported beside the proxy.")
    tokenizer_name_or_path: str | None = option(None, "Tokenizer shared by every policy; defaults to the reference's.")
    dataset_split: str = option("train", "Split to read from a `datasets` name.")
    dataset_config: str | None = option(None, "Configuration name of a `datasets` dataset.")
    prompt_column: str = option("prompt", "Column holding the prompt: plain text or a list of chat messages.")
    max_prompts: int | None = option(None, "Use at most this many prompts (the first ones).")
    max_new_tokens: int = option(64, "Tokens sampled per response; EOS ends a response early and counts as part of it.")
    max_prompt_length: int | None = option(None, "Longer prompts keep their last tokens, as in training: give the value the policies were trained with. Default: the model's context minus max_new_tokens.")
    temperature: float = option(1.0, "Sampling temperature; the KL uses the same tempered distributions.")
    num_samples: int = option(1, "Responses sampled per prompt, each from its own seeded stream; a prompt's values are averaged before the mean and its standard error (over prompts). 1 matches p3o train's held-out evaluation.")
    beta: float | None = option(None, "Also report proxy reward - beta * KL per response (rlhf_reward, the KL-regularised objective RL maximises): give the --beta the policies were trained with.")
    batch_size: int = option(64, "Prompts per generation batch and sequences per reward-model pass.")
    seed: int = option(0, "Seed of the sampling stream; 0 matches the held-out evaluations of `p3o train` (float32, with the same --batch_size; under bf16 training samples in bf16, so they differ).")
    torch_dtype: str = option("float32", "Weights of the policies and reference: float32, bfloat16, float16 or auto (as saved).")
    trust_remote_code: bool = option(False, "Allow model repositories to run their own code. Off unless asked for.")
    save_samples: bool = option(False, "Also write every prompt, completion and its values to <stem>.samples.jsonl.")
    overwrite: bool = option(False, "Replace existing output files.")
    disable_progress_bar: bool = option(False, "Hide the progress bar.")


@dataclass
class EvalConfig(EvalSettings):
    # A list, which the dataclass-to-flags helper cannot express: `p3o eval` adds it by hand (nargs="+").
    model_name_or_path: list[str] = option(None, "Policies to evaluate, one or more: local directories or hub names (each against --ref_model).", required=True)  # noqa: RUF009 (the default is None, not shared)

    def __post_init__(self) -> None:
        if isinstance(self.model_name_or_path, str):
            self.model_name_or_path = [self.model_name_or_path]
        self.model_name_or_path = [str(m) for m in self.model_name_or_path or []]
        for name in ("model_name_or_path", "ref_model", "dataset"):
            if not getattr(self, name):
                raise UsageError(f"--{name} is required")
        repeated = sorted({m for m in self.model_name_or_path if self.model_name_or_path.count(m) > 1})
        if repeated:
            raise UsageError(f"--model_name_or_path lists {repeated[0]} more than once; give each policy once")
        if self.reward_fn and self.reward_model:
            raise UsageError("give at most one proxy reward: --reward_fn or --reward_model")
        if not (self.reward_fn or self.reward_model or self.gold_reward_fn):
            raise UsageError("give a reward to score the responses: --reward_fn (package.module:fn or file.py:fn), "
                             "--reward_model (a directory) or --gold_reward_fn")
        if self.output_file is not None and Path(self.output_file).suffix != ".json":
            raise UsageError(f"--output_file must end in .json (the table goes beside it as <stem>.md), "
                             f"got {self.output_file}")
        if self.beta is not None and not (self.beta >= 0 and (self.reward_fn or self.reward_model)):
            raise UsageError("--beta needs a proxy reward (--reward_fn or --reward_model) and must be >= 0, "
                             f"got {self.beta}")
        for name in ("max_new_tokens", "batch_size", "num_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise UsageError(f"--max_prompt_length must be at least 1, got {self.max_prompt_length}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UsageError(f"--max_prompts must be at least 1, got {self.max_prompts}")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be > 0, got {self.temperature}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise UsageError("--torch_dtype must be float32, bfloat16, float16 or auto")

    @property
    def rewards(self) -> dict[str, tuple[str | None, str | None]]:
        """Result name -> (reward function, reward model) of each reward given."""
        named = {"reward": (self.reward_fn, self.reward_model), "gold": (self.gold_reward_fn, None)}
        return {name: spec for name, spec in named.items() if any(spec)}


def output_paths(output_file: str, save_samples: bool) -> dict[str, Path]:
    """The files `run_eval` writes: the JSON results, the Markdown table and (optionally) the samples."""
    out = Path(output_file)
    paths = {"json": out, "markdown": out.with_suffix(".md")}
    if save_samples:
        paths["samples"] = out.with_name(f"{out.stem}.samples.jsonl")
    return paths


def check_outputs(cfg: EvalConfig) -> dict[str, Path]:
    """Refuse, before anything is loaded, outputs that exist (without --overwrite) or that are inputs."""
    if not cfg.output_file:
        raise UsageError("--output_file is required (a .json file)")
    paths = output_paths(cfg.output_file, cfg.save_samples)
    inputs = {"dataset": cfg.dataset, "ref_model": cfg.ref_model}
    for path in paths.values():
        if path.is_dir():
            raise UsageError(f"{path} is a directory; give --output_file a .json file name")
        for flag, value in inputs.items():
            if Path(value).exists() and Path(value).resolve() == path.resolve():
                raise UsageError(f"{path} would overwrite --{flag}; choose another --output_file")
        if path.exists() and not cfg.overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it, or choose another --output_file")
        check_writable(path.parent, "--output_file")
    return paths


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_models(cfg: EvalConfig) -> dict[str, dict]:
    """Results keyed by model path, in the order given: `kl`, `reward`, `gold` (None where not given),
    `length`, `rlhf_reward` (None without --beta), each with `*_stderr`, `n` (prompts),
    `samples_per_prompt`, and `samples` (prompt, completion, its draw and its values).

    A policy that is the reference (the same path) is evaluated with the reference's own weights."""
    from tqdm.auto import tqdm

    # local: these import torch, and `import p3o.eval.evaluate` stays free of it (tests/test_eval.py)
    from p3o.models.loading import _check_exists, load_causal_lm, load_tokenizer
    from p3o.reward import build_reward

    # 1. everything cheap first, so that a typo fails before any model loads
    for path in [cfg.ref_model, *cfg.model_name_or_path]:
        _check_exists(path, "model")
    device = _device()
    rewards = {name: build_reward(fn, model, cfg.trust_remote_code, cfg.batch_size, device)
               for name, (fn, model) in cfg.rewards.items()}
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.ref_model, cfg.trust_remote_code)
    prompts = load_prompts(cfg.dataset, tokenizer, cfg.dataset_split, cfg.dataset_config, cfg.prompt_column)
    if cfg.max_prompts is not None:
        prompts.rows, prompts.texts, prompts.token_ids = (prompts.rows[:cfg.max_prompts], prompts.texts[:cfg.max_prompts],
                                                          prompts.token_ids[:cfg.max_prompts])
    # 2. the reference once, then each policy in turn (one policy in memory at a time)
    load = {"trust_remote_code": cfg.trust_remote_code, "dtype": cfg.torch_dtype}
    reference = load_causal_lm(cfg.ref_model, what="reference model", **load).to(device).eval()
    log.info("eval: %d policies on %d prompts of %s, KL to %s", len(cfg.model_name_or_path), len(prompts),
             cfg.dataset, cfg.ref_model)
    results = {}
    bar = tqdm(cfg.model_name_or_path, desc="p3o eval", unit="policy", dynamic_ncols=True,
               disable=cfg.disable_progress_bar)
    for path in bar:
        bar.set_postfix_str(Path(path).name or path)
        policy = reference if _same_model(path, cfg.ref_model) else \
            load_causal_lm(path, what="model", **load).to(device).eval()
        metrics = _evaluate(policy, reference, tokenizer, prompts, rewards, cfg)
        del policy
        results[path] = {**{key: metrics.get(key) for name in COLUMNS for key in (name, f"{name}_stderr")},
                         "n": len(prompts), "samples_per_prompt": cfg.num_samples, "samples": metrics["samples"]}
        bar.write(f"{path}: " + "  ".join(f"{name} {metrics[name]:+.4f} ± {metrics[name + '_stderr']:.4f}"
                                          for name in COLUMNS if name in metrics))
    return results


def _evaluate(policy, reference, tokenizer, prompts, rewards: dict, cfg: EvalConfig) -> dict:
    """`evaluate_policy` cfg.num_samples times: draw k of every prompt from the streams of indices
    k * len(prompts) onwards (draw 0 is the single-sample evaluation, and no two draws share a
    stream); each prompt's values averaged over its draws, then the mean and standard error over
    prompts. Samples are listed prompt by prompt, each with its draw number."""
    from p3o.eval.policy import evaluate_policy, summarise

    draws = []
    for k in range(cfg.num_samples):
        samples = evaluate_policy(policy, reference, tokenizer, prompts, rewards, cfg.max_new_tokens, seed=cfg.seed,
                                  batch_size=cfg.batch_size, temperature=cfg.temperature,
                                  first_index=k * len(prompts), max_prompt_length=cfg.max_prompt_length)["samples"]
        for sample in samples:
            sample["draw"] = k
            if cfg.beta is not None:
                sample["rlhf_reward"] = sample["reward"] - cfg.beta * sample["kl"]
        draws.append(samples)
    names = [name for name in COLUMNS if name in draws[0][0]]
    per_prompt = [{name: sum(draw[i][name] for draw in draws) / len(draws) for name in names}
                  for i in range(len(prompts))]
    return {**summarise(per_prompt, names), "samples": [draw[i] for i in range(len(prompts)) for draw in draws]}


def markdown_table(results: dict[str, dict], cfg: EvalConfig) -> str:
    """One row per policy: mean ± standard error of each metric (columns only for rewards given)."""
    names = [name for name in COLUMNS if any(r.get(name) is not None for r in results.values())]
    n = next(iter(results.values()))["n"] if results else 0
    per_prompt = ("one sample per prompt" if cfg.num_samples == 1 else
                  f"{cfg.num_samples} samples per prompt, averaged per prompt before the standard error")
    objective = f"; β = {cfg.beta:g}" if "rlhf_reward" in names else ""
    caption = (f"KL to {cfg.ref_model} (nats) and rewards on {n} prompts of {cfg.dataset}: mean ± standard error, "
               f"{per_prompt} (seed {cfg.seed}, max_new_tokens {cfg.max_new_tokens}, "
               f"temperature {cfg.temperature:g}{objective}).")
    lines = [caption, "",
             "| model | " + " | ".join(COLUMNS[name] for name in names) + " | n |",
             "|---|" + "---:|" * (len(names) + 1)]
    for path, r in results.items():
        cells = ["–" if r.get(name) is None else f"{r[name]:.4f} ± {r[name + '_stderr']:.4f}" for name in names]
        lines.append(f"| {path} | " + " | ".join(cells) + f" | {r['n']} |")
    return "\n".join(lines) + "\n"


def run_eval(cfg: EvalConfig) -> dict[str, dict]:
    """`p3o eval`: evaluate, then write the JSON, the Markdown table (also printed) and the samples."""
    paths = check_outputs(cfg)
    results = evaluate_models(cfg)
    summary = {path: {k: v for k, v in r.items() if k != "samples"} for path, r in results.items()}
    table = markdown_table(summary, cfg)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    if "samples" in paths:
        lines = [json.dumps({"model": path, **sample}) for path, r in results.items() for sample in r["samples"]]
        atomic_write_text(paths["samples"], "".join(line + "\n" for line in lines))
    else:  # an earlier run's samples would stand beside these results as if they were theirs
        output_paths(cfg.output_file, save_samples=True)["samples"].unlink(missing_ok=True)
    atomic_write_text(paths["markdown"], table)
    atomic_write_text(paths["json"], json.dumps(summary, indent=1) + "\n")
    print("\n" + table)
    log.info("eval: wrote %s", ", ".join(str(p) for p in paths.values()))
    return summary
