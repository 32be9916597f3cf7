"""The demo's Markdown report: what ran, the held-out comparison, training curves, samples."""
from __future__ import annotations

from pathlib import Path

from p3o.eval.plots import plot_training


def _cell(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.3f} ± {metrics[key + '_stderr']:.3f}"


def write_demo_report(out: Path, cfg, preset, results: dict, rm_eval: dict, agreement: float,
                      timings: dict) -> Path:
    plot = plot_training(out / "p3o-v2" / "metrics.jsonl", out / "training.png",
                         f"P3O-V2 on {cfg.task} (seed {cfg.seed})")
    lines = [
        f"# p3o demo: {cfg.task}, seed {cfg.seed}{' (quick)' if cfg.quick else ''}",
        "",
        "SFT -> reward model -> P3O-V2 on an embedded synthetic task. The **gold reward** is the task's hidden "
        "labeller (it plays the human); the **proxy reward** is the learned reward model that RL optimises. "
        "KL is the mean sequence KL to the SFT policy in nats, `l(y) - l_ref(y)` on the policy's own samples.",
        "",
        f"Model: a {preset.layers}-layer Llama, hidden size {preset.hidden}, word tokenizer built from the task; "
        f"{preset.n_sft} demonstrations, {preset.n_pref} comparisons, {preset.rl_steps} P3O steps of "
        f"{preset.pairs_per_step} pairs.",
        "",
        "## Reward model",
        "",
        f"Held-out pairwise accuracy **{rm_eval['eval_accuracy']:.3f}** (mean margin {rm_eval['eval_margin']:.3f}); "
        f"the labeller's own labels agree with the gold ordering on **{agreement:.3f}** of the same pairs, so "
        "that is about the ceiling.",
        "",
        f"## Held-out prompts ({len(results['sft']['samples'])}, one sample each)",
        "",
        "| policy | gold reward | proxy reward | KL to SFT | response length |",
        "|---|---|---|---|---|",
        *[f"| {name} | {_cell(m, 'gold')} | {_cell(m, 'proxy')} | {_cell(m, 'kl')} | {_cell(m, 'length')} |"
          for name, m in results.items()],
        "",
        "## Training",
        "",
        f"![training curves]({plot.name})",
        "",
        "## Samples (held-out prompts)",
        "",
    ]
    for i in range(min(5, len(results["sft"]["samples"]))):
        sample = results["sft"]["samples"][i]
        lines += [f"**prompt:** {sample['prompt']}", "",
                  *[f"- **{name}:** {m['samples'][i]['completion'].strip()}" for name, m in results.items()], ""]
    lines += ["## Time", "", *[f"- {name}: {seconds:.0f} s" for name, seconds in timings.items()], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
