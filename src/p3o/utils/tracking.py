"""Experiment trackers (TensorBoard, W&B, ...) through accelerate, only when asked for."""
from __future__ import annotations

import dataclasses
import importlib.util

from p3o.errors import UsageError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "trackio": "trackio", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def check_trackers(report_to: str) -> list[str]:
    """Names from --report_to, each known and importable (accelerate would silently drop a missing one);
    `all`, as in transformers, is every installed one."""
    names = [name.strip() for name in report_to.split(",") if name.strip() not in ("", "none")]
    if "all" in names:
        names = [name for name, package in TRACKER_PACKAGES.items() if importlib.util.find_spec(package)]
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


def _as_text(prompt) -> str:
    """A prompt as text: a conversation as its messages, one `role: content` line each (every turn,
    the system message included, is context for the reply)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def log_completions(acc, step: int, records: list[dict]) -> None:
    """A logging step's sampled completions to the trackers as text: a Markdown table in TensorBoard,
    a table in W&B (other trackers get nothing: they have no text panel accelerate reaches)."""
    if not acc.log_with or not records:
        return
    rows = [(_as_text(r["prompt"]), c, r["rewards"][i] if "rewards" in r else None)
            for r in records for i, c in enumerate(r["completions"])]
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            table = "| prompt | completion | reward |\n|---|---|---|\n" + "\n".join(
                f"| {cell(p)} | {cell(c)} | {'' if r is None else f'{r:.4f}'} |" for p, c, r in rows)
            tracker.writer.add_text("completions", table, global_step=step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"completions": wandb.Table(columns=["prompt", "completion", "reward"],
                                                    data=[list(row) for row in rows])}, step=step)


def joined_names(report_to) -> str:
    """TRL's `report_to=["tensorboard", "wandb"]` as p3o's "tensorboard,wandb" (a string stays as it is)."""
    return ",".join(map(str, report_to)) if isinstance(report_to, (list, tuple)) else report_to
