"""What the embedded synthetic tasks share: text handling, the mixed-quality data generators, noisy
Bradley–Terry labelling, and the JSONL writer.

A task is a small closed world, generated offline from a seed, with a hidden *gold* reward that plays
the human labeller. The pipeline never sees the gold reward directly: SFT sees mixed-quality
demonstrations, the reward model sees comparisons sampled from the gold reward with Bradley–Terry
noise, and RL sees the learned reward model. The gold reward then scores the result honestly.

Text conventions: lower case, words separated by single spaces, every punctuation mark its own word
(so the word tokenizer of `p3o.models.tiny` splits our texts exactly at the spaces). `tokenize`
splits anything else, such as model output, the way that tokenizer would.
"""
from __future__ import annotations

import json
import math
import random
import re
import zlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from p3o.utils.io import atomic_write_text

# The pre-tokenizer's split (`\w+|[^\w\s]+`), plus whole special tokens such as "</s>", which a
# decoder that keeps special tokens leaves in the text.
_TOKEN_RE = re.compile(r"<[a-z/]+>|\w+|[^\w\s]+")
_IGNORED = frozenset({"<s>", "</s>", "<pad>"})
EVAL_FRACTION_PERCENT = 20  # share of the prompt space reserved for eval prompts


def tokenize(text: str) -> list[str]:
    """Words of `text`, lower-cased, split as the word tokenizer splits them, without BOS/EOS/pad."""
    return [w for w in _TOKEN_RE.findall(text.lower()) if w not in _IGNORED]


def text_of(value: Any) -> str:
    """Plain text of a prompt or completion: a string as is, chat messages as their contents joined
    (a reward function may be handed either), anything else as an empty string."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        contents = (m.get("content") for m in value if isinstance(m, dict))
        return " ".join(c for c in contents if isinstance(c, str))
    return ""


def repeated_ngrams(words: Sequence[str], n: int = 4) -> int:
    """Occurrences of n-grams beyond their first: 0 for text that never repeats itself."""
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return sum(c - 1 for c in counts.values())


def bigrams(words: Sequence[str]) -> set[tuple[str, str]]:
    return set(zip(words, words[1:]))


def phrase_coverage(phrase: Sequence[str], present: set[tuple[str, str]]) -> float:
    """Fraction of the phrase's bigrams found in `present`: word order counts, so a bag of the
    right words (word salad) earns nothing, while a half-right phrase earns half."""
    wanted = bigrams(phrase)
    return len(wanted & present) / len(wanted) if wanted else 0.0


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def prompt_split(prompt: str) -> str:
    """The split a prompt belongs to: "eval" for a fixed ~20% of all possible prompts, else "train".
    It hashes the text, so it holds across seeds and sizes and no eval prompt appears in training data."""
    return "eval" if zlib.crc32(prompt.encode()) % 100 < EVAL_FRACTION_PERCENT else "train"


class Task(ABC):
    """One embedded task. Subclasses say how to draw a prompt, write a completion of a given quality,
    and score a completion (the gold reward); everything built on those lives here.

    `mix` is the quality distribution of the demonstrations and of the candidates in comparisons:
    "good" first, then the flawed kinds, weights summing to 1."""

    name: ClassVar[str]
    mix: ClassVar[dict[str, float]]

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Every word any prompt or completion of the task can contain, in a fixed order."""

    @abstractmethod
    def draw_prompt(self, rng: random.Random) -> str:
        """One prompt from the task's distribution."""

    @abstractmethod
    def demonstration(self, prompt: str, rng: random.Random, quality: str = "good") -> str:
        """A completion of `prompt` of the named quality (one of `mix`)."""

    @abstractmethod
    def score(self, prompt: str, completion: str) -> float:
        """The gold reward of one completion: deterministic, a function of the two texts only."""

    def gold_reward(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
        """The hidden labeller as a reward function `fn(prompts, completions, **columns)`."""
        return [self.score(text_of(p), text_of(c)) for p, c in zip(prompts, completions)]

    def sample_prompt(self, rng: random.Random, split: str | None = None) -> str:
        """A prompt from `split` ("train", "eval", or None for either). A task whose prompt space is
        too small to find one gives up after a few tries and returns the last draw."""
        for _ in range(50):
            prompt = self.draw_prompt(rng)
            if split is None or prompt_split(prompt) == split:
                break
        return prompt

    def sample_prompts(self, n: int, rng: random.Random, split: str | None = None) -> list[str]:
        return [self.sample_prompt(rng, split) for _ in range(n)]

    def sample_quality(self, rng: random.Random) -> str:
        return rng.choices(list(self.mix), weights=list(self.mix.values()))[0]

    def sft_examples(self, n: int, rng: random.Random, split: str | None = None) -> list[dict[str, str]]:
        """`n` prompt–completion rows of mixed quality (`mix`), so that imitating them leaves room for RL."""
        rows = []
        for _ in range(n):
            prompt = self.sample_prompt(rng, split)
            rows.append({"prompt": prompt, "completion": self.demonstration(prompt, rng, self.sample_quality(rng))})
        return rows

    def candidate_pair(self, prompt: str, rng: random.Random) -> tuple[str, str]:
        """Two completions from the mixed-quality generator, distinct where a few tries allow."""
        first = self.demonstration(prompt, rng, self.sample_quality(rng))
        for _ in range(10):
            second = self.demonstration(prompt, rng, self.sample_quality(rng))
            if second != first:
                break
        return first, second

    def preference_pairs(self, n: int, rng: random.Random, beta_bt: float = 1.0,
                         split: str | None = None) -> list[dict[str, str]]:
        """`n` comparisons labelled by a noisy labeller: the first candidate is preferred with
        probability sigmoid(beta_bt * (g1 - g2)) (Bradley–Terry on the gold reward g), so a larger
        beta_bt means a more reliable labeller, and the learned reward model stays imperfect."""
        rows = []
        for _ in range(n):
            prompt = self.sample_prompt(rng, split)
            first, second = self.candidate_pair(prompt, rng)
            g1, g2 = self.gold_reward([prompt, prompt], [first, second])
            if rng.random() < sigmoid(beta_bt * (g1 - g2)):
                rows.append({"prompt": prompt, "chosen": first, "rejected": second})
            else:
                rows.append({"prompt": prompt, "chosen": second, "rejected": first})
        return rows

    def labeller_agreement(self, pairs: Sequence[dict[str, str]]) -> float:
        """Fraction of comparisons whose label agrees with the gold ordering; pairs the gold reward
        ties are left out (no label can be wrong there). NaN when every pair is a tie."""
        verdicts = []
        for row in pairs:
            g_chosen, g_rejected = self.gold_reward([row["prompt"]] * 2, [row["chosen"], row["rejected"]])
            if g_chosen != g_rejected:
                verdicts.append(g_chosen > g_rejected)
        return sum(verdicts) / len(verdicts) if verdicts else math.nan

    def mean_gold(self, rows: Sequence[dict[str, str]], column: str = "completion") -> float:
        """Average gold reward of `column` over rows that have a `prompt`."""
        scores = self.gold_reward([r["prompt"] for r in rows], [r[column] for r in rows])
        return sum(scores) / len(scores)


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_task_files(task: Task, out_dir: str | Path, seed: int, n_sft: int, n_pref: int, n_prompts: int,
                     n_eval: int, beta_bt: float = 1.0) -> dict[str, Path]:
    """The task's data in the project's standard formats, deterministic from `seed`.

    Each file draws from its own random stream, seeded from (seed, task, file), so changing one
    file's size leaves the others byte-identical. Eval files use only eval-split prompts
    (`prompt_split`); each eval file has `n_eval` rows. Same-named files in `out_dir` are replaced.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def stream(part: str) -> random.Random:
        return random.Random(f"{seed}:{task.name}:{part}")  # str seeds hash with SHA-512: stable everywhere

    rows = {
        "sft_train": task.sft_examples(n_sft, stream("sft_train"), "train"),
        "sft_eval": task.sft_examples(n_eval, stream("sft_eval"), "eval"),
        "prefs_train": task.preference_pairs(n_pref, stream("prefs_train"), beta_bt, "train"),
        "prefs_eval": task.preference_pairs(n_eval, stream("prefs_eval"), beta_bt, "eval"),
        "prompts_train": [{"prompt": p} for p in task.sample_prompts(n_prompts, stream("prompts_train"), "train")],
        "prompts_eval": [{"prompt": p} for p in task.sample_prompts(n_eval, stream("prompts_eval"), "eval")],
    }
    paths = {name: write_jsonl(out / f"{name}.jsonl", data) for name, data in rows.items()}
    paths["vocab"] = out / "vocab.txt"
    atomic_write_text(paths["vocab"], "".join(word + "\n" for word in task.vocabulary()))
    return paths
