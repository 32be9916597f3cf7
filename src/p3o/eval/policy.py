"""Evaluate a policy on held-out prompts (docs/p3o.md section 6): sample one response per prompt, score it
with every given reward (proxy, gold, ...), and measure the sequence KL to the reference,
KL = mean of l(y) - l_ref(y) with y sampled from the policy (nats; exactly 0 for the reference).
"""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import torch

from p3o.models.loading import eos_token_ids
from p3o.rl.rollout import (
    Rollout,
    batched_token_logprobs,
    decode_completions,
    generation_config,
    pad_prompts,
    prompt_budget,
    sample_responses,
    sequence_logprobs,
)
from p3o.utils.seeding import seed_global_rng

log = logging.getLogger("p3o")


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, prompts, rewards: dict, max_new_tokens: int, seed: int = 0,
                    batch_size: int = 64, temperature: float = 1.0, first_index: int = 0, synced: bool = False,
                    max_prompt_length: int | None = None, reward_context: dict | None = None) -> dict:
    """Metrics of `policy` on `prompts` (a PromptDataset): `kl`, `length` and one entry per reward,
    each with its standard error (`*_stderr`), plus the samples themselves (each with its own values).
    `first_index`: where `prompts` start in a larger set split between processes (it seeds the
    sampling, so each share draws its own noise); `synced`: the policy is sharded (FSDP), as in
    `sample_responses`. Prompts are cut as in training (`prompt_budget`): give the run's `max_prompt_length`.

    Rewards are called as in training: raw prompts, the dataset's other columns and `completion_ids`."""
    eos = eos_token_ids(tokenizer, policy)
    config = generation_config(SimpleNamespace(temperature=temperature, top_k=0, top_p=1.0,
                                               max_new_tokens=max_new_tokens), tokenizer, eos)
    device = next(policy.parameters()).device
    budget = prompt_budget(policy.config, max_new_tokens, max_prompt_length)
    if long := sum(len(ids) > budget for ids in prompts.token_ids):
        log.warning("%d of %d prompts are longer than %d tokens (--max_prompt_length, by default what the context "
                    "leaves beside %d new ones); they keep their last tokens (and BOS)", long, len(prompts), budget,
                    max_new_tokens)
    kl, lengths, completions, completion_ids = [], [], [], []
    for first in range(0, len(prompts), batch_size):
        ids, mask = pad_prompts(tokenizer, prompts.token_ids[first:first + batch_size], budget)
        ids, mask = ids.to(device), mask.to(device)
        seed_global_rng(seed, "eval", first_index + first)  # the same prompts get the same random stream for every policy
        response, response_mask = sample_responses(policy, ids, mask, config, eos, synced=synced)
        seq = Rollout(1, ids, mask, response, response_mask)
        logp = sequence_logprobs(batched_token_logprobs(policy, seq, temperature, batch_size), response_mask)
        ref = logp if reference is policy else sequence_logprobs(  # the start policy against itself: KL exactly 0
            batched_token_logprobs(reference, seq, temperature, batch_size), response_mask)
        kl += (logp - ref).tolist()
        lengths += response_mask.sum(-1).tolist()
        completions += decode_completions(tokenizer, ids, mask, response, response_mask)
        completion_ids += [r[:n] for r, n in zip(response.tolist(), response_mask.sum(-1).tolist())]
    raw = [row[prompts.prompt_column] for row in prompts.rows]
    if raw and not isinstance(raw[0], str):
        completions_for_reward = [[{"role": "assistant", "content": c}] for c in completions]
    else:
        completions_for_reward = completions
    reserved = {prompts.prompt_column, "prompts", "completions", "completion_ids", "trl_context"}
    columns = {name: [row.get(name) for row in prompts.rows] for name in prompts.rows[0] if name not in reserved}
    values = {"kl": kl, "length": [float(x) for x in lengths]}
    for name, reward in rewards.items():
        context = {"trl_context": reward_context} if reward_context is not None else {}  # training's, not logged
        values[name] = reward(raw, completions_for_reward, completion_ids=completion_ids, **columns, **context).tolist()
    samples = [{"prompt": p, "completion": c, **{name: v[i] for name, v in values.items()}}
               for i, (p, c) in enumerate(zip(raw, completions))]
    return {**summarise(samples, list(values)), "samples": samples}


def summarise(samples: list[dict], names: list[str]) -> dict[str, float]:
    """Each named value's mean over the samples and its standard error (`<name>_stderr`)."""
    metrics = {}
    for name in names:
        metrics[name], metrics[f"{name}_stderr"] = mean_and_stderr([sample[name] for sample in samples])
    return metrics
