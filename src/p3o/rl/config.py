"""The RL stage's configuration, `P3OConfig`: one documented dataclass for `p3o train` and for
`p3o.P3OTrainer`, validated where it is built.

Every field is a `--flag` of the same name and a key of `--config file.yaml`. Paths that the Python
API may replace with objects (the model, the datasets, the rewards) are optional here and checked
by the trainer, which knows what it was given. All batch-size arithmetic lives in `derive_sizes`,
which refuses inexact division.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import ClassVar

from p3o.errors import UsageError
from p3o.options import hints_unknown_options, option
from p3o.rl.algorithms import default_setting, get_algorithm
from p3o.rl.losses import AGGREGATIONS
from p3o.utils.tracking import joined_names


log = logging.getLogger("p3o")
ALGOS = ("p3o-v2", "p3o-v1", "ppo", "rloo", "grpo", "remax", "online-dpo", "dpo")


@hints_unknown_options
@dataclass
class P3OConfig:
    # --- what to train, on what, against what -------------------------------------------------
    model_name_or_path: str | None = option(None, "Policy to fine-tune: a local directory, a hub name or a .gguf file (the SFT model). Python: or pass the model to P3OTrainer.", required=True)
    dataset: str | None = option(None, "Prompt-only data (preference data for --algo dpo): a .jsonl/.json/.parquet/.csv file or a `datasets` name. Python: or pass train_dataset to P3OTrainer.", required=True)
    output_dir: str = option(None, "Run directory: final model, config.yaml, metrics.jsonl, checkpoints.", required=True)
    algo: str = option("p3o-v2", "Algorithm: p3o-v1, p3o-v2 (P3O with separate / joint clipping), ppo, rloo, grpo, remax, online-dpo, dpo (offline, on --dataset's preference pairs).", choices=ALGOS)
    reward_fn: list[str] | None = option(None, "Reward function(s) `package.module:fn` or `path/file.py:fn`, called as fn(prompts, completions, **columns); repeat the flag for several.")
    reward_model: list[str] | None = option(None, "Sequence-classification reward model(s): directory, hub name or .gguf (one label); repeat the flag for several.")
    reward_url: list[str] | None = option(None, "Reward(s) served over HTTP: POST {\"prompts\", \"completions\", \"completion_ids\", **columns}, answer {\"rewards\": [...]} (the OpenRLHF/verl convention); repeat the flag for several.")
    reward_url_timeout: float = option(60.0, "Seconds to wait for a --reward_url answer.")
    reward_url_retries: int = option(5, "Retries of a --reward_url request after a timeout, HTTP 429/5xx or a refused connection, waiting 1, 2, 4, ... s.")
    reward_weights: list[float] | None = option(None, "One weight per reward, in the order --reward_fn..., --reward_model..., --reward_url... (Python: then reward_funcs); the reward is their weighted sum, each part logged as reward/<name>. Default: all 1.")
    monitor_reward_fn: str | None = option(None, "A second reward function scored on every rollout for monitoring only (e.g. a gold reward), logged as monitor_reward; never trained on. With it, an over-optimisation watch warns when the reward rises while it falls.")
    eval_dataset: str | None = option(None, "Held-out prompts: the policy is evaluated on them before training, every --eval_steps and at the end (KL to the reference, reward, monitor reward, with standard errors) into eval.jsonl.")
    eval_steps: int = option(0, "Evaluate on --eval_dataset every N steps (0: only before and after training).")
    eval_max_prompts: int | None = option(None, "Use at most this many --eval_dataset prompts (the first ones).")
    ref_model_name_or_path: str | None = option(None, "Frozen reference policy; defaults to the initial policy.")
    tokenizer_name_or_path: str | None = option(None, "Tokenizer; defaults to the policy's.")
    dataset_split: str = option("train", "Split to read from a `datasets` name.")
    dataset_config: str | None = option(None, "Configuration name of a `datasets` dataset.")
    prompt_column: str = option("prompt", "Column holding the prompt: plain text or a list of chat messages.")
    chosen_column: str = option("chosen", "dpo: column holding the preferred completion.")
    rejected_column: str = option("rejected", "dpo: column holding the other completion.")
    torch_dtype: str = option("float32", "Weights of the policy and reference: float32 (AdamW needs full-precision master weights), bfloat16, float16 or auto (as saved). Use --mixed_precision for fast half-precision compute.", choices=("float32", "bfloat16", "float16", "auto"))
    trust_remote_code: bool = option(False, "Allow model repositories to run their own code. Off unless asked for.")
    use_peft: bool = option(False, "Train LoRA adapters (peft) instead of every weight; the reference is the same model with the adapters off, so one copy of the weights is held. Saves the merged model, and the adapter under adapter/.")
    lora_r: int = option(16, "LoRA rank (with --use_peft).")
    lora_alpha: float = option(32.0, "LoRA scale numerator: updates are scaled by lora_alpha / lora_r (with --use_peft).")
    lora_target_modules: str = option("all-linear", "Modules that get adapters: all-linear (every linear layer but the output head) or comma-separated names such as q_proj,v_proj (with --use_peft).", comma_list=True)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass instead of storing them: less memory for longer sequences and bigger batches, at about one more forward's time.")
    # --- sizes --------------------------------------------------------------------------------
    max_steps: int | None = option(None, "Rollout-and-update iterations (default 100). Given with --num_train_epochs, it wins, as in transformers.")
    pairs_per_step: int = option(64, "Prompts per rollout over all processes (each samples an equal share), each with its group of responses (a pair for P3O and DPO, num_generations for the others). Global, so a config means the same run on 1 or N processes.")
    num_generations: int | None = option(None, "Responses sampled per prompt (k): rloo (default 2) and grpo (default 4) take k >= 2, ppo and remax k >= 1 (default 1; remax adds a greedy response); p3o and dpo always use 2.")
    num_train_epochs: float | None = option(None, "Passes over --dataset; when given, sets max_steps = ceil(passes * rows / pairs_per_step). The usual way to size dpo.")
    minibatch_pairs: int | None = option(None, "Prompt groups per optimiser step over all processes; default: the largest divisor of pairs_per_step that is at most 8 (or the number of processes, if more) and a multiple of the number of processes. Groups are never split.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimiser step in each process (each process's share of minibatch_pairs must divide by it); the result is the same, the memory smaller.")
    epochs: int | None = option(None, "Passes (K) over each rollout; groups are reshuffled each pass. Default 4 (dpo and online-dpo: 1).")
    # --- generation ---------------------------------------------------------------------------
    max_new_tokens: int = option(64, "Tokens sampled per response; EOS ends a response early and counts as part of it. dpo: longer chosen/rejected completions are cut to it.")
    max_completion_length: int | None = option(None, "TRL's name for --max_new_tokens (either may be given).", alias_of="max_new_tokens")
    dataset_name: str | None = option(None, "TRL's name for --dataset (either may be given).", alias_of="dataset")
    max_prompt_length: int | None = option(None, "Longer prompts keep their last tokens (left truncation, reported once). Default: the model's context minus max_new_tokens.")
    generation_backend: str = option("transformers", "transformers (batched, KV-cached `generate`) or vllm (GPU; imported only when asked for; the policy's weights are pushed into it before each rollout, and log-probabilities still come from the training model).", choices=("transformers", "vllm"))
    vllm_gpu_memory_utilization: float = option(0.3, "Fraction of the GPU's memory vLLM may take (with --generation_backend vllm; training shares the device).")
    compile_sampling: bool = option(False, "Run each sampled token after the prompt through one torch.compile'd forward over a static KV cache (transformers backend): a CUDA graph per token on GPUs; fused element-wise kernels on a CPU (needs a C++ compiler). The first rollout pays for compiling (up to a minute on 2 CPU cores; less once inductor's cache holds the kernels). On a CPU it pays on small models, not on SmolLM2-135M-sized ones (docs/performance.md).")
    decoding_loop: str = option("p3o", "Who runs the sampling loop (transformers backend): p3o (default) runs Llama-style models (Llama, Qwen2 and kin) on a CPU with its own loop, the same arithmetic and tokens as transformers' generate with far fewer operations a token, and hands every other model to generate; transformers: generate always.", choices=("p3o", "transformers"))
    temperature: float = option(1.0, "Sampling temperature; log-probabilities use the same tempered distribution (as TRL's, without --top_k/--top_p's truncation), except dpo's and online-dpo's, at 1 as in TRL's DPO trainers.")
    top_k: int = option(0, "Top-k sampling; 0 disables it (the default, as P3O assumes the policy's own distribution).")
    top_p: float = option(1.0, "Nucleus sampling; 1.0 disables it.")
    # --- objective ----------------------------------------------------------------------------
    beta: float | None = option(None, "KL penalty coefficient (P3O: Delta = (r1 - r2) - beta * (kl1 - kl2)); default 0.05. For dpo and online-dpo it is beta_dpo, default 0.1.")
    kl_target: float | None = option(None, "Adaptive KL controller: steer the rollout's mean KL towards this target by adapting beta (Ziegler et al.); unset: beta is fixed.")
    kl_horizon: int = option(10000, "Adaptive KL controller horizon, in responses.")
    clip_eps: float = option(0.2, "Clip range eps of the ratio (V1) or of d - d_old (V2).")
    importance_clamp: float = option(10.0, "C: importance weights are clamped to [1/C, C].")
    loss_aggregation: str | None = option(None, "group-mean (per prompt group: trajectory level, as the P3O paper; default) or token-mean (summed losses / response tokens; default for ppo). pair-mean is accepted for group-mean.", choices=(*AGGREGATIONS, "pair-mean"))
    scale_rewards: str = option("group", "grpo: group (divide advantages by the group's reward std) or none (Dr. GRPO).", choices=("group", "none"))
    vf_coef: float = option(0.1, "ppo: value loss coefficient.")
    value_clip_eps: float = option(0.2, "ppo: clip range of the value prediction around the rollout's value.")
    gamma: float = option(1.0, "ppo: discount of GAE.")
    gae_lambda: float = option(0.95, "ppo: lambda of GAE.")
    delta_normalization: str = option("none", "none, or rms: divide Delta by its root-mean-square over the rollout (shift-invariant; raw rewards are never normalised).", choices=("none", "rms"))
    delta_clip: float | None = option(None, "Clip Delta to [-delta_clip, delta_clip] after normalisation.")
    delta_kl: str = option("rollout", "P3O: the KL inside Delta. rollout: the rollout's l_old - l_ref, fixed for its K epochs (default); current: the policy's live l_theta - l_ref at every minibatch, as the authors' code (Delta moves by -beta * (log rho1 - log rho2); the same at a rollout's first minibatch).", choices=("rollout", "current"))
    reward_normalization: str = option("none", "none (default: raw rewards; only Delta or advantages are scaled), or running_std: clip rewards to +-reward_clip, then divide by the running std of all rewards so far (not before they spread), as the authors' code (trlx). A per-prompt shift still cancels within a group but changes that std, so the update's scale.", choices=("none", "running_std"))
    reward_clip: float = option(10.0, "With --reward_normalization running_std: raw rewards are first clipped to [-reward_clip, reward_clip].")
    update_schedule: str = option("epochs", "epochs: K passes over the rollout, its groups reshuffled into minibatches each pass (default); consecutive: one shuffled pass taking K optimiser steps in a row on each minibatch, as the authors' V1 code.", choices=("epochs", "consecutive"))
    # --- optimiser ----------------------------------------------------------------------------
    learning_rate: float = option(1e-6, "AdamW learning rate (1e-6..8e-6 for 1B-6B models; tiny models on CPU want ~1e-3).")
    lr_scheduler_type: str = option("constant_with_warmup", "A transformers scheduler name: linear, cosine, constant, constant_with_warmup, ...")
    warmup_steps: int = option(0, "Optimiser steps of linear warm-up (overrides warmup_ratio when > 0).")
    warmup_ratio: float = option(0.0, "Warm-up as a fraction of all optimiser steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2 (0.95 as in the P3O experiments).")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm; 0 disables it.")
    # --- run ------------------------------------------------------------------------------------
    seed: int = option(42, "Seed for initialisation, sampling and shuffling: the same seed gives the same weights on CPU.")
    logging_steps: int = option(1, "Print a summary line every N steps (metrics.jsonl always gets every step).")
    log_completions: int = option(2, "Prompts whose completions and rewards go to completions.jsonl every logging step (0: none; TRL's True: 2).", true_is=2)
    reward_batch_size: int = option(64, "Sequences per reward-model forward pass.")
    missing_eos_penalty: float = option(0.0, "Subtracted from the reward of a response that ends without an end-of-turn or EOS token (cut at --max_new_tokens), as TRL's option of that name. A reward model scores the reply re-rendered by its chat template, which closes every turn, so a cut-off reply otherwise scores as if it had ended.")
    mixed_precision: str = option("no", "no, bf16 or fp16 (passed to accelerate).", choices=("no", "bf16", "fp16"))
    report_to: str = option("none", "Also log metrics to: none, tensorboard, wandb, or several joined by commas (metrics.jsonl is always written).", comma_list=True,
                             none_is="none")
    overwrite: bool = option(False, "Allow a non-empty output_dir: files of the same name are replaced, and the checkpoints of the run that was there removed (other files are kept).")
    save_steps: int = option(0, "Write a checkpoint (policy, optimiser, scheduler, RNG, counters) every N steps into output_dir/checkpoint-N; 0: only on Ctrl-C/SIGTERM.")
    save_total_limit: int | None = option(None, "Keep only the newest N checkpoints (default: all).")
    resume: bool = option(False, "Continue from the latest complete checkpoint in --output_dir, bit-for-bit as if never stopped (same settings required); starts afresh if the directory is empty.")
    max_consecutive_skips: int = option(5, "Stop the run when this many optimiser steps in a row are skipped for a non-finite loss or gradient.")
    disable_progress_bar: bool = option(False, "Hide the progress bar (summary lines are still printed).")

    # `--help` groups the flags by these sections (every field is in one: tests/test_api.py checks).
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path", "torch_dtype",
                  "trust_remote_code", "use_peft", "lora_r", "lora_alpha", "lora_target_modules",
                  "gradient_checkpointing", "mixed_precision"),
        "data": ("dataset", "dataset_name", "dataset_split", "dataset_config", "prompt_column", "chosen_column", "rejected_column",
                 "eval_dataset", "eval_steps", "eval_max_prompts"),
        "rewards": ("reward_fn", "reward_model", "reward_url", "reward_url_timeout", "reward_url_retries",
                    "reward_weights", "monitor_reward_fn", "reward_batch_size", "missing_eos_penalty"),
        "rollout": ("max_steps", "num_train_epochs", "pairs_per_step", "num_generations", "max_new_tokens",
                    "max_completion_length", "max_prompt_length", "generation_backend", "vllm_gpu_memory_utilization",
                    "compile_sampling", "decoding_loop", "temperature", "top_k", "top_p"),
        "algorithm": ("algo", "beta", "kl_target", "kl_horizon", "clip_eps", "importance_clamp", "epochs",
                      "minibatch_pairs", "loss_aggregation", "scale_rewards", "vf_coef", "value_clip_eps", "gamma",
                      "gae_lambda", "delta_normalization", "delta_clip", "delta_kl", "reward_normalization",
                      "reward_clip", "update_schedule"),
        "optimisation": ("learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay",
                         "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "gradient_accumulation_steps",
                         "max_consecutive_skips", "seed"),
        "logging": ("logging_steps", "log_completions", "report_to", "disable_progress_bar"),
        "checkpoints": ("output_dir", "overwrite", "save_steps", "save_total_limit", "resume"),
    }

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise UsageError("--output_dir is required")
        self.report_to = joined_names(self.report_to)  # TRL's list of trackers
        if self.max_steps == -1:  # transformers' "unset" (TRL's configs carry it): the epochs decide
            self.max_steps = None
        for name in ("reward_fn", "reward_model", "reward_url"):  # one path is a list of one
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for spec in self.reward_fn or []:  # else it would be taken for a reward model's path
            if ":" not in spec:
                raise UsageError(f"--reward_fn {spec}: name the function too, as path/to/file.py:function or "
                                 "package.module:function")
        # TRL's names fold into p3o's and are cleared, so the config (and config.yaml, and
        # dataclasses.replace) holds one spelling, which a flag or a replace then overrides.
        for alias, name in trl_names().items():
            if getattr(self, alias) is not None:
                setattr(self, name, getattr(self, alias))
                setattr(self, alias, None)
        if self.max_steps is not None and self.num_train_epochs is not None:
            log.warning("--max_steps %d and --num_train_epochs %g: max_steps wins (as in transformers)",
                        self.max_steps, self.num_train_epochs)
            self.num_train_epochs = None
        elif self.max_steps is None and self.num_train_epochs is None:
            self.max_steps = 100
        self._resolve_algorithm_settings()
        if self.save_steps < 0 or (self.save_total_limit is not None and self.save_total_limit < 1):
            raise UsageError("--save_steps must be >= 0 and --save_total_limit at least 1")
        if self.eval_steps < 0 or (self.eval_max_prompts is not None and self.eval_max_prompts < 1):
            raise UsageError("--eval_steps must be >= 0 and --eval_max_prompts at least 1")
        for name in ("max_steps", "pairs_per_step", "gradient_accumulation_steps", "epochs", "max_new_tokens",
                     "logging_steps", "reward_batch_size", "kl_horizon", "max_consecutive_skips", "lora_r"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.reward_url_timeout <= 0 or self.reward_url_retries < 0:
            raise UsageError("--reward_url_timeout must be > 0 and --reward_url_retries >= 0")
        if self.log_completions < 0:
            raise UsageError("--log_completions must be >= 0")
        checks = [
            (self.missing_eos_penalty >= 0, "--missing_eos_penalty must be >= 0 (it is subtracted)"),
            (self.temperature > 0, "--temperature must be > 0"),
            (0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
            (self.top_k >= 0, "--top_k must be >= 0 (0 disables it)"),
            (self.beta >= 0, "--beta must be >= 0"),
            (self.clip_eps > 0, "--clip_eps must be > 0"),
            (self.importance_clamp >= 1, "--importance_clamp (C) must be >= 1"),
            (self.learning_rate > 0, "--learning_rate must be > 0"),
            (0 <= self.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
            (self.warmup_steps >= 0, "--warmup_steps must be >= 0"),
            (self.weight_decay >= 0, "--weight_decay must be >= 0"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam_beta1 and --adam_beta2 must be in [0, 1)"),
            (self.adam_epsilon > 0, "--adam_epsilon must be > 0"),
            (self.max_grad_norm >= 0, "--max_grad_norm must be >= 0 (0 disables clipping)"),
            (self.delta_clip is None or self.delta_clip > 0, "--delta_clip must be > 0"),
            (self.reward_clip > 0, "--reward_clip must be > 0"),
            (self.loss_aggregation in AGGREGATIONS, f"--loss_aggregation must be one of {', '.join(AGGREGATIONS)}"),
            (self.kl_target is None or self.kl_target > 0, "--kl_target must be > 0"),
            (self.num_train_epochs is None or self.num_train_epochs > 0, "--num_train_epochs must be > 0"),
            (self.scale_rewards in ("group", "none"), "--scale_rewards must be group or none"),
            (self.vf_coef >= 0, "--vf_coef must be >= 0"),
            (self.value_clip_eps > 0, "--value_clip_eps must be > 0"),
            (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1, "--gamma and --gae_lambda must be in [0, 1]"),
            (self.torch_dtype in ("float32", "bfloat16", "float16", "auto"),
             "--torch_dtype must be float32, bfloat16, float16 or auto"),
            (self.minibatch_pairs is None or self.minibatch_pairs >= 1, "--minibatch_pairs must be at least 1"),
            (self.max_prompt_length is None or self.max_prompt_length >= 1, "--max_prompt_length must be at least 1"),
            (self.delta_normalization in ("none", "rms"), "--delta_normalization must be none or rms"),
            (self.delta_kl in ("rollout", "current"), "--delta_kl must be rollout or current"),
            (self.reward_normalization in ("none", "running_std"), "--reward_normalization must be none or running_std"),
            (self.update_schedule in ("epochs", "consecutive"), "--update_schedule must be epochs or consecutive"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "--mixed_precision must be no, bf16 or fp16"),
            (self.generation_backend in ("transformers", "vllm"), "--generation_backend must be transformers or vllm"),
            (0 < self.vllm_gpu_memory_utilization <= 1, "--vllm_gpu_memory_utilization must be in (0, 1]"),
            (not (self.compile_sampling and self.generation_backend == "vllm"),
             "--compile_sampling compiles the transformers backend's decoding step; vLLM runs its own: drop one of them"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def _resolve_algorithm_settings(self) -> None:
        """Fill the settings left unset from the algorithm's defaults; refuse what it cannot use."""
        algorithm = get_algorithm(self.algo)
        if self.loss_aggregation == "pair-mean":
            self.loss_aggregation = "group-mean"
        for name in ("beta", "epochs", "loss_aggregation", "num_generations"):
            if getattr(self, name) is None:
                setattr(self, name, default_setting(algorithm, name))
        low, high = algorithm.samples
        if self.num_generations < low or (high is not None and self.num_generations > high):
            allowed = f"exactly {low}" if low == high else f"at least {low}"
            raise UsageError(f"--algo {self.algo} takes {allowed} responses per prompt, got --num_generations "
                             f"{self.num_generations}")
        if self.delta_kl == "current" and not self.algo.startswith("p3o"):
            raise UsageError(f"--delta_kl current changes P3O's Delta; --algo {self.algo} has none (use p3o-v1 or p3o-v2)")
        if self.delta_kl == "current" and self.delta_normalization != "none":
            raise UsageError("--delta_kl current recomputes Delta at every minibatch, which the rollout-wide "
                             "--delta_normalization rms cannot follow; drop one of them")
        if self.kl_target is not None and not algorithm.kl_penalty:
            raise UsageError(f"--kl_target adapts a KL penalty, but --algo {self.algo} has none (its --beta is beta_dpo)")
        self._warn_unused()

    def _warn_unused(self) -> None:
        """Say which settings, changed from their defaults, this run does not use (a typo'd --algo or a
        forgotten --use_peft would otherwise pass unnoticed). An algorithm registered outside p3o may
        read any setting, so only the built-in ones are judged."""
        built_in = self.algo in BUILT_IN
        # (settings, whether they act in this run, what they need)
        scoped = [(("vf_coef", "value_clip_eps", "gamma", "gae_lambda"), not built_in or self.algo == "ppo",
                   "--algo ppo"),
                  (("scale_rewards",), not built_in or self.algo == "grpo", "--algo grpo"),
                  (("delta_normalization", "delta_clip"), not built_in or self.algo.startswith("p3o"),
                   "--algo p3o-v1 or p3o-v2"),
                  (("lora_r", "lora_alpha", "lora_target_modules"), self.use_peft, "--use_peft")]
        defaults = {f.name: f.default for f in fields(self)}
        for names, used, needs in scoped:
            changed = [f"--{n}" for n in names if not used and getattr(self, n) != defaults[n]]
            message = f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect without {needs}"
            if changed and message not in _WARNED:  # once: dataclasses.replace runs this again
                _WARNED.add(message)
                log.warning(message)


def trl_names() -> dict[str, str]:
    """TRL's names of P3OConfig's options (max_completion_length -> max_new_tokens, ...)."""
    return {f.name: f.metadata["alias_of"] for f in fields(P3OConfig) if f.metadata.get("alias_of")}


_WARNED: set[str] = set()  # `_warn_unused`'s messages already given in this process
BUILT_IN = ("p3o-v1", "p3o-v2", "rloo", "grpo", "remax", "ppo", "dpo", "online-dpo")  # p3o's own algorithms

TrainConfig = P3OConfig  # the name before the Python API; kept for scripts that use it


def check_reward_sources(cfg: P3OConfig, names: list[str], eval_dataset_given: bool) -> None:
    """The rewards a run was given (`names`: from the flags and from Python objects) suit its
    algorithm, and their weights match them."""
    algorithm = get_algorithm(cfg.algo)
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(names):
        raise UsageError(f"--reward_weights has {len(cfg.reward_weights)} weights for {len(names)} rewards "
                         f"({', '.join(names) or 'none'}); give one weight per reward")
    given = [*names, *(["--monitor_reward_fn"] if cfg.monitor_reward_fn else [])]
    if algorithm.offline:
        if given and not eval_dataset_given:
            raise UsageError(f"--algo {cfg.algo} learns from the preference pairs of --dataset and samples "
                             f"nothing to score; drop {' and '.join(given)} (or give --eval_dataset, which "
                             "they then score), or use --algo online-dpo")
    elif not names:
        raise UsageError("give a reward: --reward_fn (package.module:fn or file.py:fn), --reward_model (a "
                         "directory) or --reward_url; in Python, reward_funcs")


@dataclass(frozen=True)
class Sizes:
    """Batch sizes derived from a TrainConfig, all in one place. The rollout and its minibatches
    are global (shared by all processes); micro-batches are per process."""

    groups_per_step: int  # prompt groups per rollout, over all processes (--pairs_per_step)
    num_generations: int  # responses per prompt (k): 2 for P3O
    minibatch_groups: int  # groups per optimiser step, over all processes (--minibatch_pairs)
    micro_groups: int  # groups per forward/backward in one process
    minibatches_per_epoch: int
    optimizer_steps: int | None  # over the whole run (None until --num_train_epochs is turned into steps)
    processes: int = 1

    @property
    def local_groups(self) -> int:
        """Groups each process samples per rollout."""
        return self.groups_per_step // self.processes

    @property
    def local_minibatch(self) -> int:
        """Groups each process holds per optimiser step."""
        return self.minibatch_groups // self.processes


def default_minibatch(pairs_per_step: int, cap: int = 8, processes: int = 1) -> int:
    """Largest divisor of pairs_per_step that is at most `cap` (the paper uses 2-8 pairs) and that the
    processes share equally: the single-process default whenever the processes allow it, so that the
    same command takes the same optimiser steps on 1 or N processes."""
    cap = max(cap, processes)
    return max(d for d in range(processes, min(cap, pairs_per_step) + 1, processes) if pairs_per_step % d == 0)


def derive_sizes(cfg: P3OConfig, processes: int = 1) -> Sizes:
    """`processes` share each rollout and each minibatch equally (groups are never split), so the
    same config is the same experiment on 1 or N processes."""
    if cfg.pairs_per_step % processes:
        raise UsageError(f"--pairs_per_step {cfg.pairs_per_step} is the whole rollout, shared equally by the "
                         f"{processes} processes: make it a multiple of {processes}")
    minibatch = cfg.minibatch_pairs or default_minibatch(cfg.pairs_per_step, processes=processes)
    if minibatch < 1 or cfg.pairs_per_step % minibatch:
        raise UsageError(f"--pairs_per_step {cfg.pairs_per_step} must be a multiple of --minibatch_pairs {minibatch}; "
                         f"try --minibatch_pairs {default_minibatch(cfg.pairs_per_step, processes=processes)}")
    if minibatch % (processes * cfg.gradient_accumulation_steps):
        shared = f" times the {processes} processes sharing it" if processes > 1 else ""
        raise UsageError(f"--minibatch_pairs {minibatch} must be a multiple of --gradient_accumulation_steps "
                         f"{cfg.gradient_accumulation_steps}{shared}")
    per_epoch = cfg.pairs_per_step // minibatch
    return Sizes(
        groups_per_step=cfg.pairs_per_step,
        num_generations=cfg.num_generations,
        minibatch_groups=minibatch,
        micro_groups=minibatch // processes // cfg.gradient_accumulation_steps,
        minibatches_per_epoch=per_epoch,
        optimizer_steps=cfg.max_steps * cfg.epochs * per_epoch if cfg.max_steps is not None else None,
        processes=processes,
    )
