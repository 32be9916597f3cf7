"""Judges of policy A's response against policy B's to the same prompt (docs/p3o.md section 6).

A judge maps (prompts, responses of A, responses of B) to one `Verdict` per prompt: "A" (A's response
is better), "B", or "tie". Judges are a registry keyed by the kind in `--judge KIND:ARGUMENT`:

- `gold:TASK`, `reward_fn:SPEC`, `reward_model:PATH` score each response on its own; the higher
  score wins and |score_a - score_b| <= tie_margin (default 0: equal scores) is a tie.
- `llm:MODEL` asks a chat model behind any OpenAI-compatible API; `hf:PATH` reads a local causal
  LM's next-token log-probabilities of the answers "A" and "B". Both see every pair in both orders
  (A's response shown first, then B's), so that a preference for a position or a label cancels.

Shape legend: N = prompts; 2N = judging prompts (every pair in order AB, then every pair in order BA);
b = judging prompts in a forward pass; L = their tokens (left-padded); V = vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p3o.errors import UsageError

log = logging.getLogger(__name__)

JUDGE_PROMPT = """Which of the two responses below answers the prompt better: more helpful, more accurate and more relevant to it? Do not let the order in which the responses are shown influence you.

[Prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Reply with one word: "A" if Response A is better, "B" if Response B is better, or "tie" if neither is better."""

ANSWER_CUE = "\n\nAnswer:"  # ends the judging prompt for an `hf:` judge whose tokenizer has no chat template
SCORES = {"A": 1.0, "tie": 0.5, "B": 0.0}  # a verdict's contribution to A's win rate
ORDERS = ("AB", "BA")  # which policy's response is shown first, as "Response A"


@dataclass
class Verdict:
    winner: str  # "A" (policy A's response is better), "B" or "tie"
    details: dict[str, Any] = field(default_factory=dict)  # what decided it: scores, answers per order, margin

    @property
    def score(self) -> float:
        return SCORES[self.winner]


@dataclass
class JudgeSettings:
    """What the judge kinds need beyond their `--judge` argument (the `--judge_*` flags of `p3o winrate`)."""

    tie_margin: float = 0.0
    batch_size: int = 32
    device: Any = None
    trust_remote_code: bool = False
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    cache_path: Path | None = None
    max_retries: int = 5
    timeout: float = 60.0
    workers: int = 4
    backoff: float = 1.0  # seconds before the first retry; doubled after each one
    dtype: str = "auto"  # weights of an hf: judge
    progress: bool = False  # progress bars over the judging


@dataclass
class JudgeKind:
    build: Callable[[str, JudgeSettings], Any]  # (argument, settings) -> a judge with .name and .compare
    argument: str  # what follows `KIND:`, for error messages
    check: Callable[[str, JudgeSettings], None]  # cheap validation, run before any model loads


JUDGES: dict[str, JudgeKind] = {}


def register_judge(kind: str, argument: str, check: Callable[[str, JudgeSettings], None] = lambda arg, s: None):
    """Decorator: make a judge factory available as `--judge kind:ARGUMENT`."""

    def decorate(build: Callable) -> Callable:
        if kind in JUDGES:
            raise ValueError(f"judge kind {kind!r} is registered twice")
        JUDGES[kind] = JudgeKind(build, argument, check)
        return build

    return decorate


def parse_judge_spec(spec: str) -> tuple[str, str]:
    """`KIND:ARGUMENT` -> (kind, argument); unknown kinds are refused with the list of known ones."""
    kind, _, argument = spec.partition(":")
    usage = ", ".join(f"{k}:{v.argument}" for k, v in JUDGES.items())
    if kind not in JUDGES:
        raise UsageError(f"unknown judge kind {kind!r} in --judge {spec}; known kinds: {', '.join(JUDGES)} "
                         f"(write one of {usage})")
    if not argument:
        raise UsageError(f"--judge {kind} needs its argument: write --judge {kind}:{JUDGES[kind].argument}")
    return kind, argument


def check_judge(spec: str, settings: JudgeSettings) -> None:
    kind, argument = parse_judge_spec(spec)
    JUDGES[kind].check(argument, settings)


def build_judge(spec: str, settings: JudgeSettings):
    kind, argument = parse_judge_spec(spec)
    return JUDGES[kind].build(argument, settings)


def by_margin(margin: float, tie_margin: float) -> str:
    """A preference for A of `margin` -> "A" beyond +tie_margin, "B" beyond -tie_margin, else "tie"."""
    return "A" if margin > tie_margin else "B" if margin < -tie_margin else "tie"


def combine_orders(answer_ab: str | None, answer_ba: str | None) -> str:
    """One verdict from the answers in the two orders, by the sign of a vote sum: each order gives +1
    to the policy whose response it preferred and 0 for a tie or an unreadable answer. So A in both
    orders is a win, A in one and tie in the other a win, A in one and B in the other (what a judge
    that always picks a position says) a tie."""
    votes = {"AB": {"A": 1, "B": -1}, "BA": {"A": -1, "B": 1}}
    total = votes["AB"].get(answer_ab, 0) + votes["BA"].get(answer_ba, 0)
    return by_margin(total, 0)


def prompt_text(prompt: Any) -> str:
    """A dataset prompt as text for a judging prompt: chat messages become `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def judging_prompts(prompts: list, responses_a: list[str], responses_b: list[str]) -> list[str]:
    """2N judging prompts: every pair with A's response first (order AB), then every pair with B's first (BA)."""
    texts = [prompt_text(p) for p in prompts]
    shown = list(zip(texts, responses_a, responses_b)) + list(zip(texts, responses_b, responses_a))
    return [JUDGE_PROMPT.format(prompt=p, response_a=first, response_b=second) for p, first, second in shown]


class ScoreJudge:
    """A reward scores each response on its own; the higher score wins."""

    def __init__(self, name: str, reward, tie_margin: float = 0.0):
        self.name, self.reward, self.tie_margin = name, reward, tie_margin
        self.stats: dict[str, Any] = {}

    def compare(self, prompts: list, responses_a: list[str], responses_b: list[str],
                columns: dict[str, list] | None = None) -> list[Verdict]:
        columns = columns or {}
        scores_a = self.reward(prompts, _as_reward_completions(prompts, responses_a), **columns).tolist()
        scores_b = self.reward(prompts, _as_reward_completions(prompts, responses_b), **columns).tolist()
        return [Verdict(by_margin(a - b, self.tie_margin), {"score_a": a, "score_b": b})
                for a, b in zip(scores_a, scores_b)]


def _as_reward_completions(prompts: list, responses: list[str]) -> list:
    """Completions as `p3o train` hands them to a reward: messages when the prompts are messages."""
    if prompts and not isinstance(prompts[0], str):
        return [[{"role": "assistant", "content": r}] for r in responses]
    return responses


def _check_reward_fn(spec: str, settings: JudgeSettings) -> None:
    from p3o.reward import load_reward_function

    load_reward_function(spec)


def _check_task(name: str, settings: JudgeSettings) -> None:
    from p3o.tasks import get_task

    get_task(name)


def _check_path(what: str) -> Callable[[str, JudgeSettings], None]:
    def check(name: str, settings: JudgeSettings) -> None:
        from p3o.models.loading import _check_exists

        _check_exists(name, what)

    return check


@register_judge("gold", "TASK", _check_task)
def _gold_judge(task: str, settings: JudgeSettings) -> ScoreJudge:
    from p3o.reward import RewardFunction
    from p3o.tasks import get_task

    return ScoreJudge(f"gold:{task}", RewardFunction(get_task(task).gold_reward, f"gold:{task}"), settings.tie_margin)


@register_judge("reward_fn", "package.module:fn or path/file.py:fn", _check_reward_fn)
def _reward_fn_judge(spec: str, settings: JudgeSettings) -> ScoreJudge:
    from p3o.reward import build_reward

    return ScoreJudge(f"reward_fn:{spec}", build_reward(spec, None), settings.tie_margin)


@register_judge("reward_model", "PATH", _check_path("reward model"))
def _reward_model_judge(path: str, settings: JudgeSettings) -> ScoreJudge:
    from p3o.reward import build_reward

    reward = build_reward(None, path, settings.trust_remote_code, settings.batch_size, settings.device)
    return ScoreJudge(f"reward_model:{path}", reward, settings.tie_margin)


ANSWER_RE = re.compile(r"(?i:verdict|answer)\W*(A|B|(?i:tie))\b")  # the label itself in capitals: "answer a" is prose


def parse_answer(reply: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply: the reply itself (quotes, stars, a full stop allowed),
    or the last `Verdict: X` / `Answer: X` in a longer one; None when it says neither."""
    bare = reply.strip().strip("\"'*`.").strip().lower()
    if bare in ("a", "b", "tie"):
        return bare.upper() if bare != "tie" else "tie"
    found = ANSWER_RE.findall(reply)
    if not found:
        return None
    last = found[-1].lower()
    return last.upper() if last != "tie" else "tie"


class ReplyCache:
    """Judge replies on disk, one JSON line each, keyed by a hash of the exact request (judge model and
    messages, hence the prompt, both responses and their order), so a rerun asks nothing twice. Lines
    are appended and flushed as replies arrive: an interrupted run keeps every reply it paid for."""

    def __init__(self, path: Path | None):
        self.path, self.replies = path, {}
        if path is not None and path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self.replies[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s: line %d is not a cached reply (cut by a crash?); ignoring it", path, number)

    @staticmethod
    def key(model: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.replies[key] = entry["reply"]
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, **entry}, ensure_ascii=False) + "\n")


RETRIED_STATUS = {408, 429}  # and every 5xx


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would resend the Authorization header to wherever it points: refuse it (the 3xx
    then surfaces as an HTTPError naming the base URL to fix)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


class LLMJudge:
    """An LLM judge behind an OpenAI-compatible chat-completions API (POST {base_url}/chat/completions,
    temperature 0), standard library only. The API key is read from an environment variable and goes
    only into the Authorization header: never into a log line, an error, the cache or an output file."""

    def __init__(self, model: str, settings: JudgeSettings):
        self.model, self.settings = model, settings
        self.name = f"llm:{model}"
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(settings.api_key_env)
        self.cache = ReplyCache(settings.cache_path)
        self.stats = {"requests": 0, "cached": 0, "unparsed": 0}
        self._count = threading.Lock()  # requests are counted from the worker threads

    def compare(self, prompts: list, responses_a: list[str], responses_b: list[str],
                columns: dict[str, list] | None = None) -> list[Verdict]:
        replies = self.ask([[{"role": "user", "content": text}]
                            for text in judging_prompts(prompts, responses_a, responses_b)])  # 2N
        answers = [parse_answer(r) for r in replies]
        self.stats["unparsed"] += sum(a is None for a in answers)
        if answers and self.stats["unparsed"] > 0.1 * len(answers):  # unread replies count as ties
            log.warning("%s: %d of %d replies named neither response (they count as abstentions, pulling the win "
                        "rate towards 0.5); see reply_ab/reply_ba in the output and adjust the judge or prompt",
                        self.name, self.stats["unparsed"], len(answers))
        n = len(prompts)
        return [Verdict(combine_orders(answers[i], answers[n + i]),
                        {"answer_ab": answers[i], "answer_ba": answers[n + i],
                         "reply_ab": replies[i], "reply_ba": replies[n + i]})
                for i in range(n)]

    def ask(self, conversations: list[list[dict]]) -> list[str]:
        """Each conversation's reply, from the cache or the API (`workers` requests at a time)."""
        keys = [ReplyCache.key(f"{self.url} {self.model}", c) for c in conversations]  # two servers never share replies
        todo = {k: c for k, c in zip(keys, conversations) if k not in self.cache.replies}
        self.stats["cached"] += len(keys) - len(todo)
        if todo:
            log.info("asking %s for %d verdicts (%d cached)", self.name, len(todo), len(keys) - len(todo))
            pool = ThreadPoolExecutor(self.settings.workers)
            try:
                with _progress(len(todo), f"judging with {self.name}", "request", self.settings) as bar:
                    for key, reply in zip(todo, pool.map(self.request, todo.values())):
                        self.cache.put(key, {"model": self.model, "reply": reply})
                        bar.update()
            finally:
                pool.shutdown(cancel_futures=True)  # after a fatal error, ask nothing more
        return [self.cache.replies[k] for k in keys]

    def request(self, messages: list[dict]) -> str:
        """One chat completion, retried with exponential back-off on 429, 5xx and timeouts."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            with self._count:
                self.stats["requests"] += 1
            wait = self.settings.backoff * 2 ** attempt
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with _NO_REDIRECTS.open(request, timeout=self.settings.timeout) as response:
                    return self._reply_text(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRIED_STATUS and exc.code < 500:
                    raise UsageError(self._refused(exc)) from None
                problem, wait = f"HTTP {exc.code}", _retry_after(exc, wait)
            except (TimeoutError, ConnectionResetError, urllib.error.URLError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(exc, urllib.error.URLError) and not isinstance(reason, (TimeoutError, ConnectionResetError)):
                    raise UsageError(f"cannot reach the judge API at {self.url} ({reason}); check --judge_base_url "
                                     "and that the server is running") from None
                problem = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            wait = min(wait, 60.0)
            if attempt + 1 < attempts:
                log.warning("judge API %s: %s; retrying in %.1f s (%d of %d)", self.url, problem, wait,
                            attempt + 1, self.settings.max_retries)
                time.sleep(wait)
        raise UsageError(f"the judge API at {self.url} failed {attempts} times (last: {problem}); check the server, "
                         "or raise --judge_max_retries / --judge_timeout")

    def _reply_text(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise UsageError(f"the judge API at {self.url} did not answer in the chat-completions format "
                             "(choices[0].message.content); check --judge_base_url") from None
        return content if isinstance(content, str) else ""

    def _refused(self, exc: urllib.error.HTTPError) -> str:
        detail = exc.read(300).decode("utf-8", "replace").splitlines()
        detail = f": {detail[0]}" if detail else ""
        if exc.code in (401, 403):
            return (f"the judge API at {self.url} refused the key (HTTP {exc.code}{detail}); put the key in the "
                    f"environment variable {self.settings.api_key_env} or name another with --judge_api_key_env")
        return f"the judge API at {self.url} refused the request (HTTP {exc.code}{detail}); check --judge_model"


def _progress(total: int, desc: str, unit: str, settings: JudgeSettings):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not settings.progress)


def _retry_after(exc: urllib.error.HTTPError, default: float) -> float:
    """The server's Retry-After in seconds where it gives a number, else the back-off."""
    try:
        return max(float(exc.headers.get("Retry-After", "")), 0.0)
    except (TypeError, ValueError):
        return default


def _check_llm(model: str, settings: JudgeSettings) -> None:
    if not settings.base_url.startswith(("http://", "https://")):
        raise UsageError(f"--judge_base_url {settings.base_url} must start with http:// or https://")
    if not os.environ.get(settings.api_key_env):
        log.warning("environment variable %s is not set: asking the judge API without a key",
                    settings.api_key_env)


@register_judge("llm", "MODEL", _check_llm)
def _llm_judge(model: str, settings: JudgeSettings) -> LLMJudge:
    return LLMJudge(model, settings)


class HFJudge:
    """A local causal LM as judge, shown the same judging prompt as `llm:`. In each order it gives
    d = log p("A") - log p("B") for its next token; the preference for policy A is
    m = (d_AB - d_BA) / 2, which cancels any constant lean towards a position or a label. |m| <= tie_margin
    is a tie: with the default margin 0 that happens when the two orders lean the same way by the same
    amount, as they do exactly for two identical responses."""

    def __init__(self, model, tokenizer, name: str, settings: JudgeSettings):
        self.model, self.tokenizer, self.name, self.settings = model, tokenizer, name, settings
        self.labels = {label: _label_token_ids(tokenizer, label, name) for label in ("A", "B")}
        config = model.config
        self.max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 10**9
        self.stats = {"truncated": 0}

    @torch.no_grad()
    def compare(self, prompts: list, responses_a: list[str], responses_b: list[str],
                columns: dict[str, list] | None = None) -> list[Verdict]:
        token_ids = [self._tokens(text) for text in judging_prompts(prompts, responses_a, responses_b)]  # 2N
        truncated = sum(len(ids) > self.max_length for ids in token_ids)
        if truncated:
            log.warning("judge %s: %d of %d judging prompts exceed its %d-token context and lose their start",
                        self.name, truncated, len(token_ids), self.max_length)
        self.stats["truncated"] += truncated
        size, parts = self.settings.batch_size, []
        with _progress(len(token_ids), f"judging with {self.name}", "prompt", self.settings) as bar:
            for first in range(0, len(token_ids), size):
                parts.append(self._label_margin(token_ids[first:first + size]))  # (b,)
                bar.update(len(parts[-1]))
        d = torch.cat(parts)  # (2N,)
        n = len(prompts)
        margins = ((d[:n] - d[n:]) / 2).tolist()  # (N,) preference for policy A, position lean cancelled
        return [Verdict(by_margin(m, self.settings.tie_margin), {"margin": m, "d_ab": ab, "d_ba": ba})
                for m, ab, ba in zip(margins, d[:n].tolist(), d[n:].tolist())]

    def _tokens(self, text: str) -> list[int]:
        """The judging prompt as a user turn of the chat template, or followed by ANSWER_CUE without one."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text + ANSWER_CUE)["input_ids"]

    def _label_margin(self, token_ids: list[list[int]]) -> torch.Tensor:
        """log p("A") - log p("B") of the next token after each judging prompt: b prompts -> (b,)."""
        from p3o.rl.rollout import pad_prompts, supports_logits_to_keep

        ids, mask = pad_prompts(self.tokenizer, token_ids, self.max_length)  # (b, L), left-padded
        ids, mask = ids.to(self.settings.device), mask.to(self.settings.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, L): left padding changes nothing
        kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(self.model) else {}
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                            **kwargs).logits[:, -1]  # (b, V)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (b, V)
        a = logp[:, self.labels["A"]].logsumexp(-1)  # (b,)
        b = logp[:, self.labels["B"]].logsumexp(-1)  # (b,)
        return (a - b).cpu()


def _label_token_ids(tokenizer, label: str, name: str) -> list[int]:
    """Tokens that spell `label` as the next word: the first token of "A" and of " A" (BPE tokenizers
    mark the space), kept only where the token decodes to the label itself."""
    ids = set()
    for variant in (label, " " + label):
        first = tokenizer(variant, add_special_tokens=False)["input_ids"][:1]
        ids.update(i for i in first if tokenizer.decode([i]).strip() == label and i != tokenizer.unk_token_id)
    if not ids:
        raise UsageError(f"judge {name}: its tokenizer has no token for the answer {label!r}; use a judge model "
                         "whose vocabulary spells A and B")
    return sorted(ids)


@register_judge("hf", "PATH", _check_path("judge model"))
def _hf_judge(path: str, settings: JudgeSettings) -> HFJudge:
    from p3o.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(path, settings.trust_remote_code)
    model = load_causal_lm(path, settings.trust_remote_code, settings.dtype, what="judge model").to(settings.device).eval()
    return HFJudge(model, tokenizer, f"hf:{path}", settings)
