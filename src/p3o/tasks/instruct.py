"""`instruct`: everyday how-to questions with verifiable constraints, for a real chat model (SmolLM2).

Each prompt is one user message: a question about an everyday `Topic` followed by two constraints
(`KINDS`), e.g.

    [{"role": "user", "content": 'How do I make a cup of tea? Answer in at most 15 words. '
                                 'Include the word "morning".'}]

Constraint kinds and their credit in [0, 1] (partial credit, so the signal is smooth):

    word_limit    "Answer in at most N words."          1 up to N words, then falls linearly to 0 at 2N
    bullets       "Use exactly K bullet points."        1 - |items - K| / K (0 without any item)
    include       'Include the word "W".'               1 if W (or W+s) appears, else 0
    exclude       'Do not use the word "W".'            0.5 ** occurrences of W
    lowercase     "Write everything in lowercase letters."  1 - (words with a capital letter) / 4
    one_sentence  "Answer in a single sentence."        1 / sentences (0 for none)
    end_question  "End your reply with a question."     1 ends with "?", 0.3 a "?" elsewhere, else 0
    start_word    'Start your reply with the word "W".' 1 first word, 0.3 among the first five, else 0

Gold reward (`score`), in [0, 3]; 3 is a real, on-topic answer that meets every constraint:

    gold = 3 * quality * (0.3 + 0.7 * mean constraint credit)

`quality` in [0, 1] asks, without a model, whether the reply is a real answer to the question: the
product of (each in [0, 1], 1 for ordinary prose)

    substance   min(1, words / 8): empty or one-word replies are not answers
    english     share of words that are English (`_english.WORDS`, their inflections, numbers, the
                prompt's own words): 1 from 85% down to 0 at 50% (random letters score 0)
    fluency     share of words in sentences with at least 15% function words (partial credit below;
                prose has ~40% "the", "to", "and"...) or in terse list items of 2-8 words: a keyword
                salad or a list of one-word bullets scores 0
    repetition  1 - 2 * (share of repeated word 3-grams), times min(1, distinct/total words / 0.4)
                for replies of 10+ words
    copying     1 while at most 25% of the reply's word 4-grams are the prompt's, 0 from 60% (reciting
                the instruction)
    shouting    1 - 2 * share of ALL-CAPS words (two letters or more)
    on_topic    0.1 + 0.9 * min(1, distinct topic keywords / 2); words a constraint names and words of
                the question's own phrase do not count

So an empty, gibberish, repetitive, recited or shouted reply scores near 0 however many constraints
it meets, an off-topic one at most 0.3 (polite filler that meets every constraint is not an answer),
and among real answers the constraints decide. A prompt that is not one of
the task's scores 0.

Why not a `p3o.tasks.base.Task`: those tasks are closed word-level worlds for the tiny models of
`p3o demo --task` (a `vocab.txt`, demonstrations of each quality, string prompts), and `TASKS` feeds
that demo's choices. This task's prompts are chat messages for a real tokenizer and its completions
come from the model itself, so it has its own small API: `make_prompts(seed, n, split)`,
`gold_reward` (`--reward_fn p3o.tasks.instruct:gold_reward`), `bt_label`/`label_pairs` (noisy
Bradley–Terry labels, as `Task.preference_pairs`), and `write_prompts` (the JSONL files).

Held-out prompts: `RESERVED` holds two constraint kinds per topic (a quarter of all topic–kind
combinations); a "train" prompt uses none of them, an "eval" prompt at least one, so every eval
prompt asks for a combination of topic and constraint that training never sees, while each topic and
each kind does appear in training.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p3o.tasks._english import WORDS
from p3o.tasks.base import repeated_ngrams, sigmoid, text_of, write_jsonl

MAX_GOLD = 3.0
DEFAULT_BETA_BT = 3.0  # gold spans [0, 3]: a 0.5 gap is labelled the right way round 82% of the time


def _stems(word: str) -> set[str]:
    """The word and its candidate stems: "plants" -> "plant", "stopped" -> "stop", "don't" -> "do"."""
    w = word.lower().replace("’", "'")
    out = {w}
    if "'" in w:
        base = w.split("'")[0]
        out |= {base, base[:-1]}  # "it's" -> "it"; "don't" -> "do"
        w = base
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("es", ""), ("s", ""), ("ed", ""), ("ed", "e"), ("ing", ""),
                         ("ing", "e"), ("ly", ""), ("er", ""), ("ers", ""), ("est", ""), ("ness", ""), ("ful", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            stem = w[:-len(suffix)] + repl
            out.add(stem)
            if len(stem) >= 4 and stem[-1] == stem[-2] and not repl:
                out.add(stem[:-1])  # "stopped" -> "stopp" -> "stop"
    return out


@dataclass(frozen=True)
class Topic:
    """An everyday task (`phrase`, as it reads after "how to") and words an answer about it would use
    (not the phrase's own words: restating the question shows nothing)."""

    phrase: str
    keywords: frozenset[str]


def _topic(phrase: str, keywords: str) -> Topic:
    said = set().union(*(_stems(w) for w in phrase.split()))
    return Topic(phrase, frozenset(k for k in keywords.split() if not _stems(k) & said))


TOPICS = (
    _topic("make a cup of tea", "tea cup water boil kettle bag teabag leaves steep milk sugar hot mug brew minutes "
                                "honey lemon pour stir flavor green black herbal temperature drink sip"),
    _topic("keep a houseplant alive", "plant water watering light sun sunlight sunny soil pot leaf leaves window roots "
                                      "fertilizer fertilize humidity humid drain grow moist dry indoor prune repot"),
    _topic("save money each month", "money budget spend expense bank account income bill cost cash savings debt "
                                    "credit card pay payment track afford financial invest grocery coupon salary"),
    _topic("sleep better at night", "sleep bed bedtime night tired caffeine coffee screen phone dark routine rest relax "
                                    "alarm hour quiet morning nap pillow mattress schedule bedroom wake meditation "
                                    "exercise"),
    _topic("cook rice", "rice water pot boil simmer cook cup heat lid minutes salt rinse wash stove grain stir fluffy "
                        "ratio cooker steam drain butter oil measure"),
    _topic("walk a dog", "dog walk leash harness collar park pet treat bag exercise puppy sniff owner route water poop "
                         "training behavior sidewalk neighborhood daily breed"),
    _topic("learn a new language", "language word vocabulary grammar practice speak native app lesson listen read "
                                   "phrase conversation fluent basics immerse immersion daily study course teacher "
                                   "tutor pronunciation sentence book movie partner translate"),
    _topic("clean a kitchen", "kitchen clean counter sink dish soap wipe sponge floor stove oven spray trash cloth "
                              "wash scrub towel bleach cabinet fridge refrigerator tidy sanitize mop sweep grease dirty"),
    _topic("ride a bike safely", "bike bicycle helmet ride road traffic brake light lane cycling signal wheel safety "
                                 "wear reflective visible car driver pedal intersection rule check tire bell"),
    _topic("pack for a trip", "pack suitcase bag backpack clothes outfit trip travel list shoe socks toiletries "
                              "toothbrush medicine passport document ticket charger luggage weather essentials carry"),
    _topic("make friends in a new city", "friend people meet city club event neighbor neighborhood join social "
                                         "conversation hobby coffee invite community volunteer class group activity "
                                         "local meetup gym coworker chat talk introduce"),
    _topic("stay cool in summer", "cool heat hot summer water shade fan drink hydrated sun air conditioning clothing "
                                  "shower cold temperature ice wear shirt pool swim sunscreen breeze loose cotton hat "
                                  "indoors"),
    _topic("prepare for a job interview", "interview interviewer job company question research practice resume "
                                          "answer employer dress outfit skill role position experience confident "
                                          "confidence strength weakness qualification punctual example portfolio"),
    _topic("bake cookies", "cookie dough batter oven preheat bake flour sugar butter egg chocolate chip tray sheet "
                           "minutes mix degree recipe heat pinch cinnamon vanilla golden ingredient cream salt soda"),
    _topic("plan a birthday party", "party birthday guest cake invite invitation decoration balloon food snack drink "
                                    "game date venue location music gift theme celebrate celebration host surprise "
                                    "activity budget"),
    _topic("study for an exam", "study exam note review practice sleep schedule test quiz question flashcard topic "
                                "break read material memorize subject focus concept textbook summary teacher timer"),
)

ASKS = ("How do I {}?", "What is the best way to {}?", "Give me some advice on how to {}.", "Explain how to {}.",
        "Can you tell me how to {}?", "I want to {}. What should I do?")

KINDS = ("word_limit", "bullets", "include", "exclude", "lowercase", "one_sentence", "end_question", "start_word")
# Pairs that cannot both hold (a list is not one sentence, nor starts with a word or ends on a question).
CONFLICTS = frozenset({frozenset(p) for p in (("bullets", "one_sentence"), ("bullets", "end_question"),
                                               ("bullets", "start_word"))})
WORD_LIMITS = (12, 15, 20, 25)
BULLET_COUNTS = (2, 3, 4)
INCLUDE_WORDS = ("simple", "patience", "morning", "friend", "careful", "enjoy", "habit", "weekend", "happy",
                 "calm", "tiny", "today")
EXCLUDE_WORDS = ("you", "your", "and", "also", "very", "can", "will", "make")
START_WORDS = ("Well", "First", "Honestly", "Remember", "Yes", "Okay", "Simply", "Sure")

# Topic i keeps two kinds out of training: every kind is held out for 4 topics, every topic for 2 kinds.
RESERVED = frozenset((t.phrase, KINDS[k % len(KINDS)]) for i, t in enumerate(TOPICS) for k in (i, i + 3))

TEMPLATES = {
    "word_limit": "Answer in at most {} words.",
    "bullets": "Use exactly {} bullet points.",
    "include": 'Include the word "{}".',
    "exclude": 'Do not use the word "{}".',
    "lowercase": "Write everything in lowercase letters.",
    "one_sentence": "Answer in a single sentence.",
    "end_question": "End your reply with a question.",
    "start_word": 'Start your reply with the word "{}".',
}
_PATTERNS = {kind: re.compile(re.escape(t).replace(r"\{\}", r"(\w+)"))
             for kind, t in TEMPLATES.items()}

FUNCTION_WORDS = frozenset("""
the a an and or but if of to in on at by for with from as is are was were be been being it its this that these
those there their they them you your we our us i my me he she his her him not no so than then too very can will
would should could do does did have has had just also all any some each more most such what which who how when
where why about into over up out after before while because until may might must let get make
""".split())

_SPECIAL_RE = re.compile(r"<\|[^|>]*\|>|</?s>")
_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_ITEM_RE = re.compile(r"^\s*(?:[-*•+]|\d+[.)])\s+\S", re.MULTILINE)
_SENTENCE_END_RE = re.compile(r"[.!?]+(?=\s|$)|\n+")


@dataclass(frozen=True)
class Constraint:
    kind: str
    arg: str = ""

    def render(self) -> str:
        return TEMPLATES[self.kind].format(self.arg)


@dataclass(frozen=True)
class Instruction:
    """A prompt: the topic, how it is asked, and its constraints."""

    topic: Topic
    ask: str
    constraints: tuple[Constraint, ...]

    def render(self) -> str:
        return " ".join([self.ask.format(self.topic.phrase), *(c.render() for c in self.constraints)])

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.render()}]

    @property
    def split(self) -> str:
        return "eval" if any((self.topic.phrase, c.kind) in RESERVED for c in self.constraints) else "train"

    @staticmethod
    def parse(prompt: Any) -> Instruction | None:
        """The instruction a prompt (chat messages or text) asks, or None when it is not one of the task's."""
        text = text_of(prompt)
        topics = [t for t in TOPICS if t.phrase in text]
        if not topics:
            return None
        topic = max(topics, key=lambda t: len(t.phrase))
        found = []
        for kind, pattern in _PATTERNS.items():
            match = pattern.search(text)
            if match:
                found.append((match.start(), Constraint(kind, match.group(1) if match.groups() else "")))
        ask = next((a for a in ASKS if a.format(topic.phrase) in text), ASKS[0])
        return Instruction(topic, ask, tuple(c for _, c in sorted(found, key=lambda f: f[0])))


def _argument(kind: str, rng: random.Random) -> str:
    choices = {"word_limit": WORD_LIMITS, "bullets": BULLET_COUNTS, "include": INCLUDE_WORDS,
               "exclude": EXCLUDE_WORDS, "start_word": START_WORDS}.get(kind)
    return str(rng.choice(choices)) if choices else ""


def draw_instruction(rng: random.Random, split: str | None = None) -> Instruction:
    """One instruction of `split` ("train": only topic–kind pairs outside `RESERVED`; "eval": at least
    one inside; None: either). Two compatible constraints of different kinds."""
    while True:
        topic = rng.choice(TOPICS)
        kinds = rng.sample(KINDS, 2)
        if frozenset(kinds) in CONFLICTS:
            continue
        instruction = Instruction(topic, rng.choice(ASKS), tuple(Constraint(k, _argument(k, rng)) for k in kinds))
        if split is None or instruction.split == split:
            return instruction


def make_prompts(seed: int, n: int, split: str | None = "train") -> list[list[dict[str, str]]]:
    """`n` chat prompts (`[{"role": "user", "content": ...}]`) of `split`, deterministic from `seed`."""
    rng = random.Random(f"{seed}:instruct:{split}")  # str seeds hash with SHA-512: stable everywhere
    return [draw_instruction(rng, split).messages() for _ in range(n)]


# ---- the gold reward ------------------------------------------------------------------------------------

def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def reply_text(completion: Any) -> str:
    """The reply's text: a string as is, chat messages' contents joined, special tokens removed."""
    return _SPECIAL_RE.sub("", text_of(completion)).strip()


def words_of(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _is_english(word: str, extra: frozenset[str]) -> bool:
    return word.isdigit() or any(s in WORDS or s in extra for s in _stems(word))


def _is_function(word: str) -> bool:
    w = word.lower().replace("’", "'")
    return w in FUNCTION_WORDS or w.split("'")[0] in FUNCTION_WORDS


def _fluency(reply: str) -> float:
    """Share of the reply's words in sentences that read as prose (at least 15% function words, with
    partial credit below) or in terse list items ("- Boil the water", "- Steep 3 minutes": 2 to 8 words)."""
    total = fluent = 0.0
    for line in reply.splitlines():
        item = _ITEM_RE.match(line)
        for sentence in _SENTENCE_END_RE.split(line):
            words = words_of(sentence)
            if not words:
                continue
            credit = 1.0 if item and 2 <= len(words) <= 8 else \
                _clip(sum(map(_is_function, words)) / len(words) / 0.15)
            total += len(words)
            fluent += len(words) * credit
    return fluent / total if total else 0.0


def quality_terms(instruction: Instruction, prompt_text: str, reply: str) -> dict[str, float]:
    """The factors of `quality` (module docstring), each in [0, 1]."""
    words = words_of(reply)
    lower = [w.lower() for w in words]
    n = len(words)
    if n == 0:
        return {"substance": 0.0}
    prompt_words = frozenset(w.lower() for w in words_of(prompt_text))
    alpha = [w for w in words if not w.isdigit()]
    known = prompt_words | instruction.topic.keywords
    english = sum(_is_english(w, known) for w in words) / n
    repetition = _clip(1 - 2 * repeated_ngrams(lower, 3) / max(1, n - 2))
    if n >= 10:
        repetition *= _clip(len(set(lower)) / n / 0.4)
    prompt_lower = [w.lower() for w in words_of(prompt_text)]
    prompt_4grams = {tuple(prompt_lower[i:i + 4]) for i in range(len(prompt_lower) - 3)}
    reply_4grams = [tuple(lower[i:i + 4]) for i in range(n - 3)]
    copied = sum(g in prompt_4grams for g in reply_4grams) / len(reply_4grams) if reply_4grams else \
        float(" ".join(lower) in " ".join(prompt_lower))
    shouted = sum(len(w) >= 2 and w.isupper() for w in alpha) / max(1, len(alpha))
    excluded = {c.arg.lower() for c in instruction.constraints if c.arg}  # words the constraints name
    stems = set().union(*(_stems(w) for w in lower if w not in excluded))
    on_topic = len(instruction.topic.keywords & stems)
    return {
        "substance": min(1.0, n / 8),
        "english": _clip((english - 0.5) / 0.35),
        "fluency": _fluency(reply),
        "repetition": repetition,
        "copying": _clip(1 - max(0.0, copied - 0.25) / 0.35),
        "shouting": _clip(1 - 2 * shouted),
        "on_topic": 0.1 + 0.9 * min(1.0, on_topic / 2),
    }


def constraint_credit(constraint: Constraint, reply: str) -> float:
    """How far `reply` meets `constraint`, in [0, 1] (module docstring)."""
    words = words_of(reply)
    lower = [w.lower() for w in words]
    kind, arg = constraint.kind, constraint.arg
    if kind == "word_limit":
        limit = int(arg)
        return 1.0 if len(words) <= limit else _clip(1 - (len(words) - limit) / limit)
    if kind == "bullets":
        items, wanted = len(_ITEM_RE.findall(reply)), int(arg)
        return _clip(1 - abs(items - wanted) / wanted) if items else 0.0
    if kind == "include":
        return float(arg.lower() in lower or arg.lower() + "s" in lower)
    if kind == "exclude":
        return 0.5 ** lower.count(arg.lower())
    if kind == "lowercase":
        return _clip(1 - sum(any(ch.isupper() for ch in w) for w in words) / 4)
    if kind == "one_sentence":
        sentences = [s for s in _SENTENCE_END_RE.split(reply) if _WORD_RE.search(s)]
        return 1 / len(sentences) if sentences else 0.0
    if kind == "end_question":
        tail = reply.rstrip(" \t\n\"'”’)*_")
        return 1.0 if tail.endswith("?") else 0.3 if "?" in reply else 0.0
    if kind == "start_word":
        if not lower:
            return 0.0
        return 1.0 if lower[0] == arg.lower() else 0.3 if arg.lower() in lower[:5] else 0.0
    raise ValueError(f"unknown constraint kind {kind!r}")


def gold_terms(prompt: Any, completion: Any) -> dict[str, float]:
    """Every factor of the gold reward: quality's (`quality_terms`), `quality`, each constraint's credit
    (by kind), `constraints` (their mean) and `gold`. Empty for a prompt that is not the task's."""
    instruction = Instruction.parse(prompt)
    if instruction is None:
        return {}
    reply = reply_text(completion)
    terms = quality_terms(instruction, text_of(prompt), reply)
    quality = 1.0
    for value in terms.values():
        quality *= value
    credits = {c.kind: constraint_credit(c, reply) for c in instruction.constraints}
    mean_credit = sum(credits.values()) / len(credits) if credits else 1.0
    return {**terms, "quality": quality, **credits, "constraints": mean_credit,
            "gold": MAX_GOLD * quality * (0.3 + 0.7 * mean_credit)}


def score(prompt: Any, completion: Any) -> float:
    """The gold reward of one reply, in [0, MAX_GOLD]; 0 for a prompt that is not the task's."""
    return gold_terms(prompt, completion).get("gold", 0.0)


def gold_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
    """The instruct task's hidden labeller: `--reward_fn p3o.tasks.instruct:gold_reward`. Prompts and
    completions may be chat messages or plain strings."""
    return [score(p, c) for p, c in zip(prompts, completions)]


# ---- noisy labels and files -----------------------------------------------------------------------------

def bt_label(prompt: Any, first: Any, second: Any, rng: random.Random,
             beta_bt: float = DEFAULT_BETA_BT) -> dict[str, Any]:
    """One comparison labelled as a noisy person would: `first` is chosen with probability
    sigmoid(beta_bt * (gold_first - gold_second)) (Bradley–Terry, as `Task.preference_pairs`)."""
    g1, g2 = gold_reward([prompt, prompt], [first, second])
    if rng.random() < sigmoid(beta_bt * (g1 - g2)):
        return {"prompt": prompt, "chosen": first, "rejected": second}
    return {"prompt": prompt, "chosen": second, "rejected": first}


def label_pairs(prompts: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any], seed: int = 0,
                beta_bt: float = DEFAULT_BETA_BT) -> list[dict[str, Any]]:
    """`bt_label` over aligned lists, from one RNG seeded by `seed`: rows for `p3o rm`."""
    rng = random.Random(f"{seed}:instruct:labels")
    return [bt_label(p, a, b, rng, beta_bt) for p, a, b in zip(prompts, firsts, seconds, strict=True)]


def label_groups(prompts: Sequence[Any], groups: Sequence[Sequence[Any]], seed: int = 0,
                 beta_bt: float = DEFAULT_BETA_BT) -> list[dict[str, Any]]:
    """Every pair within each prompt's group of responses (k responses: k(k-1)/2 comparisons, in the
    order (0, 1), (0, 2), ..., (1, 2), ...), each labelled by `bt_label` independently, from one RNG
    seeded by `seed`; rows for `p3o rm`. Groups of two give `label_pairs`' rows."""
    rng = random.Random(f"{seed}:instruct:labels")
    return [bt_label(prompt, group[i], group[j], rng, beta_bt) for prompt, group in zip(prompts, groups, strict=True)
            for i in range(len(group)) for j in range(i + 1, len(group))]


def write_prompts(out_dir: str | Path, seed: int = 0, n_prompts: int = 2000, n_eval: int = 200) -> dict[str, Path]:
    """prompts_train.jsonl and prompts_eval.jsonl (a `prompt` column of chat messages) in `out_dir`,
    deterministic from `seed`, as `write_task` writes them for the synthetic tasks."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {f"prompts_{split}": write_jsonl(out / f"prompts_{split}.jsonl",
                                            [{"prompt": p} for p in make_prompts(seed, n, split)])
            for split, n in (("train", n_prompts), ("eval", n_eval))}
