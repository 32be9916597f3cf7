"""The shared rollout/update engine on `accelerate`, as in the algorithm box of docs/p3o.md section 4:

    repeat:  1. take a batch of prompts       2. sample k responses per prompt from pi_old
             3. score each response           4. log-probs under pi_old and pi_ref, KL per response
             5. the algorithm's own quantities (P3O: Delta per pair; RLOO: advantages; PPO: GAE)
             for each of K epochs: shuffle the groups (never split one), and per minibatch of
             groups take one optimiser step on the algorithm's loss

Only the algorithm's `prepare` and `loss` differ between algorithms, plus the hooks some provide
(`p3o.rl.algorithms.Algorithm`): a wrapped policy (PPO's critic), given responses instead of sampled
ones (offline DPO) and more rollout fields after scoring (ReMax's greedy baseline). The rollout is a
typed `Rollout`; beta comes from a KL controller.
Shape legend as in `p3o.rl.rollout`: G prompts, k responses each, B = G*k, T response tokens.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field

import torch

from p3o.core.optimizer import adamw, check_trainable, lr_scheduler
from p3o.core.skips import NonFiniteTraining, count_skip  # NonFiniteTraining: still importable from here
from p3o.core.step import accumulate_and_step
from p3o.errors import UsageError
from p3o.models.attention import float32_attention_backward_on_cpu
from p3o.models.loading import disable_dropout, eos_token_ids
from p3o.models.lean_lora import lean_lora_forward
from p3o.models.lean_mlp import lean_gated_mlp
from p3o.models.lora import (AdaptersDisabled, InitialAdapters, add_lora, adapters_change_the_model,
                             check_trains_adapters_only, hold_frozen_base_in, is_lora)
from p3o.rl.algorithms import get_algorithm
from p3o.rl.config import TrainConfig, derive_sizes
from p3o.rl.kl_control import KLController
from p3o.rl.losses import aggregate
from p3o.rl.reward_scaling import RunningRewardScale
from p3o.rl.rollout import (
    PolicyOutputs,
    Rollout,
    batched_logprobs_and_values,
    decode_completions,
    generation_config,
    has_cpp_compiler,
    layer_width,
    pad_prompts,
    pad_responses,
    prompt_budget,
    sample_responses,
    sequence_logprobs,
    shares_prompt_forward,
    supports_logits_to_keep,
    token_logprobs_and_values,
    worth_sharing_prompts,
)
from p3o.rl.vllm_backend import VLLMGenerator
from p3o.utils.distributed import (
    check_supported,
    configure_for_updates,
    gathered,
    is_deepspeed,
    is_sharded,
    make_accelerator,
    sum_across_processes,
)
from p3o.utils.seeding import generator, seed_global_rng


log = logging.getLogger("p3o")


@dataclass
class TrainerState:
    step: int = 0  # rollout-and-update iterations done
    optimizer_steps: int = 0
    skipped_updates: int = 0  # optimiser steps dropped for a non-finite gradient
    consecutive_skips: int = 0  # of them, the ones since the last good optimiser step


@dataclass
class RolloutTexts:
    prompts: list  # (G,) raw prompts as in the dataset
    completions: list[str]  # (B,)
    rewards: list[float] | None  # (B,); None when nothing was scored (offline DPO)
    extra: dict[str, list] = field(default_factory=dict)  # columns reward functions logged (log_extra), (B,) each


class Trainer:
    """Trains `policy` against `reward` on `prompts`. One instance per run; `train()` runs it."""

    def __init__(self, cfg: TrainConfig, policy, tokenizer, reward, prompts, ref_policy=None, accelerator=None,
                 monitor_reward=None, eval_prompts=None, eval_pairs=None):
        self.cfg, self.tokenizer, self.reward, self.prompts = cfg, tokenizer, reward, prompts
        self.eval_prompts = eval_prompts  # held-out prompts (a PromptDataset) for `p3o.rl.train.HeldOutEvaluator`
        self.eval_pairs = eval_pairs  # and DPO's held-out preference pairs, where the held-out data has them
        self.monitor_reward = monitor_reward  # scored and logged, never trained on
        self.algorithm = get_algorithm(cfg.algo)
        self.accelerator = accelerator or make_accelerator(mixed_precision=cfg.mixed_precision)
        check_supported(self.accelerator)
        self.sharded = is_sharded(self.accelerator)  # FSDP2, ZeRO-3: every forward is a collective
        if (self.sharded or is_deepspeed(self.accelerator)) and (cfg.use_peft or cfg.generation_backend == "vllm"):
            raise UsageError("--use_peft and --generation_backend vllm are not supported under FSDP or DeepSpeed yet; "
                             "launch with --accelerate_config ddp")
        self.sizes = derive_sizes(cfg, self.accelerator.num_processes)
        configure_for_updates(self.accelerator, self.sizes.micro_groups * self.sizes.num_generations, cfg.max_grad_norm)
        self.state = TrainerState()
        self.reward_logs: dict[str, list] = {}  # what reward functions logged this step: log_metric, log_extra
        self.logged_metrics: dict[str, float] = {}  # the step's log_metric means, for `step_metrics`
        self.kl_control = KLController(cfg.beta, cfg.kl_target, cfg.kl_horizon)
        self.reward_scale = RunningRewardScale(cfg.reward_clip) if cfg.reward_normalization == "running_std" else None
        if self.algorithm.offline and getattr(prompts, "responses", None) is None:
            raise UsageError(f"--algo {cfg.algo} needs preference data (prompt, chosen, rejected)")

        self.layer_width = layer_width(policy)  # before adapters: what packing a group's prompt saves
        if cfg.use_peft:
            policy = add_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules)
            lean_lora_forward(policy)  # the same function, cast once and scaled at rank r
        lean_gated_mlp(policy)  # the same bits, keeping two of the MLP's three activations
        if cfg.mixed_precision == "bf16" and self.accelerator.device.type == "cpu":  # bf16 flash backward is slow there
            float32_attention_backward_on_cpu()
        disable_dropout(policy)  # log-ratios must be exact: rho is 1 at the first update
        check_trainable(policy)  # before PPO's value head, which alone would train
        self.ref_policy = self._reference(policy, ref_policy)
        # Log-probs of the tempered distribution sampled (the ratio's and KL's), except DPO's, at 1 as TRL's.
        self.logprob_temperature = cfg.temperature if self.algorithm.tempered_logprobs else 1.0
        if cfg.gradient_checkpointing:  # acts in the training forward only (see `optimizer_step`)
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = self.algorithm.wrap_policy(policy) if self.algorithm.wrap_policy else policy  # PPO: critic on the trunk
        self.with_values = getattr(model, "returns_values", False)  # its forward returns (outputs, values)
        if cfg.mixed_precision == "bf16" and ref_policy is None and is_lora(policy):  # weights never re-cast
            hold_frozen_base_in(policy, torch.bfloat16)  # after the value head, which takes the head's dtype
        optimizer = adamw(model, cfg.learning_rate, cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                          eps=cfg.adam_epsilon)
        self.policy, self.optimizer = self.accelerator.prepare(model, optimizer)  # the trained module
        if not (self.sharded or is_deepspeed(self.accelerator)):  # every forward runs under `accelerator.autocast()`
            _without_float32_outputs(self.trained_module)
        if self.sharded:  # FSDP2 sets itself up in the root's first forward; generation calls PPO's inner model first
            with torch.no_grad():
                self.policy(input_ids=torch.ones(1, 1, dtype=torch.long, device=self.accelerator.device))
        self.scheduler = lr_scheduler(cfg.lr_scheduler_type, self.optimizer, self.sizes.optimizer_steps,
                                      cfg.warmup_steps, cfg.warmup_ratio)

        unwrapped = self.unwrapped_policy
        _check_vocabulary(tokenizer, unwrapped)
        self.eos_ids = eos_token_ids(tokenizer, unwrapped)
        self.gen_config = generation_config(cfg, tokenizer, self.eos_ids)
        self.greedy_config = generation_config(cfg, tokenizer, self.eos_ids, greedy=True)
        self.max_prompt_length = prompt_budget(unwrapped.config, cfg.max_new_tokens, cfg.max_prompt_length)
        self.logits_to_keep = supports_logits_to_keep(unwrapped)
        self.long_prompts = sum(len(ids) > self.max_prompt_length for ids in prompts.token_ids)
        self.fuse_old_pass = _old_pass_is_redundant(cfg, self.sizes, self.algorithm)
        # A group's k responses (P3O and DPO pairs, RLOO, GRPO) run their shared prompt once in a
        # forward pass where that is exact (here) and cheaper (`packed_group`, per rollout):
        # `prompt_group` rows share a prompt (1: none).
        k = self.sizes.num_generations
        packed = self.max_prompt_length + k * cfg.max_new_tokens  # the longest [prompt, y1, ..., yk]
        shares = (k >= 2 and not self.with_values and self.logits_to_keep
                  and shares_prompt_forward(unwrapped, packed) and shares_prompt_forward(self.ref_policy, packed))
        self.prompt_group = k if shares else 1
        self.vllm = None
        if cfg.generation_backend == "vllm" and not self.algorithm.offline:
            self.vllm = VLLMGenerator(cfg, cfg.model_name_or_path, self.eos_ids,
                                      self.max_prompt_length + cfg.max_new_tokens, self.accelerator,
                                      max_num_seqs=self.sizes.local_groups * k)
        if cfg.compile_sampling:
            _check_compiler(self.accelerator.device)

    def _reference(self, policy, given):
        """The frozen reference: `given`, else the initial policy; under LoRA that is the policy itself
        with its adapters off (no second copy of the weights), or with the adapters it came with."""
        if is_lora(policy):
            check_trains_adapters_only(policy)
            if given is None:
                return InitialAdapters(policy) if adapters_change_the_model(policy) else AdaptersDisabled(policy)
        reference = (given or copy.deepcopy(policy)).requires_grad_(False).eval()
        disable_dropout(reference)
        return reference.to(self.accelerator.device)

    @property
    def trained_module(self):
        """The unwrapped module the optimiser updates: the policy, or the policy with its value head."""
        return self.accelerator.unwrap_model(self.policy)

    @property
    def unwrapped_policy(self):
        """The language model itself (what generates and what is saved)."""
        module = self.trained_module
        return module.policy if self.algorithm.wrap_policy is not None else module  # a wrapper keeps it as `.policy`

    # --- the loop ----------------------------------------------------------------------------

    def train(self, on_step=None, before_step=None) -> list[dict]:
        """Run until `max_steps`; `on_step(metrics, texts)` is called after every step (logging,
        checkpoints, callbacks) and ends the run early by returning True; `before_step()` before each."""
        history = []
        while self.state.step < self.cfg.max_steps:
            if before_step is not None:
                before_step()
            start = time.perf_counter()
            rollout, texts, timings = self.collect_rollout(self.state.step)
            lr = self.scheduler.get_last_lr()[0]  # the rate the rollout's first update applies, as TRL logs it
            t0 = time.perf_counter()
            update_stats = self.update(rollout, self.state.step)
            timings["time_update"] = time.perf_counter() - t0
            self.state.step += 1
            metrics = self.step_metrics(rollout, update_stats, timings, time.perf_counter() - start, lr)
            if "kl" in metrics:  # beta for the next rollout
                self.kl_control.update(metrics["kl"], rollout.num_groups * rollout.num_generations * self.accelerator.num_processes)
            history.append(metrics)
            if on_step is not None and on_step(metrics, texts):
                break
        return history

    def collect_rollout(self, step: int) -> tuple[Rollout, RolloutTexts, dict[str, float]]:
        k, timings = self.sizes.num_generations, {}
        device = self.accelerator.device
        # 1. The prompts of this step, each repeated k times (a group's rows are consecutive).
        indices = self.prompt_indices(step)
        rows = [self.prompts.rows[i] for i in indices]
        token_ids = [self.prompts.token_ids[i] for i in indices]
        query_ids, query_mask = pad_prompts(self.tokenizer, token_ids, self.max_prompt_length)  # (G, Lq)
        query_ids = query_ids.repeat_interleave(k, dim=0).to(device)  # (B, Lq)
        query_mask = query_mask.repeat_interleave(k, dim=0).to(device)  # (B, Lq)

        # 2. Sample k responses per prompt from pi_old (the current policy); offline DPO reads its pairs.
        t0 = time.perf_counter()
        offline = self.algorithm.offline
        if offline:
            given = self.algorithm.given_responses(self.prompts, indices)
            response_ids, response_mask = (t.to(device) for t in pad_responses(given, self.tokenizer.pad_token_id))
        else:
            if self.vllm is not None:  # it samples from pi_old: the policy as it is now
                self.vllm.sync_weights(self.unwrapped_policy)
            response_ids, response_mask = self.generate(query_ids, query_mask, self.gen_config,
                                                        f"sample/{self.accelerator.process_index}", step, k)  # (B, T)
        rollout = Rollout(k, query_ids, query_mask, response_ids, response_mask)
        timings["time_generate"] = time.perf_counter() - t0

        # 3. Score: raw rewards (B,) in float64, checked for count and finiteness.
        t0 = time.perf_counter()
        completions = self.completions(rollout)
        if not offline:
            scores = self.score(self.reward, rows, completions, response_ids, response_mask, k)  # (B,) on the CPU
            rollout.raw_rewards, ended = self.penalised(scores, response_ids, response_mask)
            rollout.stats["truncated_fraction"] = (~ended).float().mean().item()
            rollout.rewards = (rollout.raw_rewards if self.reward_scale is None else
                               self.reward_scale(rollout.raw_rewards, self.accelerator.device))
            for name, values in getattr(self.reward, "last_parts", {}).items():  # each part beside their sum
                known = values[~values.isnan()]  # a function's None: not applicable, left out of its mean
                rollout.part_sums[name] = (known.sum().item(), float(len(known)))
        timings["time_score"] = time.perf_counter() - t0

        # 4. Log-probs under pi_old (with values for PPO) and pi_ref; kl(y) = l_old(y) - l_ref(y) (docs/p3o.md section 3).
        #    When the rollout is used once on-policy, pi_old's come from the training forward instead.
        rollout.update(**self.log_probs(rollout, timings, old=not (offline or self.fuse_old_pass)))

        # 5. The algorithm's own quantities (P3O: Delta per pair), from the rollout and beta.
        if self.algorithm.extend_rollout is not None:
            t0 = time.perf_counter()
            rollout.update(**self.algorithm.extend_rollout(self, rollout, rows, step))
            timings["time_baseline"] = time.perf_counter() - t0
        if not self.fuse_old_pass:  # else per micro-batch, from the training forward (`optimizer_step`)
            self.prepare(rollout)
        if self.monitor_reward is not None and not offline:  # after `prepare`, which never sees it
            rollout.monitor_rewards = self.score(self.monitor_reward, rows, completions, response_ids, response_mask, k,
                                                 logged=False)
        rewards = rollout.raw_rewards.tolist() if rollout.raw_rewards is not None else None
        logged, self.reward_logs = self.reward_logs, {}
        self.logged_metrics = {name[7:]: sum(v) / len(v) for name, v in logged.items() if name.startswith("metric:")}
        extra = {name[6:]: v for name, v in logged.items() if name.startswith("extra:")}
        if wrong := sorted(name for name, v in extra.items() if len(v) != len(completions)):
            log.warning("log_extra column %s has not one value per completion (%d); left out", wrong[0],
                        len(completions))
        texts = RolloutTexts([r[self.prompts.prompt_column] for r in rows], completions, rewards,
                             {name: v for name, v in extra.items() if name not in wrong})
        return rollout, texts, timings

    def prepare(self, rollout: Rollout, old_token_logp: torch.Tensor | None = None,
                old_values: torch.Tensor | None = None) -> None:
        """Add the algorithm's quantities to `rollout` in place. `old_token_logp` (B, T): pi_old's
        token log-probs taken from the training forward (fused pass), with the KL they give;
        `old_values` (B, T): PPO's values from that forward."""
        if old_token_logp is not None:
            old_logp = sequence_logprobs(old_token_logp, rollout.response_mask)  # (B,)
            rollout.update(old_token_logp=old_token_logp, old_logp=old_logp, kl=old_logp - rollout.ref_logp)
        if old_values is not None:
            rollout.update(old_values=old_values)
        prepared = self.algorithm.prepare(rollout, self.cfg, self.kl_control.value)
        rollout.update(**prepared.fields)
        rollout.stats.update(prepared.stats)

    def completions(self, rollout: Rollout) -> list[str]:
        """The responses' texts (B,), each as it continues its prompt."""
        return decode_completions(self.tokenizer, rollout.query_ids, rollout.query_mask, rollout.response_ids,
                                  rollout.response_mask)

    def generate(self, query_ids, query_mask, gen_config, stream: str, step: int, k: int = 1):
        """(B, Lq) prompts, each repeated k times in consecutive rows -> response ids and mask (B, T)."""
        if self.vllm is not None:
            return self.vllm.sample(query_ids, query_mask, k, stream, step, greedy=not gen_config.do_sample)
        seed_global_rng(self.cfg.seed, stream, step)
        with self.accelerator.autocast(), gathered(self.trained_module):
            return sample_responses(self.unwrapped_policy, query_ids, query_mask, gen_config, self.eos_ids,
                                    synced=self.sharded, compiled=self.cfg.compile_sampling,
                                    loop=self.cfg.decoding_loop)

    def packed_group(self, rollout: Rollout, paired: bool = True) -> int:
        """Rows per packed [prompt, y1, ..., yk] sequence in this rollout's forwards: `prompt_group`
        where packing is exact and, at the rollout's padded lengths and this model's width, cheaper
        (`worth_sharing_prompts`); else 1. `paired`: as in `log_probs`."""
        k = self.prompt_group if paired else 1
        lengths = rollout.query_ids.shape[1], rollout.response_ids.shape[1]  # (Lq, T), padded
        return k if k > 1 and worth_sharing_prompts(k, *lengths, self.layer_width) else 1

    def log_probs(self, rollout: Rollout, timings: dict, old: bool = True, paired: bool = True) -> dict[str, torch.Tensor]:
        """Token and sequence log-probs under pi_ref and (if `old`) pi_old, the latter with the
        values of PPO's head; the KL per response when both are there: Rollout fields by name.
        `paired`: the rollout's groups (not ReMax's one greedy response per prompt)."""
        cfg, out = self.cfg, {}
        batch = self.sizes.micro_groups * self.sizes.num_generations  # sequences per no-grad forward, as in the update
        group = self.packed_group(rollout, paired)
        with self.accelerator.autocast():
            if old:
                t0 = time.perf_counter()
                out["old_token_logp"], values = batched_logprobs_and_values(
                    self.trained_module, rollout, self.logprob_temperature, batch, self.logits_to_keep,
                    self.with_values, group)
                if values is not None:
                    out["old_values"] = values  # (B, T)
                out["old_logp"] = sequence_logprobs(out["old_token_logp"], rollout.response_mask)  # (B,)
                timings["time_old_logprobs"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out["ref_token_logp"], _ = batched_logprobs_and_values(
                self.ref_policy, rollout, self.logprob_temperature, batch, self.logits_to_keep, prompt_group=group)
            timings["time_reference"] = time.perf_counter() - t0
        out["ref_logp"] = sequence_logprobs(out["ref_token_logp"], rollout.response_mask)  # (B,)
        if old:
            out["kl"] = out["old_logp"] - out["ref_logp"]  # (B,)
        return out

    PAIR_METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy", "chosen_logp",
                    "rejected_logp")

    @torch.no_grad()
    def pair_evaluation(self, pairs, indices: list[int]) -> list[dict[str, float]]:
        """DPO's loss and implicit rewards on given preference pairs (held out; `pairs` as
        `load_preference_pairs` gives them, `indices` into them): one dict of PAIR_METRICS per pair,
        each as the training step's metric of that name (TRL's eval_loss, eval_rewards/accuracies, ...).
        Every process of a sharded model must call it with as many pairs."""
        from p3o.rl.losses.dpo import dpo_loss

        device, results = self.accelerator.device, []
        for first in range(0, len(indices), self.sizes.micro_groups):
            chunk = indices[first:first + self.sizes.micro_groups]
            query_ids, query_mask = pad_prompts(self.tokenizer, [pairs.token_ids[i] for i in chunk],
                                                self.max_prompt_length)  # (P, Lq)
            response_ids, response_mask = pad_responses(self.algorithm.given_responses(pairs, chunk),
                                                        self.tokenizer.pad_token_id)  # (2P, T): chosen, rejected
            rollout = Rollout(2, query_ids.repeat_interleave(2, 0).to(device), query_mask.repeat_interleave(2, 0).to(device),
                              response_ids.to(device), response_mask.to(device))
            out = self.log_probs(rollout, {}, old=True)
            logp, ref_logp = out["old_logp"].view(-1, 2).float(), out["ref_logp"].view(-1, 2).float()  # (P, 2)
            for i in range(len(chunk)):  # each pair's own statistics, for their standard errors
                loss, stats = dpo_loss(logp[i:i + 1], ref_logp[i:i + 1], beta=self.cfg.beta)
                results.append({"loss": loss.item(), **stats})
        return results

    def score(self, reward, rows: list[dict], completions: list[str], response_ids, response_mask, k: int,
              logged: bool = True) -> torch.Tensor:
        """Call the reward with the dataset's raw prompts (chat messages stay messages) and columns.
        `logged`: what the reward functions log counts (the rollout's samples; not ReMax's greedy
        responses or the monitor reward, whose log_metric and log_extra do nothing)."""
        column = self.prompts.prompt_column
        prompts = [row[column] for row in rows for _ in range(k)]
        if prompts and not isinstance(prompts[0], str):  # conversational: completions as messages too
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        reserved = {column, "prompts", "completions", "completion_ids", "trl_context"}
        extra = {name: [row.get(name) for row in rows for _ in range(k)] for name in rows[0] if name not in reserved}
        ids = [seq[:n] for seq, n in zip(response_ids.tolist(), response_mask.sum(-1).tolist())]
        return reward(prompts, completions, completion_ids=ids, **extra, trl_context=self.reward_context(logged))

    def reward_context(self, logged: bool = True) -> dict:
        """What TRL passes reward functions besides the data: `trainer_state` (`global_step` the steps
        done, `max_steps` the run's: their ratio is the share of training done, as in TRL), and
        `log_metric(name, value)` (its mean over the step's calls goes to metrics.jsonl) and
        `log_extra(column, values)` (one value per completion, beside them in completions.jsonl)."""
        from p3o.utils.callbacks import trainer_state

        logs = self.reward_logs if logged else {}  # a scratch dict: logged nowhere
        state = trainer_state(self.cfg, self.accelerator, self.state.step)
        return {"trainer_state": state,
                "log_metric": lambda name, value: logs.setdefault(f"metric:{name}", []).append(float(value)),
                "log_extra": lambda column, values: logs.__setitem__(f"extra:{column}", [_plain(v) for v in values])}

    def penalised(self, rewards: torch.Tensor, response_ids, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards less --missing_eos_penalty for each response without an end-of-turn or EOS token,
        before any scaling as in TRL; whether each ended), all (B,) on the CPU."""
        eos = torch.tensor(self.eos_ids or [-1], device=response_ids.device)
        ended = ((response_ids.unsqueeze(-1) == eos).any(-1) & response_mask.bool()).any(-1).cpu()  # (B,)
        if self.cfg.missing_eos_penalty:
            rewards = rewards - self.cfg.missing_eos_penalty * (~ended).double()
        return rewards, ended

    def update(self, rollout: Rollout, step: int) -> dict[str, float]:
        """K epochs over the rollout; each epoch shuffles whole groups into minibatches (or, with
        --update_schedule consecutive, one shuffled pass of K steps on each minibatch)."""
        if self.fuse_old_pass:  # one minibatch of every group: its order cannot change the gradient
            return self.optimizer_step(rollout, fused=True)
        shuffle = generator(self.cfg.seed, "shuffle", step)
        stats = []
        if self.cfg.update_schedule == "consecutive":  # the authors' V1 code: K steps in a row per minibatch
            order = torch.randperm(rollout.num_groups, generator=shuffle)  # (G,)
            for groups in order.split(self.sizes.local_minibatch):
                minibatch = rollout.select(groups)
                stats += [self.optimizer_step(minibatch) for _ in range(self.cfg.epochs)]
            return _combine(stats)
        for _ in range(self.cfg.epochs):
            order = torch.randperm(rollout.num_groups, generator=shuffle)  # (G,)
            for groups in order.split(self.sizes.local_minibatch):
                stats.append(self.optimizer_step(rollout.select(groups)))
        return _combine(stats)

    def optimizer_step(self, minibatch: Rollout, fused: bool = False) -> dict[str, float]:
        """One optimiser step on a minibatch of groups, accumulated over its micro-batches. `fused`:
        the minibatch is the whole rollout, used once, and pi_old is this very forward: the
        algorithm's quantities are prepared from it, and the rollout gets pi_old's log-probs and KL."""
        cfg, acc = self.cfg, self.accelerator
        # DDP averages gradients over processes, so each divides by the processes' mean normaliser:
        # the result is the global sum over the global count (pairs or tokens).
        normaliser = self._mean_across_processes({"n": _normaliser(minibatch, cfg)})["n"]
        parts, group = minibatch.split(self.sizes.micro_groups), self.packed_group(minibatch)

        def part_loss(part: Rollout):
            token_logps, values = token_logprobs_and_values(
                self.policy, part.query_ids, part.query_mask, part.response_ids, part.response_mask,
                self.logprob_temperature, self.logits_to_keep, self.with_values, group)  # (b, T) each
            if fused:  # pi_old (and PPO's V_old) is this very forward: the ratio is 1, its gradient exact
                self.prepare(part, token_logps.detach(), None if values is None else values.detach())
            unit_losses, part_stats = self.algorithm.loss(part, PolicyOutputs(token_logps, values), cfg)  # (g,)
            return aggregate(unit_losses, normaliser), {**part_stats, **part.stats}

        with training_mode(self.policy, cfg.gradient_checkpointing):
            result = accumulate_and_step(acc, self.policy, self.optimizer, self.scheduler, parts, part_loss,
                                         cfg.max_grad_norm)
        stepped, grad_norm, total_loss, stats = result.stepped, result.grad_norm, result.loss, result.extras
        self.state.optimizer_steps += int(stepped)
        count_skip(self.state, stepped, cfg.max_consecutive_skips, self.state.step + 1)
        if fused:  # the parts are copies: pi_old's log-probs and the KL go back to the rollout, for its metrics
            minibatch.update(**{n: torch.cat([getattr(p, n) for p in parts]) for n in ("old_token_logp", "old_logp", "kl")})
        return {"loss": total_loss, "grad_norm": grad_norm, **_combine(stats)}

    # --- what a checkpoint holds of the trainer itself (trainer_state.json) ----------------------

    def state_dict(self) -> dict:
        """The run's counters, beta and the reward scale: with the weights, optimiser, scheduler and
        RNG (`p3o.rl.checkpoint`), everything a resumed run needs to go on as if never stopped."""
        s = self.state
        return {"step": s.step, "optimizer_steps": s.optimizer_steps, "skipped_updates": s.skipped_updates,
                "consecutive_skips": s.consecutive_skips, "kl_control": self.kl_control.state_dict(),
                **({"reward_scale": self.reward_scale.state_dict()} if self.reward_scale is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.state = TrainerState(state["step"], state["optimizer_steps"], state["skipped_updates"],
                                  state["consecutive_skips"])
        self.kl_control.load_state_dict(state["kl_control"])
        if self.reward_scale is not None:
            self.reward_scale.load_state_dict(state["reward_scale"])

    # --- data order and metrics ----------------------------------------------------------------

    def prompt_indices(self, step: int) -> list[int]:
        """This process's prompts for `step`: consecutive slots of an endless stream of seeded
        dataset permutations. Step s takes slots [s*G, (s+1)*G) whatever the number of processes
        (so a run resumes on another number of processes where it stopped); process r the r-th block."""
        n, local = len(self.prompts), self.sizes.local_groups
        first = step * self.sizes.groups_per_step + self.accelerator.process_index * local
        indices = []
        for slot in range(first, first + local):
            epoch, position = divmod(slot, n)
            indices.append(int(self._permutation(epoch)[position]))
        return indices

    def _permutation(self, epoch: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_permutations", {})
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(len(self.prompts), generator=generator(self.cfg.seed, "data", epoch))
        return cache[epoch]

    def step_metrics(self, rollout: Rollout, update_stats: dict[str, float], timings: dict[str, float],
                     seconds: float, lr: float | None = None) -> dict[str, float]:
        """The step's line of metrics.jsonl; `lr` the learning rate its first update applied (default:
        the scheduler's current one)."""
        r = rollout
        # Online DPO scores at temperature 1 what it samples at --temperature: its log-ratio of
        # samples is then no KL, nor its -log pi an entropy, of the distribution sampled; neither is logged.
        sampled_as_scored = self.logprob_temperature == self.cfg.temperature
        local = {
            **({"reward": r.raw_rewards.mean().item(),
                "reward_std": r.raw_rewards.std().item() if len(r.raw_rewards) > 1 else 0.0}
               if r.raw_rewards is not None else {}),
            **({"reward_scale": self.reward_scale.std} if self.reward_scale is not None else {}),
            **({"kl": r.kl.mean().item()} if r.kl is not None and sampled_as_scored else {}),
            **({"monitor_reward": r.monitor_rewards.mean().item()} if r.monitor_rewards is not None else {}),
            "response_length": r.response_mask.sum(-1).float().mean().item(),
            **({"entropy": _entropy(r.old_token_logp, r.response_mask)} if r.old_token_logp is not None
               and sampled_as_scored else {}),
            **r.stats,
            **update_stats,
        }
        for name, (total, count) in r.part_sums.items():  # reduced as sums: a part may apply to none here
            local.update({f"reward_sum/{name}": total, f"reward_count/{name}": count})
        metrics = {"step": self.state.step, **self._mean_across_processes(local)}
        for name in r.part_sums:  # reward/<name>: the mean where it applies (one part too: always there)
            total, count = metrics.pop(f"reward_sum/{name}"), metrics.pop(f"reward_count/{name}")
            if count > 0:
                metrics[f"reward/{name}"] = total / count
        if "monitor_reward" in metrics and "reward" in metrics:  # how far the proxy has drifted from the monitored (gold) reward
            metrics["proxy_gold_gap"] = metrics["reward"] - metrics["monitor_reward"]
        metrics["pairs_per_s"] = rollout.num_groups * self.accelerator.num_processes / seconds  # prompt groups
        metrics["responses_per_s"] = metrics["pairs_per_s"] * rollout.num_generations
        metrics["lr"] = lr if lr is not None else self.scheduler.get_last_lr()[0]
        if self.algorithm.kl_penalty:
            metrics["beta"] = self.kl_control.value  # the penalty this rollout was trained with
        metrics["skipped_updates"] = self.state.skipped_updates
        metrics["step_time"] = seconds
        metrics.update(timings)
        # What reward functions logged (log_metric), by name unless p3o writes that name itself.
        user = self._mean_across_processes(self.logged_metrics)
        metrics.update({name if name not in metrics else f"log_metric/{name}": value for name, value in user.items()})
        return metrics

    def _mean_across_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return values
        names = sorted(values)  # one order on every process (a reward function's log_metric calls may differ)
        stacked = torch.tensor([values[n] for n in names], device=self.accelerator.device, dtype=torch.float64)
        return dict(zip(names, (sum_across_processes(stacked) / self.accelerator.num_processes).tolist()))


def _plain(value):
    """A value a reward function logged, as JSON writes it: numpy and torch scalars as Python ones,
    anything else JSON cannot write as its text."""
    value = value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _entropy(token_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """Per-token entropy of the tempered policy, estimated by the sampled tokens' mean -log pi_old
    (unbiased without top-k/top-p: E_{y~pi}[-log pi(y)] = H(pi); with them the tokens come from the
    truncated distribution); free, since the rollout has those log-probs already."""
    return (-(token_logps * mask).sum() / mask.sum().clamp(min=1)).item()


@contextlib.contextmanager
def training_mode(model, enabled: bool = True):
    """`model.train()` for the block. The policy otherwise stays in eval mode (its dropout is off
    either way): gradient checkpointing acts only in training mode, and `generate` must not see it,
    or it would drop the KV cache."""
    if not enabled or model.training:
        yield
        return
    model.train()
    try:
        yield
    finally:
        model.eval()


def _check_compiler(device: torch.device) -> None:
    """--compile_sampling on a CPU builds C++ kernels: refuse up front, not a rollout in, without a compiler."""
    if device.type == "cpu" and not has_cpp_compiler():
        raise UsageError("--compile_sampling on a CPU needs a C++ compiler (g++ or clang++; or set CXX): "
                         "install one, or drop --compile_sampling")


def _without_float32_outputs(module) -> None:
    """Undo accelerate's mixed-precision wrapper of `module.forward` (autocast, then every output
    copied to float32): the engine enters autocast itself around every forward, and the copy would
    be a float32 (B, T, V) tensor of logits per forward, kept for backward. `selective_log_softmax`
    widens the logits a block at a time instead; values (PPO) widen where they are masked."""
    original = module.__dict__.pop("_original_forward", None)
    if original is not None:
        module.forward = original


def _old_pass_is_redundant(cfg: TrainConfig, sizes, algorithm) -> bool:
    """One optimiser step per rollout, used once: the policy that sampled the rollout is the one the
    training forward runs, so pi_old's log-probs (and PPO's values) are that forward's, detached
    (TRL does the same for log-probs when num_iterations is 1). `prepare` then runs per micro-batch,
    which needs one that reads only each group's own rows, or a single micro-batch per process
    holding its whole share of the rollout: PPO's whitening and P3O's rms normalisation read all of
    it (across processes, which each prepare their one micro-batch in the same forward)."""
    whole_rollout = sizes.micro_groups == sizes.local_groups  # one micro-batch per process
    groupwise = algorithm.groupwise_prepare and cfg.delta_normalization == "none"
    return (cfg.epochs == 1 and sizes.minibatches_per_epoch == 1 and (groupwise or whole_rollout)
            and not algorithm.offline)


def _normaliser(batch: Rollout, cfg: TrainConfig) -> float:
    """group-mean divides by the minibatch's prompt groups (pairs for P3O), token-mean by its response tokens."""
    if cfg.loss_aggregation == "token-mean":
        return float(batch.response_mask.sum())
    return float(batch.num_groups)


def _combine(stats: list[dict[str, float]]) -> dict[str, float]:
    """Average each statistic over minibatches (or micro-batches); `*_max` ones take the maximum."""
    names = stats[0].keys() if stats else []
    return {n: (max if n.endswith("_max") else _mean)([s[n] for s in stats]) for n in names}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _check_vocabulary(tokenizer, model) -> None:
    """A tokenizer with ids beyond the embedding table would crash deep inside the forward pass."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table only {rows}; "
                         "use the tokenizer the model was trained with (--tokenizer_name_or_path)")
