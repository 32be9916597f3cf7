"""Embedded synthetic tasks: the whole RLHF pipeline (SFT -> reward model -> RL) on a CPU in minutes,
scored at the end by a hidden gold reward that plays the human.

Two tasks mirror the P3O paper's: `summarize` (TL;DR) and `dialogue` (helpful and harmless, as HH).
Each is generated offline and deterministically from a seed; `write_task` writes its data files in
the project's standard formats, and `p3o.tasks.<name>:gold_reward` is its labeller as a reward
function. `base.py` explains what the tasks share.

`p3o.tasks.instruct` (everyday questions with verifiable constraints, for a real chat model such as
SmolLM2-135M-Instruct) is not in `TASKS`: its prompts are chat messages and its completions come from
the model itself, so it has no word vocabulary or demonstrations for the tiny models of `p3o demo
--task`; its module docstring gives its own API.
"""
from __future__ import annotations

from pathlib import Path

from p3o.errors import UsageError
from p3o.tasks.base import Task, write_task_files
from p3o.tasks.dialogue import DialogueTask
from p3o.tasks.summarize import SummarizeTask

TASKS: dict[str, Task] = {"summarize": SummarizeTask(), "dialogue": DialogueTask()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def write_task(name: str, out_dir: str | Path, seed: int = 0, n_sft: int = 4000, n_pref: int = 4000,
               n_prompts: int = 2000, n_eval: int = 200, beta_bt: float = 1.0) -> dict[str, Path]:
    """Write task `name`'s data into `out_dir`: sft_{train,eval}.jsonl (prompt, completion),
    prefs_{train,eval}.jsonl (prompt, chosen, rejected), prompts_{train,eval}.jsonl (prompt) and
    vocab.txt (one word a line, for `p3o.models.tiny.build_word_tokenizer`). Returns the paths by
    file stem ("sft_train", ..., "vocab")."""
    return write_task_files(get_task(name), out_dir, seed, n_sft, n_pref, n_prompts, n_eval, beta_bt)


__all__ = ["TASKS", "Task", "get_task", "write_task"]
