"""Training curves from a run's metrics.jsonl, drawn with matplotlib (headless)."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = (("reward", "proxy reward (what RL optimises)"), ("monitor_reward", "gold reward (hidden labeller)"),
          ("kl", "KL to the reference (nats)"))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw per-step values are noisy with few pairs per step)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_training(metrics_path: Path, out: Path, title: str) -> Path:
    """One panel per metric present (proxy reward, gold reward, KL) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = [(key, label) for key, label in PANELS if key in rows[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (key, label) in zip(axes[0], panels):
        values = [r[key] for r in rows]
        ax.plot(steps, values, color="0.75", linewidth=1, label="per step")
        ax.plot(steps, smooth(values, max(1, len(values) // 15)), linewidth=2, label="moving average")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


COLOURS = {"p3o-v1": "tab:blue", "p3o-v2": "tab:green", "ppo": "tab:red", "dpo": "tab:purple",
           "rloo": "tab:orange", "grpo": "tab:brown", "remax": "tab:pink", "online-dpo": "tab:gray",
           "p3o-v2-authors": "tab:olive", "p3o-v1-authors": "tab:cyan"}


def _colours(algos) -> dict:
    """Each algorithm's colour: its own where it has one, else a colour no other algorithm takes."""
    taken = {COLOURS[a] for a in algos if a in COLOURS}
    spare = [c for c in ("tab:olive", "tab:cyan", "tab:pink", "tab:gray") if c not in taken] + ["black", "gold", "navy"]
    free = iter(spare + [None] * len(algos))
    return {a: COLOURS.get(a) or next(free) for a in algos}


def plot_frontier(points: list[dict], summary: dict, out: Path, title: str) -> Path:
    """KL on x, reward on y: every point faint, each algorithm's Pareto frontier as a line; a gold
    panel beside the proxy panel when a gold reward was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("gold", "reward") if points[0].get(k) is not None]
    labels = {"gold": "gold reward (hidden labeller)", "reward": "proxy reward (reward model)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    colours = _colours(list(summary))
    for ax, key in zip(axes[0], keys):
        for algo, s in summary.items():
            colour = colours[algo]
            mine = [p for p in points if p["algo"] == algo]
            ax.scatter([p["kl"] for p in mine], [p[key] for p in mine], s=10, alpha=0.25, color=colour)
            front = s[key]["frontier"]
            ax.plot([p["kl"] for p in front], [p[key] for p in front], marker="o", ms=4, color=colour, label=algo,
                    drawstyle="steps-post")
        ax.set_xlabel("KL to the SFT policy (nats)")
        ax.set_ylabel(labels[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
