"""The non-finite guard: a step with a NaN/inf loss or gradient is dropped (`clip_and_step`), counted
here, and a run that keeps producing them is stopped with a message that says what to do.

The counters live in the stage's state (`skipped_updates`, `consecutive_skips`), which every
checkpoint saves in trainer_state.json, so a resumed run keeps counting where it stopped.
"""
from __future__ import annotations

from p3o.errors import UsageError


class NonFiniteTraining(UsageError):
    """Too many optimiser steps in a row were skipped for NaN/inf: training has diverged."""

    def __init__(self, skips: int, step: int):
        super().__init__(f"{skips} optimiser steps in a row had a non-finite loss or gradient (step {step}); training "
                         "has diverged. Lower --learning_rate (in RL, also check the reward for huge values), then "
                         "resume from the last good checkpoint with --resume (or start again)")


def count_skip(state, stepped: bool, max_consecutive_skips: int, step: int) -> None:
    """Record whether the optimiser step was taken in `state.skipped_updates` (all skips of the run)
    and `state.consecutive_skips` (since the last step taken); raise `NonFiniteTraining` at
    `max_consecutive_skips` in a row. `step`: the run's step, for the message. Every process sees the
    same `stepped` (the skip is agreed across them), so all stop together."""
    if stepped:
        state.consecutive_skips = 0
        return
    state.skipped_updates += 1
    state.consecutive_skips += 1
    if state.consecutive_skips >= max_consecutive_skips:
        raise NonFiniteTraining(state.consecutive_skips, step)
