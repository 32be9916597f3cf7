"""Judges of policy A's response against policy B's to the same prompt (docs/p3o.md section 6).

A judge maps (prompts, responses of A, responses of B) to one `Verdict` per prompt: "A" (A's response
is better), "B", or "tie". Judges are a registry keyed by the kind in `--judge KIND:ARGUMENT`:

- `gold:TASK`, `reward_fn:SPEC`, `reward_model:PATH` score each response on its own; the higher
  score wins and |score_a - score_b| <= tie_margin (default 0: equal scores) is a tie.
- `llm:MODEL` asks a chat model behind any OpenAI-compatible API; `hf:PATH` reads a local causal
  LM's next-token log-probabilities of the answers "A" and "B". Both see every pair in both orders
  (A's response shown first, then B's), so that a preference for a position or a label cancels.
  An `llm:` pair is decided only when both orders were read and name the same policy
  (`combine_orders`); a pair with an unreadable order is an abstention (winner "abstain"), which
  `p3o.eval.winrate.summarise` leaves out of the win rate and reports.

Shape legend: N = prompts; 2N = judging prompts (every pair in order AB, then every pair in order BA);
b = judging prompts in a forward pass; L = their tokens (left-padded); V = vocabulary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p3o.errors import UsageError
from p3o.models.loading import CAUSAL_LM_HEADS, _check_exists, context_length, load_causal_lm, load_tokenizer
from p3o.reward import RewardFunction, build_reward, load_reward_function
from p3o.rl.rollout import pad_prompts, supports_logits_to_keep
from p3o.tasks import get_task

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
ABSTAIN = "abstain"  # a pair the judge gave no evidence on: left out of the win rate, counted apart
ORDERS = ("AB", "BA")  # which policy's response is shown first, as "Response A"


@dataclass
class Verdict:
    winner: str  # "A" (policy A's response is better), "B", "tie" or "abstain" (no evidence: not scored)
    details: dict[str, Any] = field(default_factory=dict)  # what decided it: scores, answers per order, margin

    @property
    def score(self) -> float | None:
        return SCORES.get(self.winner)  # None for an abstention


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
    max_tokens: int = 32  # llm judge: tokens a reply may have (the label comes first or early)
    logprobs: bool = True  # llm judge: ask for the first answer token's top log-probabilities
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


POLICY_NAMED = {"AB": {"A": "A", "B": "B", "tie": "tie"}, "BA": {"A": "B", "B": "A", "tie": "tie"}}
# the policy an answer names in each order: in order BA policy B's response is shown as "Response A"


def combine_orders(answer_ab: str | None, answer_ba: str | None) -> str:
    """One verdict from the answers ("A", "B", "tie" or None = unreadable) in the two orders.

    No decision without evidence: the pair is decisive only when both orders were read and both name
    the same policy. Both orders calling it a tie is a tie; orders that disagree (a judge naming the
    same position both times, or one naming a policy and the other a tie) are a tie too, so a judge that
    only ever names one position gives exactly 0.5. A pair with an unreadable order is an abstention."""
    if answer_ab is None or answer_ba is None:
        return ABSTAIN
    ab, ba = POLICY_NAMED["AB"][answer_ab], POLICY_NAMED["BA"][answer_ba]
    return ab if ab == ba else "tie"


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
    load_reward_function(spec)


def _check_task(name: str, settings: JudgeSettings) -> None:
    get_task(name)


def _check_path(what: str, heads: tuple[str, ...]) -> Callable[[str, JudgeSettings], None]:
    """The model exists and, where its config.json names its class, has one of `heads`: checked before
    the policies generate, not after."""
    def check(name: str, settings: JudgeSettings) -> None:
        _check_exists(name, what)
        config = Path(name) / "config.json"
        saved = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
        if saved and not any(a.endswith(heads) for a in saved):
            raise UsageError(f"{what} {name} was saved as {', '.join(saved)}; give a model ending in "
                             f"{' or '.join(heads)}")

    return check


@register_judge("gold", "TASK", _check_task)
def _gold_judge(task: str, settings: JudgeSettings) -> ScoreJudge:
    return ScoreJudge(f"gold:{task}", RewardFunction(get_task(task).gold_reward, f"gold:{task}"), settings.tie_margin)


@register_judge("reward_fn", "package.module:fn or path/file.py:fn", _check_reward_fn)
def _reward_fn_judge(spec: str, settings: JudgeSettings) -> ScoreJudge:
    return ScoreJudge(f"reward_fn:{spec}", build_reward(spec, None), settings.tie_margin)


@register_judge("reward_model", "PATH", _check_path("reward model", ("ForSequenceClassification",)))
def _reward_model_judge(path: str, settings: JudgeSettings) -> ScoreJudge:
    reward = build_reward(None, path, settings.trust_remote_code, settings.batch_size, settings.device)
    return ScoreJudge(f"reward_model:{path}", reward, settings.tie_margin)


_LABEL = r"(A|B|[Tt][Ii][Ee])(?![\w'’-])"  # the label itself in capitals: "answer a" is prose
_ADVERB = r"(?:(?i:indeed|clearly|definitely|obviously|probably)\s+)?"
_NAMED = (r"""[\s"'*`(\[:]*""" + _ADVERB + r"""["'*`(\[]*(?:(?i:response|option|assistant)\s+)?"""
          + _LABEL)  # "B", **B**, "Response B", (B), indeed "B"
ANCHORED_RE = re.compile(  # "The answer is "B"", "Answer: B", "**Verdict:** B", {"answer": "B"}, "The better response is B"
    r"(?:(?i:\b(?:answer|verdict|choice|decision|winner|better\s+(?:response|one|answer)|preferred\s+response)"
    r"(?:\s+(?:to|for)\s+(?:this|the)\s+(?:prompt|question))?)"  # "The answer to this question is B"
    r"""(?:["'*`]*\s*(?i:is|was|would\s+be|:|=|-|–)|\s*["'*`(\[])"""
    r"|\bI\s+(?i:would\s+)?(?i:choose|pick|prefer|select|go\s+with))" + _NAMED)
LEADING_RE = re.compile(  # a reply that opens with the label, then an explanation: "B. Response B ...", "A - ..."
    r"""^[\s"'*`(\[]*(?:(?i:response|option)\s+)?""" + _LABEL + r"""(?:\s*(?:$|[.:,;!)\]\n—–-])|["'*`])""")
_PRAISE = (r"accurate|helpful|complete|relevant|concise|informative|correct|appropriate|detailed|clear|coherent|"
           r"useful|thorough|faithful|fluent|precise|specific|honest|harmless|engaging|readable|natural")
BETTER_RE = re.compile(  # "Response B is better", "A is the best answer", "B is a more accurate one": a capital A
    # before "is" is never the article; negations ("A is not better"), "worse"/"less" and "more" with a word
    # that is not praise ("A is more confusing") are not matched
    r"(?:(?i:response|option)\s+)?\b(A|B)\s+(?i:is|was)\s+" + _ADVERB + r"(?i:(?:the|a|an|much|far|slightly|only)\s+)*"
    r"(?i:better|best|preferred|superior|stronger|correct|right|winner|more\s+(?:" + _PRAISE + r"))\b")
NEITHER_RE = re.compile(r"(?i:\bneither\b|\bnor\b)")  # "Neither A nor B is better": no verdict from BETTER_RE
OPENS_WITH_LABEL = re.compile(r"""^[\s"'*`(\[]*(?:A|B)(?![\w'’-])""")  # "A common mistake ...": an article
TIE_RE = re.compile(r"(?i:\b(?:it'?s|it\s+is|this\s+is)\s+a\s+tie\b)")
_WRAPPERS = "\"'*`_.,:;!()[]{}<> \t\n"


def _label(word: str) -> str:
    return "tie" if word.lower() == "tie" else word.upper()


def parse_answer(reply: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply, or None when it names neither for sure. Read, in order:
    the bare label with its wrappings (quotes, bold, brackets, a full stop, "Response B"); the last
    `answer`/`verdict` phrase naming a label ("The answer is "B"", "Answer: B", "**Verdict:** B", "The
    better response is B"); a reply that opens with the label and then explains ("B. Response B
    ..."); "Response B is better", "A is the best answer" where every such phrase names the same label;
    "it's a tie". Labels are
    the capitals A and B: prose that merely contains one ("...a good answer. A better one...") is None."""
    bare = reply.strip().strip(_WRAPPERS)
    bare = re.sub(r"^(?i:response|option)\s+", "", bare).strip(_WRAPPERS)
    if bare.lower() in ("a", "b", "tie"):
        return _label(bare)
    if found := ANCHORED_RE.findall(reply):
        return _label(found[-1])
    if found := LEADING_RE.match(reply):
        return _label(found.group(1))
    if not NEITHER_RE.search(reply) and len(found := set(BETTER_RE.findall(reply))) == 1:
        return found.pop()
    if TIE_RE.search(reply):
        return "tie"
    return None


def label_margin(logprobs: Any) -> float | None:
    """log p("A") - log p("B") of a chat completion's first answer token, from its `top_logprobs`
    (choices[0].logprobs.content, OpenAI's format, which llama.cpp and vLLM serve too): at the first
    generated token that is not only whitespace, quotes or stars, the tokens spelling A and B. Where one
    label is not among the top ones, its log-probability is bounded by the least one listed, which
    gives a margin at least that large. None without logprobs or when neither label is listed."""
    try:
        content = logprobs["content"]
        position = next(t for t in content if t["token"].strip(_WRAPPERS))
        top = [(t["token"].strip(_WRAPPERS), float(t["logprob"])) for t in position["top_logprobs"]]
    except (KeyError, TypeError, StopIteration, ValueError):
        return None
    if not top:
        return None
    floor = min(lp for _, lp in top)
    label = {}
    for name in ("A", "B"):
        values = [lp for token, lp in top if token == name]
        label[name] = float(torch.tensor(values).logsumexp(0)) if values else None
    if label["A"] is None and label["B"] is None:
        return None
    return (label["A"] if label["A"] is not None else floor) - (label["B"] if label["B"] is not None else floor)


def order_diagnostics(answers_ab: list[str | None], answers_ba: list[str | None]) -> dict[str, Any]:
    """How the judge behaved over the two orders, from the answers per order ("A", "B", "tie", None):
    `first_position_share` of the answers naming a position that named the first one ("A"; 1.0 or 0.0
    is pure position bias, 0.5 none); `agreement` of the pairs read in both orders, the share whose
    two orders named the same policy (or both a tie); `abstentions`, pairs with an unreadable order;
    `unreadable`, replies read as nothing."""
    answers = answers_ab + answers_ba
    positional = [a for a in answers if a in ("A", "B")]
    read = [(ab, ba) for ab, ba in zip(answers_ab, answers_ba) if ab is not None and ba is not None]
    agree = sum(POLICY_NAMED["AB"][ab] == POLICY_NAMED["BA"][ba] for ab, ba in read)
    return {"first_position_share": sum(a == "A" for a in positional) / len(positional) if positional else None,
            "agreement": agree / len(read) if read else None,
            "pairs_read_in_both_orders": len(read),
            "abstentions": len(answers_ab) - len(read),
            "unreadable": sum(a is None for a in answers),
            "replies": len(answers)}


class ReplyCache:
    """Judge replies on disk, one JSON line each, keyed by a hash of the exact request (judge model,
    reply length and messages, hence the prompt, both responses and their order), so a rerun asks
    nothing twice. Lines are appended and flushed as replies arrive: an interrupted or failed run keeps
    every reply it paid for. An entry is {"reply": text, "margin": log p(A) - log p(B) or null}."""

    def __init__(self, path: Path | None):
        self.path, self.replies = path, {}
        if path is not None and path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self.replies[entry["key"]] = {"reply": entry["reply"], "margin": entry.get("margin")}
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    log.warning("%s: line %d is not a cached reply (cut by a crash?); ignoring it", path, number)
        self._write = threading.Lock()

    @staticmethod
    def key(model: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()

    def put(self, key: str, entry: dict[str, Any]) -> None:
        with self._write:
            self.replies[key] = {"reply": entry["reply"], "margin": entry.get("margin")}
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, **entry}, ensure_ascii=False) + "\n")


RETRIED_STATUS = {408, 429}  # and every 5xx
# a connection refused, reset or cut, or a timeout: a server restarting or overloaded, retried like a 5xx
RETRIED_ERRORS = (TimeoutError, ConnectionError, http.client.HTTPException, urllib.error.URLError, OSError)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would resend the Authorization header to wherever it points: refuse it (the 3xx
    then surfaces as an HTTPError naming the base URL to fix)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


class LLMJudge:
    """An LLM judge behind an OpenAI-compatible chat-completions API (POST {base_url}/chat/completions,
    temperature 0, at most `max_tokens` tokens, asking for the first tokens' top log-probabilities),
    standard library only. Each order's answer is the reply's text as `parse_answer` reads it; a reply
    it cannot read is answered by the log-probabilities of "A" and "B" at the reply's first token where
    the server sent them (llama.cpp, vLLM and OpenAI do), as the `hf:` judge reads its model, unless
    the reply opens with the capital A or B itself: "A common mistake ..." is prose whose article is no
    vote, and stays unread. The API key
    is read from an environment variable and goes only into the Authorization header: never into a log
    line, an error, the cache or an output file."""

    def __init__(self, model: str, settings: JudgeSettings):
        self.model, self.settings = model, settings
        self.name = f"llm:{model}"
        self.base_url = settings.base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.api_key = os.environ.get(settings.api_key_env)
        self.cache = ReplyCache(settings.cache_path)
        self.logprobs = settings.logprobs  # turned off for the run by a server that refuses them
        self.stats = {"requests": 0, "cached": 0, "unparsed": 0, "read_from_logprobs": 0, "with_logprobs": 0}
        self._count = threading.Lock()  # requests are counted from the worker threads

    def compare(self, prompts: list, responses_a: list[str], responses_b: list[str],
                columns: dict[str, list] | None = None) -> list[Verdict]:
        entries = self.ask([[{"role": "user", "content": text}]
                            for text in judging_prompts(prompts, responses_a, responses_b)])  # 2N
        texts = [parse_answer(e["reply"]) for e in entries]
        margins = [e.get("margin") for e in entries]
        answers = [t if t is not None or m is None or OPENS_WITH_LABEL.match(e["reply"]) else by_margin(m, 0.0)
                   for t, m, e in zip(texts, margins, entries)]  # prose opening "A ..." is no vote, as text or token
        self.stats["unparsed"] += sum(t is None for t in texts)
        self.stats["read_from_logprobs"] += sum(t is None and a is not None for t, a in zip(texts, answers))
        self.stats["with_logprobs"] += sum(m is not None for m in margins)
        n = len(prompts)
        if unread := sum(a is None for a in answers):
            log.warning("%s: %d of %d replies named neither response; their pairs are abstentions, left out of "
                        "the win rate (see reply_ab/reply_ba in the output and adjust the judge or prompt)",
                        self.name, unread, len(answers))
        return [Verdict(combine_orders(answers[i], answers[n + i]),
                        {"answer_ab": answers[i], "answer_ba": answers[n + i],
                         "reply_ab": entries[i]["reply"], "reply_ba": entries[n + i]["reply"],
                         "margin_ab": margins[i], "margin_ba": margins[n + i],
                         "read_ab": _source(texts[i], answers[i]), "read_ba": _source(texts[n + i], answers[n + i])})
                for i in range(n)]

    def ask(self, conversations: list[list[dict]]) -> list[dict]:
        """Each conversation's cache entry (reply text and margin), from the cache or the API
        (`workers` requests at a time). Every reply is cached as it arrives; after a fatal error the
        requests not yet sent are dropped, those in flight still finish into the cache, and the error
        is raised."""
        keys = [ReplyCache.key(f"{self.url} {self.model} max_tokens={self.settings.max_tokens}", c)
                for c in conversations]  # two servers never share replies
        todo = {k: c for k, c in zip(keys, conversations) if k not in self.cache.replies}
        self.stats["cached"] += len(keys) - len(todo)
        if todo:
            log.info("asking %s for %d verdicts (%d cached)", self.name, len(todo), len(keys) - len(todo))
            error, pool, failed = None, ThreadPoolExecutor(self.settings.workers), threading.Event()

            def guarded(conversation):  # a worker that failed must not start the next request itself
                if failed.is_set():
                    raise _Dropped
                try:
                    return self.request(conversation)
                except Exception:
                    failed.set()
                    raise

            try:
                with _progress(len(todo), f"judging with {self.name}", "request", self.settings) as bar:
                    futures = {pool.submit(guarded, c): k for k, c in todo.items()}
                    for future in as_completed(futures):
                        if future.cancelled():
                            continue
                        try:
                            entry = future.result()
                        except _Dropped:
                            continue
                        except Exception as exc:  # noqa: BLE001 - the first error is raised once the rest is in
                            if error is None:
                                error = exc
                                for other in futures:
                                    other.cancel()
                            continue
                        self.cache.put(futures[future], {"model": self.model, **entry})
                        bar.update()
            finally:
                pool.shutdown(cancel_futures=True)  # after an interrupt, ask nothing more
            if error is not None:
                raise error
        return [self.cache.replies[k] for k in keys]

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def check_reachable(self) -> None:
        """GET {base_url}/models once, before the policies spend minutes generating: a server that
        cannot be reached or refuses the key is one clear line now. Any other HTTP answer (a server
        without /models) shows the server is there."""
        request = urllib.request.Request(self.base_url + "/models", headers=self._headers(), method="GET")
        try:
            with _NO_REDIRECTS.open(request, timeout=min(self.settings.timeout, 30.0)) as response:
                response.read(1 << 16)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise UsageError(self._refused(exc)) from None
        except RETRIED_ERRORS as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(f"cannot reach the judge API at {self.base_url} ({_describe(reason)}); start the "
                             "server or fix --judge_base_url") from None

    def request(self, messages: list[dict]) -> dict[str, Any]:
        """One chat completion -> {"reply": text, "margin": log p(A) - log p(B) or None}, retried with
        exponential back-off on 408, 429, 5xx, timeouts and connection errors (a server restarting)."""
        attempts = self.settings.max_retries + 1
        attempt = 0
        while attempt < attempts:
            with self._count:
                self.stats["requests"] += 1
            wait = self.settings.backoff * 2 ** attempt
            asked_logprobs = self.logprobs
            payload = {"model": self.model, "messages": messages, "temperature": 0,
                       "max_tokens": self.settings.max_tokens}
            if asked_logprobs:
                payload.update(logprobs=True, top_logprobs=LOGPROBS_TOP)
            try:
                request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=self._headers(),
                                                 method="POST")
                with _NO_REDIRECTS.open(request, timeout=self.settings.timeout) as response:
                    return self._reply(response.read())
            except urllib.error.HTTPError as exc:
                detail = _error_body(exc)
                if exc.code not in RETRIED_STATUS and exc.code < 500:
                    if asked_logprobs and exc.code in (400, 422) and "logprob" in detail.lower():
                        log.warning("judge API %s does not give log-probabilities (%s); reading the replies' text",
                                    self.url, detail)
                        self.logprobs = False
                        continue  # the same attempt again, without them
                    raise UsageError(self._refused(exc, detail)) from None
                problem = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
                wait = _retry_after(exc, wait)
            except RETRIED_ERRORS as exc:
                problem = _describe(getattr(exc, "reason", exc))
            wait = min(wait, 60.0)
            attempt += 1
            if attempt < attempts:
                log.warning("judge API %s: %s; retrying in %.1f s (%d of %d)", self.url, problem, wait,
                            attempt, self.settings.max_retries)
                time.sleep(wait)
        raise UsageError(f"the judge API at {self.url} failed {attempts} times (last: {problem}); check the server, "
                         "or raise --judge_max_retries / --judge_timeout; the replies received so far are cached")

    def _reply(self, raw: bytes) -> dict[str, Any]:
        try:
            choice = json.loads(raw)["choices"][0]
            content = choice["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise UsageError(f"the judge API at {self.url} did not answer in the chat-completions format "
                             "(choices[0].message.content); check --judge_base_url") from None
        margin = label_margin(choice.get("logprobs")) if isinstance(choice, dict) else None
        return {"reply": content if isinstance(content, str) else "", "margin": margin}

    def _refused(self, exc: urllib.error.HTTPError, detail: str | None = None) -> str:
        detail = _error_body(exc) if detail is None else detail
        detail = f": {detail}" if detail else ""
        if exc.code in (401, 403):
            return (f"the judge API at {self.url} refused the key (HTTP {exc.code}{detail}); put the key in the "
                    f"environment variable {self.settings.api_key_env} or name another with --judge_api_key_env")
        return f"the judge API at {self.url} refused the request (HTTP {exc.code}{detail}); check --judge_model"


LOGPROBS_TOP = 10  # top_logprobs asked for: OpenAI allows up to 20


def _source(text: str | None, answer: str | None) -> str | None:
    """Where an order's answer came from: its text, the first token's log-probabilities, or nowhere."""
    return "text" if text is not None else "logprobs" if answer is not None else None


def _describe(reason: Any) -> str:
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def _error_body(exc: urllib.error.HTTPError) -> str:
    """The server's reason for an HTTP error on one line: `error.message` of an OpenAI-style JSON body
    (llama.cpp's "the request exceeds the available context size", say), else the body's start."""
    try:
        raw = exc.read(4096).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a body that cannot be read is no reason
        return ""
    try:
        error = json.loads(raw)
        error = error.get("error", error) if isinstance(error, dict) else error
        message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
        if message:
            raw = str(message)
    except (json.JSONDecodeError, AttributeError):
        raw = re.sub(r"<[^>]*>", " ", raw)  # an HTML error page: its text
    return " ".join(raw.split())[:300]


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
    LLMJudge(model, dataclasses.replace(settings, cache_path=None)).check_reachable()


@register_judge("llm", "MODEL", _check_llm)
def _llm_judge(model: str, settings: JudgeSettings) -> LLMJudge:
    return LLMJudge(model, settings)


class _Dropped(Exception):
    """A request not sent because another one had failed."""


class HFJudge:
    """A local causal LM as judge, shown the same judging prompt as `llm:`. In each order it gives
    d = log p("A") - log p("B") for its next token; the preference for policy A is
    m = (d_AB - d_BA) / 2, which cancels any constant lean towards a position or a label. |m| <= tie_margin
    is a tie: with the default margin 0 that happens when the two orders lean the same way by the same
    amount, as they do exactly for two identical responses. Unlike an `llm:` judge's text, the margins
    are always read (no abstentions), and a pair both of whose orders lean to the first position is
    still decided by how much more it leans in one: a judge with no information gives decisions of
    either sign in equal measure, hence about 0.5 with an interval around it. `answer_ab`/`answer_ba`
    (the sign of each order's d) feed the same diagnostics as an `llm:` judge's answers."""

    def __init__(self, model, tokenizer, name: str, settings: JudgeSettings):
        self.model, self.tokenizer, self.name, self.settings = model, tokenizer, name, settings
        self.labels = {label: _label_token_ids(tokenizer, label, name) for label in ("A", "B")}
        config = model.config
        self.max_length = context_length(config) or 10**9
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
        return [Verdict(by_margin(m, self.settings.tie_margin),
                        {"margin": m, "d_ab": ab, "d_ba": ba, "answer_ab": by_margin(ab, 0.0), "answer_ba": by_margin(ba, 0.0)})
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


@register_judge("hf", "PATH", _check_path("judge model", CAUSAL_LM_HEADS))
def _hf_judge(path: str, settings: JudgeSettings) -> HFJudge:
    tokenizer = load_tokenizer(path, settings.trust_remote_code)
    model = load_causal_lm(path, settings.trust_remote_code, settings.dtype, what="judge model").to(settings.device).eval()
    return HFJudge(model, tokenizer, f"hf:{path}", settings)
