"""The run directory's README.md: a model card as the Hugging Face Hub reads it (YAML front matter,
then the story of the run: base model, algorithm, data, key settings, final and held-out metrics,
how to load it, and the method's citation)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

CITATIONS = {  # arXiv ids of each algorithm's paper
    "p3o-v1": ("Wu et al., Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for LLM Alignment",
               "2310.00212"),
    "ppo": ("Schulman et al., Proximal Policy Optimization Algorithms", "1707.06347"),
    "dpo": ("Rafailov et al., Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
            "2305.18290"),
    "online-dpo": ("Guo et al., Direct Language Model Alignment from Online AI Feedback", "2402.04792"),
    "rloo": ("Ahmadian et al., Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human "
             "Feedback in LLMs", "2402.14740"),
    "grpo": ("Shao et al., DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
             "2402.03300"),
    "remax": ("Li et al., ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning "
              "Large Language Models", "2310.10505"),
}
CITATIONS["p3o-v2"] = CITATIONS["p3o-v1"]
KEY_SETTINGS = ("algo", "beta", "clip_eps", "importance_clamp", "epochs", "pairs_per_step", "num_generations",
                "minibatch_pairs", "max_new_tokens", "learning_rate", "max_steps", "use_peft", "lora_r", "seed")
SHOWN_METRICS = ("reward", "kl", "response_length", "monitor_reward", "reward_accuracy", "loss")


def hub_name(name: str | None) -> str | None:
    """`name` where it is a Hub repository id (the Hub's `base_model` takes only those), else None
    (a local path, which the card's text still names)."""
    if not name or Path(name).expanduser().exists() or not re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name):
        return None
    return name


def _shown(cfg, name: str) -> bool:
    """Whether a key setting applies to this run: LoRA's rank under LoRA, the ratio clip where a loss reads it."""
    if name == "lora_r":
        return bool(cfg.use_peft)
    if name == "importance_clamp":
        return cfg.algo in ("p3o-v1", "p3o-v2")
    if name == "clip_eps":
        return cfg.algo not in ("dpo", "online-dpo")
    return getattr(cfg, name, None) is not None


def write_model_card(out: Path, cfg, base_model: str, metrics: dict) -> None:
    title, arxiv = CITATIONS.get(cfg.algo, CITATIONS["p3o-v2"])
    front = {"library_name": "transformers", "tags": ["p3o", "rlhf", cfg.algo],
             **({"base_model": hub_name(base_model)} if hub_name(base_model) else {})}
    data = cfg.dataset or "a dataset given in Python"
    rewards = [*(cfg.reward_fn or []), *(cfg.reward_model or []), *(cfg.reward_url or [])]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {Path(cfg.output_dir).name}", "",
        f"`{base_model}` fine-tuned with **{cfg.algo}** by [p3o](https://pypi.org/project/p3o/) on `{data}`"
        + (f", against {', '.join(f'`{r}`' for r in rewards)}" if rewards else "") + ".", "",
        "## Settings", "", "| setting | value |", "|---|---|",
        *(f"| `{name}` | {getattr(cfg, name)} |" for name in KEY_SETTINGS if _shown(cfg, name)),
        "", "The whole configuration is in `config.yaml`, every step's metrics in `metrics.jsonl`"
        + ("; the LoRA adapter alone is under `adapter/` (the weights here have it merged)" if cfg.use_peft else "")
        + ".", "",
        "## Results", "", "| metric | last training step | held out |", "|---|---|---|",
        *(_metric_row(name, metrics) for name in SHOWN_METRICS if name in metrics or f"eval_{name}" in metrics),
        "", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{out}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{out}")', "```", "",
        "## Citation", "", f"{title}, arXiv:{arxiv} (https://arxiv.org/abs/{arxiv}).", "",
    ]
    (out / "README.md").write_text("\n".join(lines))


STAGE_SETTINGS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                  "gradient_accumulation_steps", "max_length", "assistant_turns", "center_rewards_coefficient",
                  "use_peft", "lora_r", "seed")


def write_stage_card(out: Path, cfg, command: str, evaluation: dict, base_model: str | None, data: str) -> None:
    """README.md for `p3o sft` (a causal LM) or `p3o rm` (a one-label sequence classifier): base model,
    data, key settings and the last held-out evaluation. `base_model`: the model's path or hub name,
    None for a model given in Python without one (then left out of the front matter)."""
    reward_model = command == "p3o rm"
    kind = "AutoModelForSequenceClassification" if reward_model else "AutoModelForCausalLM"
    front = {"library_name": "transformers", "tags": ["p3o", "reward-model" if reward_model else "sft"],
             **({"base_model": hub_name(base_model)} if hub_name(base_model) else {})}
    what = "a reward model (Bradley-Terry, one score at the last token)" if reward_model else "supervised fine-tuning"
    shown = [name for name in STAGE_SETTINGS if getattr(cfg, name, None) is not None
             and (cfg.use_peft or not name.startswith("lora_"))]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {Path(out).resolve().name}", "",
        f"{_code(base_model) if base_model else 'A model given in Python'} trained as {what} by [p3o](https://pypi.org/project/p3o/) "
        f"(`{command}`) on {_code(data)}.", "",
        "## Settings", "", "| setting | value |", "|---|---|",
        *(f"| `{name}` | {getattr(cfg, name)} |" for name in shown),
        "", "The whole configuration is in `config.yaml`, every step's metrics in `metrics.jsonl`.", "",
        "## Held-out results", "", "| metric | value |", "|---|---|",
        *(f"| `{k}` | {v:.4g} |" for k, v in evaluation.items()
          if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)),
        "", "## Use", "", "```python", f"from transformers import {kind}, AutoTokenizer", "",
        f"model = {kind}.from_pretrained({json.dumps(str(out))})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(str(out))})", "```", "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def _code(text: str) -> str:
    """`text` as inline code, fenced with more backticks than it holds."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _metric_row(name: str, metrics: dict) -> str:
    def shown(key):
        value = metrics.get(key)
        if value is None:
            return ""
        stderr = metrics.get(f"{key}_stderr")
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    return f"| {name} | {shown(name)} | {shown(f'eval_{name}')} |"
