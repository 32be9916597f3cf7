"""The shared rollout/update engine on `accelerate`, as in the algorithm box of docs/p3o.md section 4:

    repeat:  1. take a batch of prompts       2. sample k responses per prompt from pi_old
             3. score each response           4. log-probs under pi_old and pi_ref, KL per response
             5. the algorithm's own quantities (P3O: Delta per pair; RLOO: advantages; PPO: GAE)
             for each of K epochs: shuffle the groups (never split one), and per minibatch of
             groups take one optimiser step on the algorithm's loss

Only the algorithm's `prepare` and `loss` differ between algorithms, plus three pieces the engine
adds when an algorithm asks: a value head (PPO), a greedy response per prompt (ReMax) and responses
read from preference data instead of sampled (offline DPO). beta comes from a KL controller.
Shape legend as in `p3o.rl.rollout`: G prompts, k responses each, B = G*k, T response tokens.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch

from p3o.errors import UsageError
from p3o.models.attention import float32_attention_backward_on_cpu
from p3o.models.loading import disable_dropout, eos_token_ids
from p3o.models.lora import AdaptersDisabled, add_lora, hold_frozen_base_in, is_lora
from p3o.models.value_head import PolicyWithValueHead
from p3o.rl.algorithms import get_algorithm
from p3o.rl.config import TrainConfig, derive_sizes
from p3o.rl.kl_control import KLController
from p3o.rl.losses import aggregate
from p3o.rl.rollout import (
    Rollout,
    batched_logprobs_and_values,
    decode_completions,
    generation_config,
    pad_prompts,
    pad_responses,
    prompt_budget,
    sample_responses,
    sequence_logprobs,
    shares_prompt_forward,
    supports_logits_to_keep,
    token_logprobs_and_values,
)
from p3o.utils.distributed import (
    backward,
    check_supported,
    clip_and_step,
    configure_for_updates,
    gathered,
    is_deepspeed,
    is_sharded,
    make_accelerator,
    micro_batch,
    sum_across_processes,
)
from p3o.utils.seeding import generator, seed_global_rng


@dataclass
class TrainerState:
    step: int = 0  # rollout-and-update iterations done
    optimizer_steps: int = 0
    skipped_updates: int = 0  # optimiser steps dropped for a non-finite gradient
    consecutive_skips: int = 0  # of them, the ones since the last good optimiser step


class NonFiniteTraining(UsageError):
    """Too many updates in a row were skipped for NaN/inf: training has diverged."""

    def __init__(self, skips: int, step: int):
        super().__init__(f"{skips} optimiser steps in a row had a non-finite loss or gradient (step {step}); training "
                         "has diverged. Lower --learning_rate or check the reward for huge values, then resume from "
                         "the last good checkpoint with --resume (or start again)")


@dataclass
class RolloutTexts:
    prompts: list  # (G,) raw prompts as in the dataset
    completions: list[str]  # (B,)
    rewards: list[float] | None  # (B,); None when nothing was scored (offline DPO)


class Trainer:
    """Trains `policy` against `reward` on `prompts`. One instance per run; `train()` runs it."""

    def __init__(self, cfg: TrainConfig, policy, tokenizer, reward, prompts, ref_policy=None, accelerator=None,
                 monitor_reward=None, eval_prompts=None):
        self.cfg, self.tokenizer, self.reward, self.prompts = cfg, tokenizer, reward, prompts
        self.eval_prompts = eval_prompts  # held-out prompts (a PromptDataset) for `p3o.rl.train.HeldOutEvaluator`
        self.monitor_reward = monitor_reward  # scored and logged, never trained on
        self.algorithm = get_algorithm(cfg.algo)
        self.accelerator = accelerator or make_accelerator(mixed_precision=cfg.mixed_precision)
        check_supported(self.accelerator)
        self.sharded = is_sharded(self.accelerator)  # FSDP2, ZeRO-3: every forward is a collective
        if (self.sharded or is_deepspeed(self.accelerator)) and (cfg.use_peft or cfg.generation_backend == "vllm"):
            raise UsageError("--use_peft and --generation_backend vllm are not supported under FSDP or DeepSpeed yet; "
                             "launch with configs/accelerate/ddp.yaml")
        self.sizes = derive_sizes(cfg, self.accelerator.num_processes)
        configure_for_updates(self.accelerator, self.sizes.micro_pairs * self.sizes.samples_per_prompt, cfg.max_grad_norm)
        self.state = TrainerState()
        self.kl_control = KLController(cfg.beta, cfg.kl_target, cfg.kl_horizon)
        if self.algorithm.from_dataset and getattr(prompts, "responses", None) is None:
            raise UsageError(f"--algo {cfg.algo} needs preference data (prompt, chosen, rejected)")

        if cfg.use_peft:
            policy = add_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules)
        if cfg.mixed_precision == "bf16" and self.accelerator.device.type == "cpu":  # bf16 flash backward is slow there
            float32_attention_backward_on_cpu()
        disable_dropout(policy)  # log-ratios must be exact: rho is 1 at the first update
        self.ref_policy = self._reference(policy, ref_policy)
        if cfg.gradient_checkpointing:  # acts in the training forward only (see `optimizer_step`)
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PolicyWithValueHead(policy) if self.algorithm.value_head else policy  # PPO: critic on the trunk
        if cfg.mixed_precision == "bf16" and ref_policy is None and is_lora(policy):  # weights never re-cast
            hold_frozen_base_in(policy, torch.bfloat16)  # after the value head, which takes the head's dtype
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        self.policy, self.optimizer = self.accelerator.prepare(model, optimizer)  # the trained module
        if not (self.sharded or is_deepspeed(self.accelerator)):  # every forward runs under `accelerator.autocast()`
            _without_float32_outputs(self.trained_module)
        if self.sharded:  # FSDP2 sets itself up in the root's first forward; generation calls PPO's inner model first
            with torch.no_grad():
                self.policy(input_ids=torch.ones(1, 1, dtype=torch.long, device=self.accelerator.device))
        self.scheduler = _scheduler(cfg, self.optimizer, self.sizes.optimizer_steps)

        unwrapped = self.unwrapped_policy
        _check_vocabulary(tokenizer, unwrapped)
        self.eos_ids = eos_token_ids(tokenizer, unwrapped)
        self.gen_config = generation_config(cfg, tokenizer, self.eos_ids)
        self.greedy_config = generation_config(cfg, tokenizer, self.eos_ids, greedy=True)
        self.max_prompt_length = prompt_budget(unwrapped.config, cfg.max_new_tokens, cfg.max_prompt_length)
        self.logits_to_keep = supports_logits_to_keep(unwrapped)
        self.long_prompts = sum(len(ids) > self.max_prompt_length for ids in prompts.token_ids)
        self.fuse_old_pass = _old_pass_is_redundant(cfg, self.sizes, self.algorithm)
        # Pairs (P3O, DPO, RLOO k=2) run their shared prompt once in every forward pass.
        packed = self.max_prompt_length + 2 * cfg.max_new_tokens  # the longest [prompt, y1, y2]
        self.pairs_share_prompt = (self.sizes.samples_per_prompt == 2 and not self.algorithm.value_head
                                   and self.logits_to_keep and shares_prompt_forward(unwrapped, packed)
                                   and shares_prompt_forward(self.ref_policy, packed))
        self.vllm = None
        if cfg.generation_backend == "vllm" and not self.algorithm.from_dataset:
            from p3o.rl.vllm_backend import VLLMGenerator

            self.vllm = VLLMGenerator(cfg, cfg.model_name_or_path, self.eos_ids,
                                      self.max_prompt_length + cfg.max_new_tokens, self.accelerator)

    def _reference(self, policy, given):
        """The frozen reference: `given`, else the initial policy; under LoRA that is the policy itself
        with its adapters off (no second copy of the weights)."""
        if given is None and is_lora(policy):
            return AdaptersDisabled(policy)
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
        return module.policy if isinstance(module, PolicyWithValueHead) else module

    # --- the loop ----------------------------------------------------------------------------

    def train(self, on_step=None) -> list[dict]:
        """Run until `max_steps`; `on_step(metrics, texts)` is called after every step (logging,
        checkpoints, callbacks) and ends the run early by returning True."""
        history = []
        while self.state.step < self.cfg.max_steps:
            start = time.perf_counter()
            rollout, texts, timings = self.collect_rollout(self.state.step)
            t0 = time.perf_counter()
            update_stats = self.update(rollout, self.state.step)
            timings["time_update"] = time.perf_counter() - t0
            self.state.step += 1
            metrics = self.step_metrics(rollout, update_stats, timings, time.perf_counter() - start)
            if "kl" in metrics:  # beta for the next rollout
                self.kl_control.update(metrics["kl"], rollout.num_groups * rollout.group_size * self.accelerator.num_processes)
            history.append(metrics)
            if on_step is not None and on_step(metrics, texts):
                break
        return history

    def collect_rollout(self, step: int) -> tuple[Rollout, RolloutTexts, dict[str, float]]:
        k, timings = self.sizes.samples_per_prompt, {}
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
        if self.algorithm.from_dataset:
            given = [ids for i in indices for ids in self.prompts.responses[i]]  # chosen, rejected per prompt
            response_ids, response_mask = (t.to(device) for t in pad_responses(given, self.tokenizer.pad_token_id))
        else:
            if self.vllm is not None:  # it samples from pi_old: the policy as it is now
                self.vllm.sync_weights(self.unwrapped_policy)
            response_ids, response_mask = self.generate(query_ids, query_mask, self.gen_config,
                                                        f"sample/{self.accelerator.process_index}", step, k)  # (B, T)
        timings["time_generate"] = time.perf_counter() - t0

        # 3. Score: raw rewards (B,) in float64, checked for count and finiteness.
        t0 = time.perf_counter()
        completions = decode_completions(self.tokenizer, query_ids, query_mask, response_ids, response_mask)
        seq = {"query_ids": query_ids, "query_mask": query_mask, "response_ids": response_ids,
               "response_mask": response_mask}
        part_means = {}
        if not self.algorithm.from_dataset:
            seq["rewards"] = self.score(self.reward, rows, completions, response_ids, response_mask, k)  # stays on the CPU
            parts = getattr(self.reward, "last_parts", {})
            if len(parts) > 1:  # several rewards: each part's mean beside their weighted sum
                part_means = {f"reward/{name}": values.mean().item() for name, values in parts.items()}
        timings["time_score"] = time.perf_counter() - t0

        # 4. Log-probs under pi_old (with values for PPO) and pi_ref; kl(y) = l_old(y) - l_ref(y) (docs/p3o.md section 3).
        #    When the rollout is used once on-policy, pi_old's come from the training forward instead.
        seq.update(self.log_probs(seq, timings, old=not (self.algorithm.from_dataset or self.fuse_old_pass)))

        # 5. The algorithm's own quantities (P3O: Delta per pair), from the rollout and beta.
        rollout = Rollout(k, seq, stats=part_means)
        if self.algorithm.greedy_baseline:
            t0 = time.perf_counter()
            rollout.group.update(self.greedy_baseline(rows, query_ids[::k], query_mask[::k], step))
            timings["time_baseline"] = time.perf_counter() - t0
        if not self.fuse_old_pass:
            self.prepare(rollout)
        if self.monitor_reward is not None and "rewards" in seq:  # after `prepare`, which never sees it
            seq["monitor_rewards"] = self.score(self.monitor_reward, rows, completions, response_ids, response_mask, k)
        rewards = seq["rewards"].tolist() if "rewards" in seq else None
        texts = RolloutTexts([r[self.prompts.prompt_column] for r in rows], completions, rewards)
        return rollout, texts, timings

    def prepare(self, rollout: Rollout, old_token_logp: torch.Tensor | None = None) -> None:
        """Add the algorithm's quantities to `rollout` in place. `old_token_logp` (B, T): pi_old's
        token log-probs taken from the training forward (fused pass), with the KL they give."""
        seq = rollout.seq
        if old_token_logp is not None:
            seq["old_token_logp"] = old_token_logp
            seq["old_logp"] = sequence_logprobs(old_token_logp, seq["response_mask"])  # (B,)
            seq["kl"] = seq["old_logp"] - seq["ref_logp"]  # (B,)
        prepared = self.algorithm.prepare(rollout, self.cfg, self.kl_control.value)
        seq.update(prepared.seq)
        rollout.group.update(prepared.group)
        rollout.stats.update(prepared.stats)

    def generate(self, query_ids, query_mask, gen_config, stream: str, step: int, k: int = 1):
        """(B, Lq) prompts, each repeated k times in consecutive rows -> response ids and mask (B, T)."""
        if self.vllm is not None:
            return self.vllm.sample(query_ids, query_mask, k, stream, step, greedy=not gen_config.do_sample)
        seed_global_rng(self.cfg.seed, stream, step)
        with self.accelerator.autocast(), gathered(self.trained_module):
            return sample_responses(self.unwrapped_policy, query_ids, query_mask, gen_config, self.eos_ids,
                                    synced=self.sharded)

    def log_probs(self, seq: dict, timings: dict, old: bool = True, paired: bool = True) -> dict[str, torch.Tensor]:
        """Token and sequence log-probs under pi_ref and (if `old`) pi_old, the latter with the
        values of PPO's head; the KL per response when both are there. `paired`: `seq` is the
        rollout's groups (not ReMax's one greedy response per prompt)."""
        cfg, out = self.cfg, {}
        batch = self.sizes.micro_pairs * self.sizes.samples_per_prompt  # sequences per no-grad forward, as in the update
        paired = paired and self.pairs_share_prompt
        with self.accelerator.autocast():
            if old:
                t0 = time.perf_counter()
                out["old_token_logp"], values = batched_logprobs_and_values(
                    self.trained_module, seq, cfg.temperature, batch, self.logits_to_keep, self.algorithm.value_head,
                    paired)
                if values is not None:
                    out["old_values"] = values  # (B, T)
                out["old_logp"] = sequence_logprobs(out["old_token_logp"], seq["response_mask"])  # (B,)
                timings["time_old_logprobs"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out["ref_token_logp"], _ = batched_logprobs_and_values(self.ref_policy, seq, cfg.temperature, batch,
                                                                   self.logits_to_keep, paired=paired)
            timings["time_reference"] = time.perf_counter() - t0
        out["ref_logp"] = sequence_logprobs(out["ref_token_logp"], seq["response_mask"])  # (B,)
        if old:
            out["kl"] = out["old_logp"] - out["ref_logp"]  # (B,)
        return out

    def greedy_baseline(self, rows: list[dict], query_ids, query_mask, step: int) -> dict[str, torch.Tensor]:
        """ReMax: each prompt's greedy response, scored and with its KL: (G,) rewards and kl."""
        response_ids, response_mask = self.generate(query_ids, query_mask, self.greedy_config, "greedy", step)
        completions = decode_completions(self.tokenizer, query_ids, query_mask, response_ids, response_mask)
        rewards = self.score(self.reward, rows, completions, response_ids, response_mask, 1)  # (G,)
        seq = {"query_ids": query_ids, "query_mask": query_mask, "response_ids": response_ids,
               "response_mask": response_mask}
        kl = self.log_probs(seq, {}, paired=False)["kl"]  # (G,)
        return {"baseline_rewards": rewards, "baseline_kl": kl}

    def score(self, reward, rows: list[dict], completions: list[str], response_ids, response_mask, k: int) -> torch.Tensor:
        """Call the reward with the dataset's raw prompts (chat messages stay messages) and columns."""
        column = self.prompts.prompt_column
        prompts = [row[column] for row in rows for _ in range(k)]
        if prompts and not isinstance(prompts[0], str):  # conversational: completions as messages too
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        reserved = {column, "prompts", "completions", "completion_ids"}
        extra = {name: [row.get(name) for row in rows for _ in range(k)] for name in rows[0] if name not in reserved}
        ids = [seq[:n] for seq, n in zip(response_ids.tolist(), response_mask.sum(-1).tolist())]
        return reward(prompts, completions, completion_ids=ids, **extra)

    def update(self, rollout: Rollout, step: int) -> dict[str, float]:
        """K epochs over the rollout; each epoch shuffles whole groups into minibatches."""
        if self.fuse_old_pass:  # one minibatch of every group: its order cannot change the gradient
            return self.optimizer_step(rollout, fused=True)
        shuffle = generator(self.cfg.seed, "shuffle", step)
        stats = []
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
        parts, stats, total_loss = minibatch.split(self.sizes.micro_pairs), [], 0.0
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            with micro_batch(acc, self.policy, last), training_mode(self.policy, cfg.gradient_checkpointing):
                with acc.autocast():
                    token_logps, values = token_logprobs_and_values(
                        self.policy, part.seq["query_ids"], part.seq["query_mask"], part.seq["response_ids"],
                        part.seq["response_mask"], cfg.temperature, self.logits_to_keep,
                        self.algorithm.value_head, self.pairs_share_prompt)  # (b, T) each
                    if fused:  # pi_old is this very forward: the ratio is 1, its gradient exact
                        self.prepare(part, old_token_logp=token_logps.detach())
                    unit_losses, part_stats = self.algorithm.loss(part, {"token_logps": token_logps, "values": values},
                                                                  cfg)
                    loss = aggregate(unit_losses, normaliser)
                backward(acc, self.policy, loss, last)
            total_loss += loss.item()
            stats.append({**part_stats, **part.stats})
        grad_norm, stepped = clip_and_step(acc, self.policy, self.optimizer, self.scheduler, cfg.max_grad_norm,
                                           math.isfinite(total_loss))
        if stepped:
            self.state.optimizer_steps += 1
            self.state.consecutive_skips = 0
        else:
            self.state.skipped_updates += 1
            self.state.consecutive_skips += 1
            if self.state.consecutive_skips >= self.cfg.max_consecutive_skips:
                raise NonFiniteTraining(self.state.consecutive_skips, self.state.step + 1)
        if fused:  # the parts are copies: pi_old's log-probs and the KL go back to the rollout, for its metrics
            minibatch.seq.update({n: torch.cat([p.seq[n] for p in parts]) for n in ("old_token_logp", "old_logp", "kl")})
        return {"loss": total_loss, "grad_norm": grad_norm, **_combine(stats)}

    # --- data order and metrics ----------------------------------------------------------------

    def prompt_indices(self, step: int) -> list[int]:
        """This process's prompts for `step`: consecutive slots of an endless stream of seeded
        dataset permutations. Step s takes slots [s*G, (s+1)*G) whatever the number of processes
        (so a run resumes on another number of processes where it stopped); process r the r-th block."""
        n, local = len(self.prompts), self.sizes.local_pairs
        first = step * self.sizes.pairs_per_step + self.accelerator.process_index * local
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
                     seconds: float) -> dict[str, float]:
        seq = rollout.seq
        local = {
            **({"reward": seq["rewards"].mean().item(),
                "reward_std": seq["rewards"].std().item() if len(seq["rewards"]) > 1 else 0.0} if "rewards" in seq else {}),
            **({"kl": seq["kl"].mean().item()} if "kl" in seq else {}),
            **({"monitor_reward": seq["monitor_rewards"].mean().item()} if "monitor_rewards" in seq else {}),
            **({"baseline_reward": rollout.group["baseline_rewards"].mean().item()}
               if "baseline_rewards" in rollout.group else {}),
            "response_length": seq["response_mask"].sum(-1).float().mean().item(),
            **({"entropy": _entropy(seq["old_token_logp"], seq["response_mask"])} if "old_token_logp" in seq else {}),
            **rollout.stats,
            **update_stats,
        }
        metrics = {"step": self.state.step, **self._mean_across_processes(local)}
        if "monitor_reward" in metrics and "reward" in metrics:  # how far the proxy has drifted from the monitored (gold) reward
            metrics["proxy_gold_gap"] = metrics["reward"] - metrics["monitor_reward"]
        metrics["pairs_per_s"] = rollout.num_groups * self.accelerator.num_processes / seconds  # prompt groups
        metrics["responses_per_s"] = metrics["pairs_per_s"] * rollout.group_size
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if self.algorithm.kl_penalty:
            metrics["beta"] = self.kl_control.value  # the penalty this rollout was trained with
        metrics["skipped_updates"] = self.state.skipped_updates
        metrics["step_time"] = seconds
        metrics.update(timings)
        return metrics

    def _mean_across_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return values
        stacked = torch.tensor(list(values.values()), device=self.accelerator.device, dtype=torch.float64)
        return dict(zip(values, (sum_across_processes(stacked) / self.accelerator.num_processes).tolist()))


def _entropy(token_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """Per-token entropy of the sampling policy, estimated by the sampled tokens' mean -log pi_old
    (unbiased: E_{y~pi}[-log pi(y)] = H(pi)); free, since the rollout has those log-probs already."""
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
    training forward runs, so pi_old's log-probs are that forward's, detached (TRL does the same
    when num_iterations is 1). `prepare` then runs per micro-batch, which needs one that reads only
    each group's own rows: not PPO's (whitening over the rollout) nor P3O's rms normalisation."""
    return (cfg.epochs == 1 and sizes.minibatches_per_epoch == 1 and algorithm.groupwise_prepare
            and not algorithm.from_dataset and cfg.delta_normalization == "none")


def _normaliser(batch: Rollout, cfg: TrainConfig) -> float:
    """group-mean divides by the minibatch's prompt groups (pairs for P3O), token-mean by its response tokens."""
    if cfg.loss_aggregation == "token-mean":
        return float(batch.seq["response_mask"].sum())
    return float(batch.num_groups)


def _combine(stats: list[dict[str, float]]) -> dict[str, float]:
    """Average each statistic over minibatches (or micro-batches); `*_max` ones take the maximum."""
    names = stats[0].keys() if stats else []
    return {n: (max if n.endswith("_max") else _mean)([s[n] for s in stats]) for n in names}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm gains are left alone (as `transformers.Trainer` does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    try:
        return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    except ValueError as exc:
        raise UsageError(f"--lr_scheduler_type {cfg.lr_scheduler_type!r}: {exc}") from None


def _check_vocabulary(tokenizer, model) -> None:
    """A tokenizer with ids beyond the embedding table would crash deep inside the forward pass."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table only {rows}; "
                         "use the tokenizer the model was trained with (--tokenizer_name_or_path)")
