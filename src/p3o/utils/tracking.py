"""Experiment trackers (TensorBoard, W&B, ...) through accelerate, only when asked for."""
from __future__ import annotations

import dataclasses
import importlib.util

from p3o.errors import UsageError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "trackio": "trackio", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def check_trackers(report_to: str) -> list[str]:
    """Names from --report_to, each known and importable (accelerate would silently drop a missing one)."""
    names = [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")]
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise UsageError(f"--report_to {name!r} is not a tracker; use none or any of {', '.join(TRACKER_PACKAGES)}")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise UsageError(f"--report_to {name}: the {TRACKER_PACKAGES[name]} package is not installed; "
                             f"pip install {TRACKER_PACKAGES[name]}, or use --report_to none")
    return names


def start_trackers(acc, cfg) -> None:
    """Start the trackers `check_trackers` accepted, with the run's config."""
    if acc.log_with:
        config = {k: ",".join(map(str, v)) if isinstance(v, list) else v  # trackers take scalars only
                  for k, v in dataclasses.asdict(cfg).items() if v is not None}
        acc.init_trackers("p3o", config=config)


def finish_trackers(acc) -> None:
    """Close the trackers. Not `acc.end_training()`: that also destroys the process group, which the
    final save still needs (`p3o.cli` destroys it once the command is done)."""
    for tracker in acc.trackers:
        tracker.finish()
