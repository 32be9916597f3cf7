"""Win rate of policy A against policy B on the same held-out prompts (docs/p3o.md section 6):
win rate = P(A's response is judged better) + 1/2 P(tie), with a 95% interval.

1. Each policy samples one response per prompt (its own random stream: the two responses are
   independent draws, as the win rate's definition assumes).
2. A judge (`p3o.eval.judges`) gives each prompt a verdict A, B or tie, i.e. a score 1, 0 or 1/2, or
   abstains (an `llm:` judge whose reply in one order could not be read).
3. The win rate is the mean score over the judged prompts; `win_rate_interval` gives its interval.
   Abstentions are left out of both and reported, with the range the win rate would span if they
   had all been losses or all wins; a two-order judge's position bias and consistency are reported
   beside it (`judge_diagnostics`).

Shape legend: G = prompts in a generation batch; Lq = prompt tokens (left-padded); T = response tokens.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from p3o.data.prompts import load_prompts
from p3o.errors import UsageError
from p3o.eval.judges import ABSTAIN, JudgeSettings, build_judge, check_judge, order_diagnostics
from p3o.models.loading import _check_exists, eos_token_ids, load_causal_lm, load_tokenizer
from p3o.options import option
from p3o.rl.rollout import decode_completions, generation_config, pad_prompts, prompt_budget, sample_responses
from p3o.utils.io import atomic_write_text, check_writable
from p3o.utils.seeding import seed_global_rng

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval
INTERVAL_METHOD = ("95% Agresti-Coull with ties: z^2/2 pseudo-wins and pseudo-losses, then the normal interval "
                   "of the mean per-prompt score in {0, 1/2, 1}")


@dataclass
class WinrateConfig:
    model_a: str = option(None, "Policy A: a local directory or a hub name of a causal LM (usually the trained policy).", required=True)
    model_b: str = option(None, "Policy B, answering the same prompts (e.g. the SFT model or another algorithm's policy).", required=True)
    dataset: str = option(None, "Held-out prompt-only data (plain text or chat messages): a .jsonl/.json/.parquet/.csv file or a `datasets` name.", required=True)
    judge: str | None = option(None, "KIND:ARGUMENT: gold:TASK, reward_fn:module:fn or file.py:fn, reward_model:PATH, llm:MODEL (an OpenAI-compatible API), hf:PATH (a local causal LM).")
    output_file: str = option(None, "JSON file of the result: win rate, interval, counts and one record per prompt.", required=True)
    max_new_tokens: int = option(64, "Tokens sampled per response; EOS ends a response early. Use what the policies were trained with.")
    max_prompt_length: int | None = option(None, "Longer prompts keep their last tokens, as in training: give the value the policies were trained with. Default: the model's context minus max_new_tokens.")
    temperature: float = option(1.0, "Sampling temperature of both policies. 1.0 judges the policy's own distribution, the one RL optimised and the KL measures (as the paper samples); 0 decodes greedily.")
    seed: int = option(0, "Seed of the sampling: the same seed gives the same responses.")
    max_prompts: int | None = option(None, "Use at most this many prompts (the first ones).")
    batch_size: int = option(32, "Prompts per generation batch and sequences per judge forward pass.")
    tokenizer_name_or_path: str | None = option(None, "Tokenizer of both policies; default: each policy's own.")
    trust_remote_code: bool = option(False, "Allow model repositories to run their own code. Off unless asked for.")
    torch_dtype: str = option("auto", "Weights of the policies and of an hf: judge: auto (as saved), float32, bfloat16 or float16.")
    prompt_column: str = option("prompt", "Column holding the prompt: plain text or a list of chat messages.")
    dataset_split: str = option("test", "Split to read from a `datasets` name (the held-out one).")
    dataset_config: str | None = option(None, "Configuration name of a `datasets` dataset.")
    judge_model: str | None = option(None, "Model name for the llm judge; `--judge_model M` alone means --judge llm:M.")
    judge_base_url: str = option("https://api.openai.com/v1", "llm judge: base URL of an OpenAI-compatible API (vLLM, llama.cpp, ... serve one); POST {base_url}/chat/completions.")
    judge_api_key_env: str = option("OPENAI_API_KEY", "llm judge: environment variable holding the API key, sent as a Bearer token and written nowhere.")
    judge_cache: str | None = option(None, "llm judge: JSONL cache of replies, so a rerun makes no API calls; default: judge_cache.jsonl beside --output_file.")
    judge_max_retries: int = option(5, "llm judge: retries of a request after HTTP 408/429/5xx, a timeout or a refused/dropped connection (a server restarting), waiting 1, 2, 4, ... s.")
    judge_timeout: float = option(60.0, "llm judge: seconds to wait for one reply.")
    judge_workers: int = option(4, "llm judge: requests in flight at once.")
    judge_max_tokens: int = option(32, "llm judge: tokens a reply may have (max_tokens); the answer comes first or early, so a chatty judge is cut short.")
    judge_logprobs: bool = option(True, "llm judge: ask for the top log-probabilities of the reply's first token (llama.cpp, vLLM and OpenAI give them) and read an unreadable reply's answer from p(A) vs p(B); a server that refuses them is asked without.")
    judge_tie_margin: float = option(0.0, "Score judges: |score_a - score_b| <= margin is a tie; hf judge: the same on its log-probability margin (nats).")
    overwrite: bool = option(False, "Replace an existing --output_file.")
    disable_progress_bar: bool = option(False, "Hide the progress bars.")

    def __post_init__(self) -> None:
        self._resolve_judge()
        for name in ("model_a", "model_b", "dataset", "output_file"):
            if not getattr(self, name):
                raise UsageError(f"--{name} is required")
        checks = [
            (self.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
            (self.max_prompt_length is None or self.max_prompt_length >= 1, "--max_prompt_length must be at least 1"),
            (self.temperature >= 0, "--temperature must be >= 0 (0 decodes greedily)"),
            (self.max_prompts is None or self.max_prompts >= 1, "--max_prompts must be at least 1"),
            (self.batch_size >= 1, "--batch_size must be at least 1"),
            (self.torch_dtype in ("auto", "float32", "bfloat16", "float16"),
             "--torch_dtype must be auto, float32, bfloat16 or float16"),
            (self.judge_max_retries >= 0, "--judge_max_retries must be >= 0"),
            (self.judge_timeout > 0, "--judge_timeout must be > 0"),
            (self.judge_workers >= 1, "--judge_workers must be at least 1"),
            (self.judge_max_tokens >= 1, "--judge_max_tokens must be at least 1"),
            (self.judge_tie_margin >= 0, "--judge_tie_margin must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def _resolve_judge(self) -> None:
        """`--judge_model M` alone, or with `--judge llm`, means `--judge llm:M`."""
        if self.judge_model and self.judge in (None, "llm"):
            self.judge = f"llm:{self.judge_model}"
        if not self.judge:
            raise UsageError("--judge is required: e.g. --judge gold:summarize, --judge reward_fn:rewards.py:fn, "
                             "--judge llm:gpt-4o")
        if self.judge_model and self.judge != f"llm:{self.judge_model}":
            raise UsageError(f"--judge_model {self.judge_model} names an llm judge but --judge is {self.judge}; "
                             "give one of them")

    def judge_settings(self, device=None):
        cache = Path(self.judge_cache) if self.judge_cache else Path(self.output_file).parent / "judge_cache.jsonl"
        return JudgeSettings(tie_margin=self.judge_tie_margin, batch_size=self.batch_size, device=device,
                             trust_remote_code=self.trust_remote_code, base_url=self.judge_base_url,
                             api_key_env=self.judge_api_key_env, cache_path=cache,
                             max_retries=self.judge_max_retries, timeout=self.judge_timeout,
                             workers=self.judge_workers, max_tokens=self.judge_max_tokens,
                             logprobs=self.judge_logprobs, dtype=self.torch_dtype,
                             progress=not self.disable_progress_bar)


def win_rate_interval(wins: int, losses: int, ties: int, z: float = Z95) -> tuple[float, float]:
    """Interval for the win rate (wins + ties / 2) / n, correct with ties.

    Agresti-Coull with ties: add z^2/2 pseudo-wins and z^2/2 pseudo-losses, then take the normal
    interval p~ +- z * sqrt(var~ / n~) of the mean of the per-prompt scores in {1, 1/2, 0}, using
    their own variance (ties pull scores towards the mean, so they narrow the interval; counting a
    tie as half a win and half a loss of a coin would not). Without ties this is exactly the
    Agresti-Coull interval; unlike mean +- z * sd / sqrt(n) it never collapses to a point (8 wins
    of 8 gives [0.63, 1], not [1, 1]; 10 ties of 10 gives [0.36, 0.64]). Simulated over win/tie/loss
    rates and n >= 10 prompts its coverage stays within about 0.92-0.99 of the nominal 0.95, the range
    of Agresti-Coull itself (tests/test_winrate.py checks a few cases).
    """
    n = wins + losses + ties
    if n == 0:
        return 0.0, 1.0
    pseudo = z * z / 2
    n_tilde = n + 2 * pseudo
    p = (wins + pseudo + ties / 2) / n_tilde
    var = max((wins + pseudo + ties / 4) / n_tilde - p * p, 0.0)  # E[s^2] - E[s]^2 of the augmented scores
    half = z * math.sqrt(var / n_tilde)
    return max(p - half, 0.0), min(p + half, 1.0)


def summarise(verdicts) -> dict:
    """Counts, win rate and interval of a list of `Verdict`s. Abstentions leave the denominator: the
    win rate and its interval are over the n judged prompts, and `abstention_bounds` is the range of
    the win rate over all prompts had every abstention been a loss or a win. Judges that see both
    orders also give `judge_diagnostics` (`p3o.eval.judges.order_diagnostics`)."""
    judged = [v for v in verdicts if v.winner != ABSTAIN]
    wins = sum(v.winner == "A" for v in judged)
    losses = sum(v.winner == "B" for v in judged)
    n = len(judged)
    ties = n - wins - losses
    abstentions = len(verdicts) - n
    low, high = win_rate_interval(wins, losses, ties)
    points = wins + ties / 2
    result = {"win_rate": points / n if n else None, "ci_low": low, "ci_high": high,  # None: JSON's null
              "wins": wins, "losses": losses, "ties": ties, "n": n, "abstentions": abstentions,
              "prompts": len(verdicts),
              "abstention_bounds": [points / len(verdicts), (points + abstentions) / len(verdicts)] if verdicts else None,
              "interval": INTERVAL_METHOD + "; over the judged prompts, abstentions left out"}
    if verdicts and all("answer_ab" in v.details for v in verdicts):
        result["judge_diagnostics"] = order_diagnostics([v.details["answer_ab"] for v in verdicts],
                                                        [v.details["answer_ba"] for v in verdicts])
    return result


POSITION_BIAS = 0.8  # warn when more than this share of a judge's answers name one position


def judge_warnings(result: dict) -> list[str]:
    """What the reader of a win rate must know about the judge: abstentions, position bias."""
    warnings = []
    if result["abstentions"]:
        low, high = result["abstention_bounds"]
        warnings.append(f"{result['abstentions']} of {result['prompts']} prompts are abstentions (a reply the judge "
                        f"gave in one order could not be read); the win rate is over the other {result['n']}, and "
                        f"would lie in [{low:.3f}, {high:.3f}] had they all been losses or all wins")
    diagnostics = result.get("judge_diagnostics") or {}
    share = diagnostics.get("first_position_share")
    if share is not None and max(share, 1 - share) > POSITION_BIAS:
        agreement = diagnostics["agreement"]
        warnings.append(f"the judge named the {'first' if share > 0.5 else 'second'} position in "
                        f"{max(share, 1 - share):.0%} of its answers: it is mostly position-biased, and only the "
                        f"part of its preference that survives swapping the order counts (its two orders agreed on "
                        f"{'n/a' if agreement is None else f'{agreement:.0%}'} of the pairs); use a stronger judge "
                        "for a win rate that tells the policies apart")
    return warnings


@torch.no_grad()
def sample_completions(policy, tokenizer, prompts, max_new_tokens: int, temperature: float, seed: int,
                       stream: str, batch_size: int = 32, progress=None, max_prompt_length: int | None = None) -> list[str]:
    """One response per prompt of `prompts` (a PromptDataset), sampled as `evaluate_policy` samples
    (exact tempered sampling, each batch seeded from (seed, stream, batch start)); temperature 0 is greedy."""
    eos = eos_token_ids(tokenizer, policy)
    config = generation_config(SimpleNamespace(temperature=temperature or 1.0, top_k=0, top_p=1.0,
                                               max_new_tokens=max_new_tokens), tokenizer, eos, greedy=temperature == 0)
    device = next(policy.parameters()).device
    max_length = prompt_budget(policy.config, max_new_tokens, max_prompt_length)
    if long := sum(len(ids) > max_length for ids in prompts.token_ids):
        log.warning("%d of %d prompts are longer than %d tokens (--max_prompt_length, by default what the context "
                    "leaves beside %d new ones); they keep their last tokens (and BOS)", long, len(prompts),
                    max_length, max_new_tokens)
    completions = []
    for first in range(0, len(prompts), batch_size):
        ids, mask = pad_prompts(tokenizer, prompts.token_ids[first:first + batch_size], max_length)  # (G, Lq)
        seed_global_rng(seed, stream, first)
        response, response_mask = sample_responses(policy, ids.to(device), mask.to(device), config, eos)  # (G, T)
        completions += decode_completions(tokenizer, ids, mask, response.cpu(), response_mask.cpu())
        if progress is not None:
            progress.update(len(ids))
    return completions


def check_output_file(cfg: WinrateConfig) -> Path:
    """Refuse before anything loads: an existing output without --overwrite, or a directory."""
    out = Path(cfg.output_file)
    if out.is_dir():
        raise UsageError(f"--output_file {out} is a directory; give a file name such as {out / 'winrate.json'}")
    if Path(cfg.dataset).exists() and Path(cfg.dataset).resolve() == out.resolve():
        raise UsageError(f"--output_file {out} would overwrite --dataset; choose another file")
    if out.exists() and not cfg.overwrite:
        raise UsageError(f"--output_file {out} exists; pass --overwrite to replace it, or choose another file")
    check_writable(out.parent, "--output_file")
    if cfg.judge.startswith("llm:"):  # the replies are cached as they arrive: the cache must be writable first
        cache = cfg.judge_settings().cache_path
        if cache.is_dir():
            raise UsageError(f"--judge_cache {cache} is a directory; give a file name such as {cache / 'judge_cache.jsonl'}")
        check_writable(cache.parent, "--judge_cache")
    return out


def check_inputs(cfg: WinrateConfig) -> None:
    """Model paths and the judge, checked before any model loads."""
    _check_exists(cfg.model_a, "--model_a")
    _check_exists(cfg.model_b, "--model_b")
    if cfg.tokenizer_name_or_path:
        _check_exists(cfg.tokenizer_name_or_path, "--tokenizer_name_or_path")
    check_judge(cfg.judge, cfg.judge_settings())


def respond(cfg: WinrateConfig, which: str, device) -> tuple[list[dict], list[str]]:
    """Policy `which` ("a" or "b") loaded, run on the prompts and freed: (dataset rows, responses)."""
    from tqdm.auto import tqdm

    path = getattr(cfg, f"model_{which}")
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or path, cfg.trust_remote_code)
    prompts = load_prompts(cfg.dataset, tokenizer, cfg.dataset_split, cfg.dataset_config, cfg.prompt_column)
    if cfg.max_prompts is not None:
        n = cfg.max_prompts
        prompts = dataclasses.replace(prompts, rows=prompts.rows[:n], texts=prompts.texts[:n],
                                      token_ids=prompts.token_ids[:n])
    policy = load_causal_lm(path, cfg.trust_remote_code, cfg.torch_dtype, what=f"--model_{which}").to(device).eval()
    with tqdm(total=len(prompts), desc=f"policy {which.upper()} responding", unit="prompt", dynamic_ncols=True,
              disable=cfg.disable_progress_bar) as bar:
        responses = sample_completions(policy, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.seed,
                                       f"winrate/{which}", cfg.batch_size, bar, cfg.max_prompt_length)
    del policy
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return prompts.rows, responses


def run_winrate(cfg: WinrateConfig) -> dict:
    """Generate with A, generate with B, judge, write the result; returns it."""
    out = check_output_file(cfg)
    check_inputs(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, responses_a = respond(cfg, "a", device)
    _, responses_b = respond(cfg, "b", device)
    judge = build_judge(cfg.judge, cfg.judge_settings(device))
    prompts = [row[cfg.prompt_column] for row in rows]
    columns = {name: [row.get(name) for row in rows] for name in rows[0] if name != cfg.prompt_column}
    verdicts = judge.compare(prompts, responses_a, responses_b, columns)
    result = {**summarise(verdicts), "judge": judge.name, "model_a": cfg.model_a, "model_b": cfg.model_b,
              "dataset": cfg.dataset, "judge_stats": judge.stats, "config": dataclasses.asdict(cfg),
              "records": [{"prompt": p, "response_a": a, "response_b": b, "verdict": v.winner, "score": v.score,
                           **v.details}
                          for p, a, b, v in zip(prompts, responses_a, responses_b, verdicts)]}
    result["warnings"] = judge_warnings(result)
    for warning in result["warnings"]:
        log.warning("%s: %s", judge.name, warning)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(summary_line(result, out))
    return result


def summary_line(result: dict, out: Path) -> str:
    rate = (f"{result['win_rate']:.3f} (95% CI {result['ci_low']:.3f}-{result['ci_high']:.3f}; "
            if result["n"] else "n/a (no prompt judged; ")
    judge = ""
    if diagnostics := result.get("judge_diagnostics"):
        share, agreement = diagnostics["first_position_share"], diagnostics["agreement"]
        judge = (f"; judge named the first position in {'n/a' if share is None else f'{share:.0%}'} of its answers, "
                 f"orders agreed on {'n/a' if agreement is None else f'{agreement:.0%}'} of pairs")
    return (f"win rate of A over B: {rate}{result['wins']} wins, {result['losses']} losses, {result['ties']} ties "
            f"of {result['n']}, {result['abstentions']} abstentions) by {result['judge']}{judge}; "
            f"A={result['model_a']} B={result['model_b']} -> {out}")
