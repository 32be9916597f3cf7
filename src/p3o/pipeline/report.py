"""The demo's Markdown report: what ran, the held-out comparison, training curves, samples."""
from __future__ import annotations

import math
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


def _reply(completion: str) -> str:
    return " ".join(completion.split()) or "(empty)"


def write_instruct_report(out: Path, cfg, preset, results: dict, winrate: dict, reward_model: dict,
                          summary: dict, timings: dict) -> Path:
    """report.md of `p3o demo --task instruct`: start (SmolLM2) vs P3O-V2 on held-out prompts."""
    plot = plot_training(out / "p3o-v2" / "metrics.jsonl", out / "training.png",
                         f"P3O-V2 (LoRA) on instruct, SmolLM2 (seed {cfg.seed})")
    start, rl = results["start"], results["p3o-v2"]
    n = len(start["samples"])
    lines = [
        f"# p3o demo: instruct, seed {cfg.seed}{' (quick)' if cfg.quick else ''}",
        "",
        "RLHF of a real chat model on a CPU: the start policy (SmolLM2-135M-Instruct, in place of SFT) -> a LoRA "
        "reward model on comparisons of its own samples -> P3O-V2 with LoRA. The **gold reward** (in [0, 3]) is "
        "`p3o.tasks.instruct:gold_reward`: an on-topic answer that meets the prompt's two verifiable constraints; "
        "it labels the comparisons (with Bradley-Terry noise) and judges the end, but training sees only the "
        "**proxy reward**, the learned reward model. KL is the mean sequence KL to the start policy in nats.",
        "",
        f"Sizes: {preset.comparison_prompts} prompts x {preset.responses_per_prompt} samples of the start policy, "
        f"every pair compared ({reward_model['train_pairs']} comparisons to train, {reward_model['eval_pairs']} on "
        f"held-out prompts); the reward model " + (f"{preset.rm_max_steps} steps" if preset.rm_max_steps else
                                            f"{preset.rm_epochs} epochs") +
        f" of {preset.rm_batch_size} pairs (lr {preset.rm_learning_rate:g}); {preset.rl_steps} P3O-V2 steps of "
        f"{preset.pairs_per_step} prompts x 2 responses of at most {preset.max_new_tokens} tokens, {preset.rl_epochs} "
        f"epoch(s) a rollout (lr {preset.learning_rate:g}, beta {preset.beta:g}, Delta rms-normalised, LoRA r "
        f"{preset.lora_r}); {n} held-out prompts (constraint x topic combinations that training never sees).",
        "",
        "## Reward model",
        "",
        f"Held-out pairwise accuracy **{reward_model['eval_accuracy']:.3f}** on {reward_model['eval_pairs']} pairs "
        f"(± {math.sqrt(0.25 / max(reward_model['eval_pairs'], 1)):.2f}); the Bradley-Terry labeller's expected "
        f"accuracy on the same pairs is **{reward_model['labeller_expected_accuracy']:.3f}** (what a reward model "
        "that knew the gold exactly would score against these labels: the ceiling), and its labels agree with the "
        f"gold ordering on {reward_model['labeller_agreement']:.3f} of the pairs without a gold tie "
        f"({reward_model['gold_ties']} ties).",
        "",
        f"## Held-out prompts ({n}, one sample each)",
        "",
        "| policy | gold reward | proxy reward | KL to start | response length (tokens) |",
        "|---|---|---|---|---|",
        *[f"| {name} | {_cell(m, 'gold')} | {_cell(m, 'proxy')} | {_cell(m, 'kl')} | {_cell(m, 'length')} |"
          for name, m in results.items()],
        "",
        f"Gold gain {summary['gold_gain']:+.3f} ± {summary['gold_gain_stderr']:.3f} "
        f"(**{summary['gold_gain_in_stderrs']:+.1f} standard errors**).",
        "",
        f"Win rate of P3O-V2 against the start, judged by the gold reward (`--judge "
        f"reward_fn:p3o.tasks.instruct:gold_reward`, ties count 1/2): **{winrate['win_rate']:.3f}**, 95% interval "
        f"[{winrate['ci_low']:.3f}, {winrate['ci_high']:.3f}] ({winrate['wins']} wins, {winrate['losses']} losses, "
        f"{winrate['ties']} ties).",
        "",
        "## Training",
        "",
        f"![training curves]({plot.name})",
        "",
        "`p3o-v2/metrics.jsonl` has every step (proxy reward, gold as `monitor_reward`, KL), `p3o-v2/eval.jsonl` "
        f"the held-out evaluations during training (on {preset.train_eval_prompts} prompts).",
        "",
        "## Samples (the same held-out prompts)",
        "",
        "| prompt | start | P3O-V2 |",
        "|---|---|---|",
    ]
    for i in range(min(8, n)):
        prompt = start["samples"][i]["prompt"]
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        cells = [f"{_reply(m['samples'][i]['completion'])} *(gold {m['samples'][i]['gold']:.2f})*"
                 for m in (start, rl)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in (text, *cells)) + " |")
    lines += ["", "## Time (each stage as it ran; a resumed run's reused stages as their own invocation took)", "",
              *[f"- {name}: {seconds:.0f} s" for name, seconds in timings.items()], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
