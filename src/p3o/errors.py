"""Errors that reach the user as one line (what is wrong, how to fix it), without a traceback."""


class UsageError(Exception):
    """Bad input from the user: a flag, a file, a dataset row, a reward function. Exit code 2."""


class RewardError(UsageError):
    """A reward function or reward model misbehaved (raised, wrong length, NaN/inf)."""


class AlreadyFinished(Exception):
    """`--resume` on a run that finished (its model saved) with no checkpoint left to continue from:
    nothing to do, which is success (a requeued job that finished before is done)."""
