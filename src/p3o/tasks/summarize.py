"""`summarize`: a short generated story about an animal -> a summary of its key facts.

The document is 4–6 sentences from a small grammar (`TEMPLATES`). Three kinds of sentence carry the
story and are KEY: where the animal lives, the event that hit a place, and (in half the documents)
where the animal went. The rest are background details. A good summary restates the key sentences,
in order, and nothing else:

    prompt:      the old fox lives by the lake . the fox eats berries . a storm hit the hill in june .
                 the sun shone on the wood in may . tl ; dr :
    completion:  the fox lives by the lake . a storm hit the hill in june .

Gold reward (`score`), with the summary parsed sentence by sentence by the same grammar:

    3 * coverage - 1.0 * false_facts - 0.5 * invented_words - 0.5 * broken_sentences
      - 0.1 * words_over_budget - 0.1 * repeated_4grams

- coverage: mean over key facts of the best match among the summary's sentences of the same kind,
  counting the fact's content words (animal, place, event, month, verb) that the sentence shares;
- false_facts: grammatical sentences stating a fact the document does not (adjectives ignored);
- invented_words: distinct words that are neither in the document nor grammar words (garbage too);
- broken_sentences: sentences the grammar cannot parse, including an unfinished last one;
- budget: the length of the ideal summary plus 2 words.

The best summary scores 3; an empty one 0; word salad and copying the whole document lose.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property, lru_cache

from p3o.tasks.base import Task, repeated_ngrams, tokenize

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("fox", "bear", "owl", "deer", "wolf", "hare", "crow", "otter", "mole", "badger"),
    "adj": ("old", "young", "big", "small", "grey", "brown", "shy", "clever"),
    "place": ("wood", "hill", "lake", "marsh", "river", "field", "meadow", "valley"),
    "event": ("storm", "flood", "fire", "frost", "drought"),
    "month": ("january", "february", "march", "april", "may", "june", "july", "august", "september",
              "october", "november", "december"),
    "move": ("fled", "moved", "ran", "went"),
    "food": ("berries", "fish", "nuts", "seeds", "mice", "roots", "apples", "worms"),
    "shelter": ("den", "nest", "burrow", "log"),
    "number": ("two", "three", "four", "five"),
}
SLOT_CATEGORY = {**{c: c for c in CATEGORIES}, "other": "animal"}  # "other": a second animal

# kind -> sentence; "{slot}" takes a word of its category, "{adj?}" an optional adjective.
TEMPLATES: dict[str, str] = {
    "habitat": "the {adj?} {animal} lives by the {place} .",
    "event": "a {event} hit the {place} in {month} .",
    "move": "the {adj?} {animal} {move} to the {place} .",
    "eats": "the {adj?} {animal} eats {food} .",
    "fears": "the {adj?} {animal} fears the {other} .",
    "sleeps": "the {adj?} {animal} sleeps in a {shelter} .",
    "friends": "the {adj?} {animal} has {number} friends .",
    "sun": "the sun shone on the {place} in {month} .",
}
KEY_KINDS = ("habitat", "event", "move")
FILLER_KINDS = ("eats", "fears", "sleeps", "friends", "sun")
MARKER = "tl ; dr :"
GRAMMAR_WORDS = frozenset(w for t in TEMPLATES.values() for w in t.split() if not w.startswith("{"))

WEIGHTS = {"coverage": 3.0, "false_facts": -1.0, "invented_words": -0.5, "broken_sentences": -0.5,
           "words_over_budget": -0.1, "repeated_4grams": -0.1}
BUDGET_SLACK = 2  # words a summary may run over the ideal one for free


@dataclass(frozen=True)
class Fact:
    """One sentence of the grammar: its template `kind` and the words in its slots, in template
    order, e.g. Fact("habitat", (("adj", "old"), ("animal", "fox"), ("place", "lake")))."""

    kind: str
    slots: tuple[tuple[str, str], ...]

    @classmethod
    def make(cls, kind: str, **words: str) -> Fact:
        names = [p.strip("{?}") for p in TEMPLATES[kind].split() if p.startswith("{")]
        return cls(kind, tuple((n, words[n]) for n in names if n in words))

    @property
    def content(self) -> frozenset[str]:
        """The words that make the fact what it is; an adjective is a detail."""
        return frozenset(w for n, w in self.slots if n != "adj")

    @property
    def core(self) -> tuple:
        """What a summary must not contradict: the fact less its adjective (a wrong adjective is
        still caught, as an invented word)."""
        return self.kind, tuple((n, w) for n, w in self.slots if n != "adj")

    def without_adjective(self) -> Fact:
        return Fact(self.kind, self.core[1])

    def replace(self, slot: str, word: str) -> Fact:
        return Fact(self.kind, tuple((n, word if n == slot else w) for n, w in self.slots))

    def render(self) -> str:
        words = dict(self.slots)
        parts = (words.get(p.strip("{?}"), "") if p.startswith("{") else p for p in TEMPLATES[self.kind].split())
        return " ".join(p for p in parts if p)  # an empty optional slot leaves no gap

    @classmethod
    def parse(cls, words: list[str]) -> Fact | None:
        """The fact a sentence's words (ending in ".") state, or None if the grammar has no such sentence."""
        for kind, pattern in _PATTERNS_BY_LENGTH.get(len(words), ()):
            slots = _match(pattern, words)
            if slots is not None:
                return cls(kind, slots)
        return None


def _patterns_by_length() -> dict[int, list[tuple[str, list[str]]]]:
    """Each template with and without its optional adjective, indexed by sentence length."""
    table: dict[int, list[tuple[str, list[str]]]] = {}
    for kind, template in TEMPLATES.items():
        for with_adj in (False, True) if "{adj?}" in template else (False,):
            pattern = [p for p in template.split() if p != "{adj?}" or with_adj]
            table.setdefault(len(pattern), []).append((kind, pattern))
    return table


_PATTERNS_BY_LENGTH = _patterns_by_length()


def _match(pattern: list[str], words: list[str]) -> tuple[tuple[str, str], ...] | None:
    slots = []
    for part, word in zip(pattern, words):
        if part.startswith("{"):
            name = part.strip("{?}")
            if word not in CATEGORIES[SLOT_CATEGORY[name]]:
                return None
            slots.append((name, word))
        elif part != word:
            return None
    return tuple(slots)


def split_sentences(words: list[str]) -> tuple[list[list[str]], int]:
    """Sentences (each ending in ".") and whether an unfinished one trails them (0 or 1)."""
    sentences, current = [], []
    for word in words:
        current.append(word)
        if word == ".":
            sentences.append(current)
            current = []
    return sentences, int(bool(current))


@dataclass(frozen=True)
class Document:
    """The prompt's story as facts, in order; the first introduces the main animal."""

    facts: tuple[Fact, ...]

    @cached_property
    def key_facts(self) -> tuple[Fact, ...]:
        return tuple(f for f in self.facts if f.kind in KEY_KINDS)

    @cached_property
    def words(self) -> frozenset[str]:
        return frozenset(w for f in self.facts for w in f.render().split())

    @cached_property
    def ideal_summary(self) -> str:
        return " ".join(f.without_adjective().render() for f in self.key_facts)

    def render(self) -> str:
        return " ".join(f.render() for f in self.facts) + " " + MARKER

    @classmethod
    @lru_cache(maxsize=4096)  # the gold reward sees each prompt with several completions
    def parse(cls, prompt: str) -> Document:
        """The facts of a prompt's text (sentences the grammar cannot parse are skipped)."""
        words = tokenize(prompt)
        marker = MARKER.split()
        for i in range(len(words) - len(marker), -1, -1):  # the last marker ends the document
            if words[i:i + len(marker)] == marker:
                words = words[:i]
                break
        sentences, _ = split_sentences(words)
        return cls(tuple(f for f in map(Fact.parse, sentences) if f is not None))


def draw_document(rng: random.Random) -> Document:
    """Habitat first, then the event, maybe a move, and 2–3 details, shuffled: 4–6 sentences."""
    animal, other = rng.sample(CATEGORIES["animal"], 2)
    home, destination = rng.sample(CATEGORIES["place"], 2)
    event_month, sun_month = rng.sample(CATEGORIES["month"], 2)
    pick = {"place": rng.choice(CATEGORIES["place"]), "food": rng.choice(CATEGORIES["food"]),
            "shelter": rng.choice(CATEGORIES["shelter"]), "number": rng.choice(CATEGORIES["number"])}
    rest = [Fact.make("event", event=rng.choice(CATEGORIES["event"]), place=pick["place"], month=event_month)]
    if rng.random() < 0.5:
        rest.append(Fact.make("move", animal=animal, move=rng.choice(CATEGORIES["move"]), place=destination))
    fillers = {
        "eats": Fact.make("eats", animal=animal, food=pick["food"]),
        "fears": Fact.make("fears", animal=animal, other=other),
        "sleeps": Fact.make("sleeps", animal=animal, shelter=pick["shelter"]),
        "friends": Fact.make("friends", animal=animal, number=pick["number"]),
        "sun": Fact.make("sun", place=rng.choice(CATEGORIES["place"]), month=sun_month),
    }
    rest += [fillers[k] for k in rng.sample(FILLER_KINDS, rng.randint(2, 3))]
    rng.shuffle(rest)
    habitat = Fact.make("habitat", adj=rng.choice(CATEGORIES["adj"]), animal=animal, place=home)
    return Document((habitat, *rest))


class SummarizeTask(Task):
    name = "summarize"
    mix = {"good": 0.4, "missing": 0.15, "invented": 0.15, "verbose": 0.1, "repetitive": 0.1, "offtopic": 0.1}

    def vocabulary(self) -> list[str]:
        words = [*MARKER.split(), *sorted(GRAMMAR_WORDS)]
        words += [w for values in CATEGORIES.values() for w in values]
        return list(dict.fromkeys(words))

    def draw_prompt(self, rng: random.Random) -> str:
        return draw_document(rng).render()

    def demonstration(self, prompt: str, rng: random.Random, quality: str = "good") -> str:
        doc = Document.parse(prompt)
        if not doc.key_facts:
            return ""
        return " ".join(f.render() for f in _DEMOS[quality](doc, rng))

    def score(self, prompt: str, completion: str) -> float:
        return float(sum(WEIGHTS[k] * v for k, v in self.gold_terms(prompt, completion).items()))

    def gold_terms(self, prompt: str, completion: str) -> dict[str, float]:
        """The gold reward's terms before weighting (`WEIGHTS`), for inspection and tests."""
        doc = Document.parse(prompt)
        words = tokenize(completion)
        sentences, unfinished = split_sentences(words)
        facts = [Fact.parse(s) for s in sentences]
        stated = [f for f in facts if f is not None]
        true_cores = {f.core for f in doc.facts}
        budget = len(doc.ideal_summary.split()) + BUDGET_SLACK
        return {
            "coverage": _coverage(doc.key_facts, stated),
            "false_facts": sum(f.core not in true_cores for f in stated),
            "invented_words": len(set(words) - doc.words - GRAMMAR_WORDS),
            "broken_sentences": facts.count(None) + unfinished,
            "words_over_budget": max(0, len(words) - budget),
            "repeated_4grams": repeated_ngrams(words, 4),
        }


def _coverage(keys: tuple[Fact, ...], stated: list[Fact]) -> float:
    """Mean over key facts of the best share of its content words that one stated fact of the same kind has."""
    if not keys:
        return 0.0
    best = [max((len(k.content & f.content) / len(k.content) for f in stated if f.kind == k.kind), default=0.0)
            for k in keys]
    return sum(best) / len(best)


def _good(doc: Document, rng: random.Random) -> list[Fact]:
    """The key facts in document order; a quarter keep the animal's adjective (harmless variety)."""
    keep_adj = rng.random() < 0.25
    return [f if keep_adj else f.without_adjective() for f in doc.key_facts]


def _missing(doc: Document, rng: random.Random) -> list[Fact]:
    """Drops one key fact (two of three at most), sometimes stating a detail instead."""
    facts = _good(doc, rng)
    for _ in range(rng.randint(1, len(facts) - 1)):
        facts.pop(rng.randrange(len(facts)))
    details = [f for f in doc.facts if f.kind not in KEY_KINDS]
    if details and rng.random() < 0.5:
        facts.append(rng.choice(details))
    return facts


def _invented(doc: Document, rng: random.Random) -> list[Fact]:
    """A key fact with one word changed to something the document never says, or an extra made-up detail."""
    facts = _good(doc, rng)
    if rng.random() < 0.5:
        i = rng.randrange(len(facts))
        slot, _ = rng.choice([s for s in facts[i].slots if s[0] != "adj"])
        facts[i] = facts[i].replace(slot, _new_word(doc, SLOT_CATEGORY[slot], rng))
    else:
        animal = doc.facts[0].content & set(CATEGORIES["animal"])
        facts.append(Fact.make("eats", animal=min(animal), food=_new_word(doc, "food", rng)))
    return facts


def _new_word(doc: Document, category: str, rng: random.Random) -> str:
    return rng.choice([w for w in CATEGORIES[category] if w not in doc.words])


def _verbose(doc: Document, rng: random.Random) -> list[Fact]:
    """The whole document copied."""
    return list(doc.facts)


def _repetitive(doc: Document, rng: random.Random) -> list[Fact]:
    """The good summary with a key sentence said twice, or all of it twice."""
    facts = _good(doc, rng)
    if rng.random() < 0.5:
        return facts + facts
    i = rng.randrange(len(facts))
    return facts[:i + 1] + facts[i:]


def _offtopic(doc: Document, rng: random.Random) -> list[Fact]:
    """One or two background details, none of the story."""
    details = [f for f in doc.facts if f.kind not in KEY_KINDS]
    chosen = sorted(rng.sample(range(len(details)), min(len(details), rng.randint(1, 2))))
    return [details[i] for i in chosen]


_DEMOS = {"good": _good, "missing": _missing, "invented": _invented, "verbose": _verbose,
          "repetitive": _repetitive, "offtopic": _offtopic}

TASK = SummarizeTask()


def gold_reward(prompts, completions, **kwargs) -> list[float]:
    """The summarize task's hidden labeller: `--reward_fn p3o.tasks.summarize:gold_reward`."""
    return TASK.gold_reward(prompts, completions, **kwargs)
