"""Algorithms on the shared engine: each is its own loss plus a small adapter, registered by name.

An algorithm says how many responses it takes per prompt, what it derives from a scored rollout
(`prepare`: P3O's Delta per pair, RLOO's leave-one-out advantages, PPO's GAE ...) and how a
micro-batch of whole groups becomes per-group losses (`loss`, over the pure loss functions of
`p3o.rl.losses`). Every `loss` has one signature, `(batch: Rollout, out: PolicyOutputs, cfg) ->
((G',) losses, stats)`. The engine divides the summed group losses by the minibatch's groups
(group-mean) or response tokens (token-mean).

Hooks give the engine the pieces only some algorithms need, without the engine knowing which:
`wrap_policy` (PPO adds a critic head), `given_responses` (offline DPO reads its pairs from the
data instead of sampling) and `extend_rollout` (ReMax scores a greedy response per prompt).
`examples/custom_algorithm.py` registers one from outside the package.

Shape legend as in `p3o.rl.rollout`: G prompts (groups), k responses each, B = G*k, T response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from p3o.errors import UsageError
from p3o.models.value_head import PolicyWithValueHead
from p3o.rl import advantages as adv
from p3o.rl.losses import dpo, p3o, policy_gradient as pg
from p3o.rl.rollout import PolicyOutputs, Rollout, sequence_logprobs
from p3o.utils.distributed import sum_across_processes
from p3o.utils.ops import masked_mean
from p3o.utils.registry import Registry


@dataclass
class Prepared:
    """What `prepare` adds to a rollout: Rollout fields by name (`delta`, `advantages` ...) and
    statistics to log."""

    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


Prepare = Callable[[Rollout, object, float], Prepared]  # (rollout, cfg, beta) -> Prepared
Loss = Callable[[Rollout, PolicyOutputs, object], tuple[torch.Tensor, dict[str, float]]]  # -> (G',) losses, stats


@dataclass(frozen=True)
class Algorithm:
    name: str
    prepare: Prepare
    loss: Loss
    samples: tuple[int, int | None] = (2, 2)  # allowed responses per prompt (min, max); None: no maximum
    defaults: dict = field(default_factory=dict)  # P3OConfig fields it sets when left unset
    # Hooks, None where the engine's default does: see the module docstring.
    wrap_policy: Callable | None = None  # (policy) -> the trained module, holding the policy as `.policy`; one
    #   whose `returns_values` is True returns (outputs, values (B, L)), which `PolicyOutputs.values` carries
    given_responses: Callable | None = None  # (prompts, indices (G,)) -> B token lists, k per prompt, unscored
    extend_rollout: Callable | None = None  # (engine, rollout, rows, step) -> Rollout fields to set, after scoring
    # Facts about the algorithm's maths that the engine and the config read.
    kl_penalty: bool = True  # beta penalises KL in the reward (False: DPO's beta is beta_dpo)
    groupwise_prepare: bool = True  # `prepare` reads only each group's own rows (so it can run per micro-batch)
    tempered_logprobs: bool = True  # log-probs under --temperature, the distribution sampled (False: at 1, DPO's)

    @property
    def offline(self) -> bool:
        """Learns from given responses: nothing is sampled, scored or read under pi_old."""
        return self.given_responses is not None


ALGORITHMS = Registry("algorithm")
# Settings every algorithm gets unless its own `defaults` say otherwise.
BASE_DEFAULTS = {"beta": 0.05, "epochs": 4, "loss_aggregation": "group-mean"}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Make `algorithm` available as `--algo NAME` (and `P3OConfig(algo=NAME)`); a name taken twice is an error."""
    ALGORITHMS.register(algorithm.name)(algorithm)
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:  # in registration order, the package's own first
        raise UsageError(f"unknown --algo {name!r}; known algorithms: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def default_setting(algorithm: Algorithm, name: str):
    if name == "num_generations":
        return algorithm.defaults.get(name, algorithm.samples[0])
    return algorithm.defaults.get(name, BASE_DEFAULTS[name])


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


def sequence_logps(batch: Rollout, out: PolicyOutputs) -> torch.Tensor:
    """l_theta(y) of every response in the micro-batch (b,), with gradient."""
    return sequence_logprobs(out.token_logps, batch.response_mask)


# --- P3O: pairs, Delta per pair, a pairwise loss (docs/p3o.md sections 2-4) -------------------------

def pair_delta(rollout: Rollout, cfg, beta: float) -> Prepared:
    """Delta = (r1 - r2) - beta * (kl1 - kl2), the reward difference taken first (docs/p3o.md section 2).

    Raw rewards arrive in float64 and their difference is taken before anything else touches them,
    so a per-prompt reward shift cancels exactly; only Delta is ever scaled or clipped. With
    `--delta_kl current` the loss moves Delta to the live KL (and clips it there), so it keeps beta.
    """
    rewards = rollout.rewards.view(-1, 2)  # (P, 2) float64
    kl = rollout.kl.view(-1, 2)  # (P, 2)
    reward_diff = (rewards[:, 0] - rewards[:, 1]).to(kl.dtype).to(kl.device)  # (P,) exact, then float32
    delta = reward_diff - beta * (kl[:, 0] - kl[:, 1])  # (P,)
    if cfg.delta_normalization == "rms":  # over the whole rollout, on every process
        count = torch.tensor(float(len(delta)), dtype=delta.dtype, device=delta.device)
        squares = sum_across_processes(torch.stack([delta.pow(2).sum(), count]))
        delta = delta / (squares[0] / squares[1]).sqrt().clamp(min=1e-8)
    if cfg.delta_kl == "current":
        return Prepared({"delta": delta, "beta": torch.full_like(delta, beta)}, {"delta_abs": delta.abs().mean().item()})
    if cfg.delta_clip is not None:
        delta = delta.clamp(-cfg.delta_clip, cfg.delta_clip)
    return Prepared({"delta": delta}, {"delta_abs": delta.abs().mean().item()})


def current_delta(batch: Rollout, logp: torch.Tensor, old_logp: torch.Tensor, cfg) -> torch.Tensor:
    """`--delta_kl current`: Delta with the live KL l_theta(y) - l_ref(y) in place of the rollout's.
    Their difference is l_theta(y) - l_old(y), the log-ratio, so Delta moves by -beta * (log rho1 -
    log rho2) (P,); no gradient flows through it. At a rollout's first minibatch rho = 1: unchanged."""
    log_ratio = (logp - old_logp).detach()  # (P, 2)
    delta = batch.delta - batch.beta * (log_ratio[:, 0] - log_ratio[:, 1])  # (P,)
    return delta if cfg.delta_clip is None else delta.clamp(-cfg.delta_clip, cfg.delta_clip)


def pairwise_loss(pair_loss: Callable) -> Loss:
    """Adapter: a micro-batch of pairs -> P3O's pair loss (P,) (`p3o.rl.losses.p3o`)."""

    def loss(batch: Rollout, out: PolicyOutputs, cfg):
        logp = sequence_logps(batch, out).view(-1, 2)  # (P, 2)
        old_logp = batch.old_logp.view(-1, 2)  # (P, 2)
        delta = current_delta(batch, logp, old_logp, cfg) if cfg.delta_kl == "current" else batch.delta  # (P,)
        return pair_loss(logp, old_logp, delta, clip_eps=cfg.clip_eps, is_clamp=cfg.importance_clamp)

    return loss


register_algorithm(Algorithm("p3o-v1", pair_delta, pairwise_loss(p3o.p3o_v1_loss)))  # separate clipping
register_algorithm(Algorithm("p3o-v2", pair_delta, pairwise_loss(p3o.p3o_v2_loss)))  # joint clipping


# --- RLOO, GRPO, ReMax: one advantage per response, a clipped sequence or token loss -----------

def group_advantages(estimator: str) -> Prepare:
    """prepare: per-response advantages (B,) from the group's rewards and KLs, by a registered
    estimator of `p3o.rl.advantages` (rloo, grpo, remax)."""
    estimate = adv.get_estimator(estimator)

    def prepare(rollout: Rollout, cfg, beta: float) -> Prepared:
        k = rollout.num_generations
        rewards = rollout.rewards.view(-1, k)  # (G, k) float64 on the CPU
        kl = rollout.kl.view(-1, k).cpu()  # (G, k)
        advantages = estimate(rewards, kl, beta, rollout, cfg)  # (G, k)
        advantages = advantages.flatten().to(rollout.kl.device)  # (B,)
        return Prepared({"advantages": advantages}, {"advantage_abs": advantages.abs().mean().item()})

    return prepare


def sequence_clip_loss(batch: Rollout, out: PolicyOutputs, cfg):
    losses, stats = pg.sequence_clip_loss(sequence_logps(batch, out), batch.old_logp, batch.advantages,
                                          clip_eps=cfg.clip_eps)  # (B,)
    return per_group(losses, batch.num_generations), stats


def token_clip_loss(batch: Rollout, out: PolicyOutputs, cfg):
    mask = batch.response_mask
    advantages = batch.advantages[:, None].expand_as(out.token_logps)  # (B, T) one per response
    losses, stats = pg.token_clip_loss(out.token_logps, batch.old_token_logp, advantages, mask,
                                       clip_eps=cfg.clip_eps)  # (B, T)
    return per_group_tokens(losses, mask, batch.num_generations, cfg), stats


def score_greedy_responses(engine, rollout: Rollout, rows: list[dict], step: int) -> dict[str, torch.Tensor]:
    """ReMax's hook: each prompt's greedy response, scored and with its KL: (G,) rewards and kl."""
    k = rollout.num_generations
    query_ids, query_mask = rollout.query_ids[::k], rollout.query_mask[::k]  # (G, Lq) one row per prompt
    response_ids, response_mask = engine.generate(query_ids, query_mask, engine.greedy_config, "greedy", step)  # (G, T)
    greedy = Rollout(1, query_ids, query_mask, response_ids, response_mask)
    texts = engine.completions(greedy)
    scores = engine.score(engine.reward, rows, texts, greedy.response_ids, greedy.response_mask, 1,
                          logged=False)  # (G,): what the functions log is the samples' only
    rewards, _ = engine.penalised(scores, greedy.response_ids, greedy.response_mask)  # as the samples are
    rollout.stats["baseline_reward"] = rewards.mean().item()  # raw, as `reward` is logged
    if engine.reward_scale is not None:  # in the samples' units: clipped, divided by the same std
        rewards = engine.reward_scale.scale(rewards)
    kl = engine.log_probs(greedy, {}, paired=False)["kl"]  # (G,)
    return {"baseline_rewards": rewards, "baseline_kl": kl}


register_algorithm(Algorithm("rloo", group_advantages("rloo"), sequence_clip_loss, samples=(2, None)))
register_algorithm(Algorithm("grpo", group_advantages("grpo"), token_clip_loss, samples=(2, None),
                             defaults={"num_generations": 4}))
register_algorithm(Algorithm("remax", group_advantages("remax"), sequence_clip_loss, samples=(1, None),
                             extend_rollout=score_greedy_responses))


# --- PPO with a critic (docs/p3o.md section 5) -----------------------------------------------------

def ppo_advantages(rollout: Rollout, cfg, beta: float) -> Prepared:
    """Per-token KL penalty plus the score on the last token; GAE; advantages whitened over the
    rollout (all processes' share of it)."""
    mask, values = rollout.response_mask, rollout.old_values  # (B, T) each
    scores = rollout.rewards.to(values.device)  # (B,) float64 -> the per-token rewards' dtype
    rewards = adv.token_rewards(scores, rollout.old_token_logp, rollout.ref_token_logp, mask, beta)  # (B, T)
    advantages, returns = adv.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T) each
    returns_var = masked_mean((returns - masked_mean(returns, mask)).pow(2), mask)
    explained = 1 - masked_mean((returns - values).pow(2), mask) / returns_var.clamp(min=1e-8)
    stats = {"value_mean": masked_mean(values, mask).item(), "return_mean": masked_mean(returns, mask).item(),
             "explained_variance": explained.item()}
    whitened = adv.whiten(advantages, mask, total=sum_across_processes)  # over the global rollout
    return Prepared({"advantages": whitened, "returns": returns}, stats)


def ppo_loss(batch: Rollout, out: PolicyOutputs, cfg):
    mask = batch.response_mask
    losses, stats = pg.ppo_loss(out.token_logps, batch.old_token_logp, batch.advantages, mask, out.values,
                                batch.old_values, batch.returns, clip_eps=cfg.clip_eps,
                                value_clip=cfg.value_clip_eps, vf_coef=cfg.vf_coef)  # (B, T)
    return per_group_tokens(losses, mask, batch.num_generations, cfg), stats


register_algorithm(Algorithm("ppo", ppo_advantages, ppo_loss, samples=(1, None), wrap_policy=PolicyWithValueHead,
                             groupwise_prepare=False, defaults={"loss_aggregation": "token-mean"}))


# --- DPO, offline on preference data and online on the policy's own pairs ----------------------

def online_preferences(rollout: Rollout, cfg, beta: float) -> Prepared:
    """+1 where y1 scored higher, -1 where y2 did, 0 for a tie (which then carries no loss)."""
    rewards = rollout.rewards.view(-1, 2)  # (P, 2) float64
    preference = torch.sign(rewards[:, 0] - rewards[:, 1]).float().to(rollout.kl.device)  # (P,)
    return Prepared({"preference": preference}, {"tie_fraction": (preference == 0).float().mean().item()})


def dataset_preferences(rollout: Rollout, cfg, beta: float) -> Prepared:
    """Offline pairs are stored (chosen, rejected): y1 is always preferred."""
    return Prepared({"preference": torch.ones(rollout.num_groups, device=rollout.ref_logp.device)})


def dataset_pairs(prompts, indices: list[int]) -> list[list[int]]:
    """Offline DPO's hook: each prompt's (chosen, rejected) token ids from the data, in that order."""
    return [ids for i in indices for ids in prompts.responses[i]]


def dpo_pair_loss(batch: Rollout, out: PolicyOutputs, cfg):
    logp = sequence_logps(batch, out).view(-1, 2)  # (P, 2)
    ref_logp = batch.ref_logp.view(-1, 2)  # (P, 2)
    preference = batch.preference  # (P,)
    swap = (preference < 0)[:, None]  # put the preferred response first
    logp, ref_logp = torch.where(swap, logp.flip(-1), logp), torch.where(swap, ref_logp.flip(-1), ref_logp)
    return dpo.dpo_loss(logp, ref_logp, preference.abs(), beta=cfg.beta)


# One pass per batch by default: DPO has no importance weights for reusing the policy's own samples.
_dpo_defaults = {"beta": 0.1, "epochs": 1}
register_algorithm(Algorithm("dpo", dataset_preferences, dpo_pair_loss, defaults=_dpo_defaults,
                             given_responses=dataset_pairs, kl_penalty=False, tempered_logprobs=False))
register_algorithm(Algorithm("online-dpo", online_preferences, dpo_pair_loss, defaults=_dpo_defaults,
                             kl_penalty=False, tempered_logprobs=False))  # TRL's: sampled tempered, scored at 1
