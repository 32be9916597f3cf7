"""Algorithms on the shared engine: each is its own loss plus a small adapter, registered by name.

An algorithm says how many responses it takes per prompt, what it derives from a scored rollout
(`prepare`: P3O's Delta per pair, RLOO's leave-one-out advantages, PPO's GAE ...) and how a
micro-batch of whole groups becomes per-group losses (`loss`, over the registered pure loss). The
engine divides the summed group losses by the minibatch's groups (group-mean) or response tokens
(token-mean). A few flags ask the engine for the extra pieces some algorithms need: a value head
(PPO), a greedy response per prompt (ReMax), responses read from preference data (offline DPO).

Shape legend as in `p3o.rl.rollout`: G prompts (groups), k responses each, B = G*k, T response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from p3o.errors import UsageError
from p3o.rl import advantages as adv
from p3o.rl.losses import get_loss
from p3o.rl.rollout import Rollout, sequence_logprobs
from p3o.utils.distributed import sum_across_processes
from p3o.utils.ops import masked_mean


@dataclass
class Prepared:
    """What `prepare` adds to a rollout: per-sequence tensors (B, ...), per-group tensors (G, ...),
    and statistics to log."""

    seq: dict[str, torch.Tensor] = field(default_factory=dict)
    group: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Algorithm:
    name: str
    prepare: Callable[[Rollout, object, float], Prepared]  # (rollout, cfg, beta) -> Prepared
    loss: Callable[[Rollout, dict, object], tuple[torch.Tensor, dict[str, float]]]  # -> (G',) losses, stats
    samples: tuple[int, int | None] = (2, 2)  # allowed responses per prompt (min, max); None: no maximum
    defaults: dict = field(default_factory=dict)  # TrainConfig fields it sets when left unset
    value_head: bool = False  # PPO: the trained module carries a critic head
    greedy_baseline: bool = False  # ReMax: a greedy response per prompt is scored as the baseline
    from_dataset: bool = False  # offline DPO: responses are the dataset's chosen/rejected, not sampled
    kl_penalty: bool = True  # beta penalises KL in the reward (False: DPO's beta is beta_dpo)
    groupwise_prepare: bool = True  # `prepare` reads only each group's own rows (so it can run per micro-batch)


ALGORITHMS: dict[str, Algorithm] = {}
# Settings every algorithm gets unless its own `defaults` say otherwise.
BASE_DEFAULTS = {"beta": 0.05, "epochs": 4, "loss_aggregation": "group-mean"}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is registered twice")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise UsageError(f"unknown --algo {name!r}; known algorithms: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def default_setting(algorithm: Algorithm, name: str):
    if name == "num_generations":
        return algorithm.defaults.get(name, algorithm.samples[0])
    return algorithm.defaults.get(name, BASE_DEFAULTS[name])


def _seq_logps(batch: Rollout, outputs: dict) -> torch.Tensor:
    return sequence_logprobs(outputs["token_logps"], batch.seq["response_mask"])  # (B,)


def per_group(losses: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sequence losses (B,) -> per-group losses (G,), the mean over each group's k responses."""
    return losses.view(-1, k).mean(-1)


def per_group_tokens(losses: torch.Tensor, mask: torch.Tensor, k: int, cfg) -> torch.Tensor:
    """Per-token losses (B, T) -> per-group losses (G,). token-mean: the group's summed token losses
    (the engine divides by the minibatch's tokens); group-mean: each response's mean over its tokens,
    averaged over the group."""
    if cfg.loss_aggregation == "token-mean":
        return losses.sum(-1).view(-1, k).sum(-1)
    return per_group(masked_mean(losses, mask, dim=-1), k)


# --- P3O: pairs, Delta per pair, a pairwise loss (docs/p3o.md sections 2-4) -------------------------

def pair_delta(rollout: Rollout, cfg, beta: float) -> Prepared:
    """Delta = (r1 - r2) - beta * (kl1 - kl2), the reward difference taken first (docs/p3o.md section 2).

    Raw rewards arrive in float64 and their difference is taken before anything else touches them,
    so a per-prompt reward shift cancels exactly; only Delta is ever scaled or clipped.
    """
    rewards = rollout.seq["rewards"].view(-1, 2)  # (P, 2) float64
    kl = rollout.seq["kl"].view(-1, 2)  # (P, 2)
    reward_diff = (rewards[:, 0] - rewards[:, 1]).to(kl.dtype).to(kl.device)  # (P,) exact, then float32
    delta = reward_diff - beta * (kl[:, 0] - kl[:, 1])  # (P,)
    if cfg.delta_normalization == "rms":  # over the whole rollout, on every process
        count = torch.tensor(float(len(delta)), dtype=delta.dtype, device=delta.device)
        squares = sum_across_processes(torch.stack([delta.pow(2).sum(), count]))
        delta = delta / (squares[0] / squares[1]).sqrt().clamp(min=1e-8)
    if cfg.delta_clip is not None:
        delta = delta.clamp(-cfg.delta_clip, cfg.delta_clip)
    return Prepared(group={"delta": delta}, stats={"delta_abs": delta.abs().mean().item()})


def pairwise_loss(loss_name: str) -> Callable:
    """Adapter: a micro-batch of pairs and its token log-probs -> the registered pair loss (P,)."""
    loss_fn = get_loss(loss_name)

    def loss(batch: Rollout, outputs: dict, cfg):
        logp = _seq_logps(batch, outputs).view(-1, 2)  # (P, 2)
        old_logp = batch.seq["old_logp"].view(-1, 2)  # (P, 2)
        return loss_fn(logp, old_logp, batch.group["delta"], clip_eps=cfg.clip_eps, is_clamp=cfg.importance_clamp)

    return loss


for _name in ("p3o-v1", "p3o-v2"):  # separate / joint clipping
    register_algorithm(Algorithm(_name, pair_delta, pairwise_loss(_name)))


# --- RLOO, GRPO, ReMax: one advantage per response, a clipped sequence or token loss -----------

def group_advantages(estimator: str) -> Callable:
    """prepare: per-response advantages (B,) from the group's rewards and KLs, by a registered
    estimator of `p3o.rl.advantages` (rloo, grpo, remax)."""
    estimate = adv.get_estimator(estimator)

    def prepare(rollout: Rollout, cfg, beta: float) -> Prepared:
        k = rollout.group_size
        rewards = rollout.seq["rewards"].view(-1, k)  # (G, k) float64 on the CPU
        kl = rollout.seq["kl"].view(-1, k).cpu()  # (G, k)
        advantages = estimate(rewards, kl, beta, rollout.group, cfg)  # (G, k)
        advantages = advantages.flatten().to(rollout.seq["kl"].device)  # (B,)
        return Prepared(seq={"advantages": advantages}, stats={"advantage_abs": advantages.abs().mean().item()})

    return prepare


def sequence_clip_loss(batch: Rollout, outputs: dict, cfg):
    losses, stats = get_loss("sequence-clip")(_seq_logps(batch, outputs), batch.seq["old_logp"],
                                             batch.seq["advantages"], clip_eps=cfg.clip_eps)  # (B,)
    return per_group(losses, batch.group_size), stats


def token_clip_loss(batch: Rollout, outputs: dict, cfg):
    mask = batch.seq["response_mask"]
    advantages = batch.seq["advantages"][:, None].expand_as(outputs["token_logps"])  # (B, T) one per response
    losses, stats = get_loss("token-clip")(outputs["token_logps"], batch.seq["old_token_logp"], advantages, mask,
                                          clip_eps=cfg.clip_eps)  # (B, T)
    return per_group_tokens(losses, mask, batch.group_size, cfg), stats


register_algorithm(Algorithm("rloo", group_advantages("rloo"), sequence_clip_loss, samples=(2, None)))
register_algorithm(Algorithm("grpo", group_advantages("grpo"), token_clip_loss, samples=(2, None),
                             defaults={"num_generations": 4}))
register_algorithm(Algorithm("remax", group_advantages("remax"), sequence_clip_loss, samples=(1, None),
                             greedy_baseline=True))


# --- PPO with a critic (docs/p3o.md section 5) -----------------------------------------------------

def ppo_advantages(rollout: Rollout, cfg, beta: float) -> Prepared:
    """Per-token KL penalty plus the score on the last token; GAE; advantages whitened over the
    rollout (all processes' share of it)."""
    seq = rollout.seq
    mask, values = seq["response_mask"], seq["old_values"]
    scores = seq["rewards"].to(values.device)  # (B,) float64 -> the per-token rewards' dtype
    rewards = adv.token_rewards(scores, seq["old_token_logp"], seq["ref_token_logp"], mask, beta)  # (B, T)
    advantages, returns = adv.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T) each
    returns_var = masked_mean((returns - masked_mean(returns, mask)).pow(2), mask)
    explained = 1 - masked_mean((returns - values).pow(2), mask) / returns_var.clamp(min=1e-8)
    stats = {"value_mean": masked_mean(values, mask).item(), "return_mean": masked_mean(returns, mask).item(),
             "explained_variance": explained.item()}
    whitened = adv.whiten(advantages, mask, total=sum_across_processes)  # over the global rollout
    return Prepared(seq={"advantages": whitened, "returns": returns}, stats=stats)


def ppo_loss(batch: Rollout, outputs: dict, cfg):
    seq, mask = batch.seq, batch.seq["response_mask"]
    losses, stats = get_loss("ppo")(outputs["token_logps"], seq["old_token_logp"], seq["advantages"], mask,
                                    outputs["values"], seq["old_values"], seq["returns"], clip_eps=cfg.clip_eps,
                                    value_clip=cfg.value_clip_eps, vf_coef=cfg.vf_coef)  # (B, T)
    return per_group_tokens(losses, mask, batch.group_size, cfg), stats


register_algorithm(Algorithm("ppo", ppo_advantages, ppo_loss, samples=(1, None), value_head=True,
                             groupwise_prepare=False, defaults={"loss_aggregation": "token-mean"}))


# --- DPO, offline on preference data and online on the policy's own pairs ----------------------

def online_preferences(rollout: Rollout, cfg, beta: float) -> Prepared:
    """+1 where y1 scored higher, -1 where y2 did, 0 for a tie (which then carries no loss)."""
    rewards = rollout.seq["rewards"].view(-1, 2)  # (P, 2) float64
    preference = torch.sign(rewards[:, 0] - rewards[:, 1]).float().to(rollout.seq["kl"].device)  # (P,)
    return Prepared(group={"preference": preference}, stats={"tie_fraction": (preference == 0).float().mean().item()})


def dataset_preferences(rollout: Rollout, cfg, beta: float) -> Prepared:
    """Offline pairs are stored (chosen, rejected): y1 is always preferred."""
    return Prepared(group={"preference": torch.ones(rollout.num_groups, device=rollout.seq["ref_logp"].device)})


def dpo_loss(batch: Rollout, outputs: dict, cfg):
    logp = _seq_logps(batch, outputs).view(-1, 2)  # (P, 2)
    ref_logp = batch.seq["ref_logp"].view(-1, 2)  # (P, 2)
    preference = batch.group["preference"]  # (P,)
    swap = (preference < 0)[:, None]  # put the preferred response first
    logp, ref_logp = torch.where(swap, logp.flip(-1), logp), torch.where(swap, ref_logp.flip(-1), ref_logp)
    return get_loss("dpo")(logp, ref_logp, preference.abs(), beta=cfg.beta)


# One pass per batch by default: DPO has no importance weights for reusing the policy's own samples.
_dpo_defaults = {"beta": 0.1, "epochs": 1}
register_algorithm(Algorithm("dpo", dataset_preferences, dpo_loss, defaults=_dpo_defaults,
                             from_dataset=True, kl_penalty=False))
register_algorithm(Algorithm("online-dpo", online_preferences, dpo_loss, defaults=_dpo_defaults,
                             kl_penalty=False))
