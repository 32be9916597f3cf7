"""P3O (Pairwise Proximal Policy Optimization, Wu et al. 2023) in one file: torch + transformers only.

The same algorithm as `p3o train --algo p3o-v2` (or `--algo p3o-v1`), written to read top to bottom
like the maths; section numbers refer to docs/p3o.md. Per step:

    1. take G prompts                          2. sample a pair (y1, y2) per prompt from pi_old
    3. score both with the reward (raw)        4. l_old(y), l_ref(y), kl(y) = l_old(y) - l_ref(y)
    5. Delta = (r1 - r2) - beta * (kl1 - kl2)  6. K epochs: shuffle the pairs, one AdamW step per
                                                  minibatch of whole pairs on the V1 or V2 loss

On the same seed and settings it ends on the weights `p3o train` ends on (tests/test_single_file.py).
What p3o adds for speed (a pair's prompt run once in a packed forward, a preallocated KV cache, the
old-log-prob pass fused into the update) and for scale (processes, LoRA, vLLM, checkpoints) is left
out: the simple form here gives the same numbers up to float32 rounding.

    python examples/p3o_single_file.py --model runs/quickstart/init \
        --prompts examples/quickstart/prompts.jsonl --reward_fn examples/quickstart/reward.py:colour_words \
        --learning_rate 1e-3 --max_new_tokens 8 --max_steps 30 --pairs_per_step 32 --seed 0
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass, fields

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, get_scheduler


@dataclass
class Config:
    model: str = ""  # the SFT policy: a directory or hub name; pi_ref is a frozen copy of it
    prompts: str = ""  # a .jsonl file with a "prompt" column (plain text)
    reward_fn: str = ""  # path/to/file.py:fn, called as fn(prompts, completions, completion_ids=..., **columns)
    output_dir: str = ""  # where the trained policy is saved (nothing saved if empty)
    algo: str = "p3o-v2"  # p3o-v2 (joint clipping) or p3o-v1 (separate clipping)
    seed: int = 42
    max_steps: int = 100  # rollouts
    pairs_per_step: int = 64  # G prompts, one pair of responses each
    minibatch_pairs: int = 0  # pairs per optimiser step; 0: the largest divisor of G that is at most 8
    epochs: int = 4  # K passes over each rollout
    max_new_tokens: int = 64
    max_prompt_length: int = 0  # 0: the model's context minus max_new_tokens
    temperature: float = 1.0
    beta: float = 0.05  # KL penalty in Delta
    kl_target: float = 0.0  # > 0: adapt beta towards this mean KL (Ziegler et al.)
    kl_horizon: int = 10000
    clip_eps: float = 0.2  # clip range of rho (V1) or of d - d_old (V2)
    importance_clamp: float = 10.0  # C: importance weights clamped to [1/C, C]
    delta_normalization: str = "none"  # none or rms (over the rollout)
    delta_clip: float = 0.0  # > 0: clip Delta to [-delta_clip, delta_clip]
    loss_aggregation: str = "group-mean"  # group-mean (per pair) or token-mean
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95  # as in the P3O experiments
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping


# --- seeding: every random draw comes from (seed, stream, index), so no RNG state is carried ------


def derived_seed(seed: int, stream: str, index: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, stream: str, index: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, stream, index))


def prompt_indices(cfg: Config, step: int, n: int) -> list[int]:
    """Step s takes slots [s*G, (s+1)*G) of an endless stream of seeded permutations of the data."""
    slots = range(step * cfg.pairs_per_step, (step + 1) * cfg.pairs_per_step)
    return [int(torch.randperm(n, generator=generator(cfg.seed, "data", s // n))[s % n]) for s in slots]


# --- sampling ----------------------------------------------------------------------------------


class InverseCdf(LogitsProcessor):
    """Draws each next token from softmax(scores / temperature) with one uniform number per row
    against the cumulative distribution (p3o's sampler; torch.multinomial would draw an exponential
    number per vocabulary entry), and leaves it the only finite score, so greedy decoding takes it."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids, scores):  # (B, V) -> (B, V)
        probs = torch.softmax(scores / self.temperature if self.temperature != 1.0 else scores, dim=-1)
        cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
        u = torch.rand((len(probs), 1), dtype=torch.float64) * cdf[:, -1:]  # (B, 1) in [0, total)
        token = torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)  # first i with F(i) > u
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


# --- the policy's log-probabilities ----------------------------------------------------------

def token_logprobs(model, query_ids, query_mask, response_ids, response_mask, temperature: float):
    """log pi(y_t | x, y_<t) for every response token (B, T), 0 on padding. Prompts are left-padded,
    so positions count real tokens only, as in `generate`."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, Lq+T)
    attention = torch.cat([query_mask, response_mask], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    T = response_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False,
                   logits_to_keep=T + 1).logits[:, :-1] / temperature  # (B, T, V): the logits before each y_t
    logps = logits.gather(-1, response_ids[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, T)
    return torch.where(response_mask.bool(), logps, torch.zeros_like(logps))


def sequence_logprobs(model, seq: dict, temperature: float):
    """l(y) = sum_t log pi(y_t | x, y_<t): (B,)."""
    keys = ("query_ids", "query_mask", "response_ids", "response_mask")
    return token_logprobs(model, *(seq[k] for k in keys), temperature).sum(-1)


# --- the P3O losses, docs/p3o.md section 4 (per pair; P pairs, the trailing 2 is y1, y2) ----------

MAX_LOG_RATIO = 20.0  # log-ratios are clamped before exp, so a stale pair cannot overflow float32


def importance_weight(log_ratio, clamp: float):
    """w(rho) = clamp(rho, 1/C, C), stop-gradient, computed in log space."""
    return log_ratio.detach().clamp(-math.log(clamp), math.log(clamp)).exp()


def p3o_v1_loss(logp, old_logp, delta, clip_eps: float, is_clamp: float):
    """Separate clipping: 1/2 [ max(-Delta w(rho2) rho1, -Delta w(rho2) clip(rho1, 1-eps, 1+eps))
                               + max(+Delta w(rho1) rho2, +Delta w(rho1) clip(rho2, 1-eps, 1+eps)) ]"""
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # (P, 2)
    rho1, rho2 = log_ratio.exp().unbind(-1)
    w1, w2 = importance_weight(log_ratio, is_clamp).unbind(-1)
    clip = lambda rho: rho.clamp(1 - clip_eps, 1 + clip_eps)  # noqa: E731
    return 0.5 * (torch.maximum(-delta * w2 * rho1, -delta * w2 * clip(rho1))
                  + torch.maximum(delta * w1 * rho2, delta * w1 * clip(rho2)))  # (P,)


def p3o_v2_loss(logp, old_logp, delta, clip_eps: float, is_clamp: float):
    """Joint clipping of d = l(y1) - l(y2) around d_old:
    1/2 max(-Delta w(rho1 rho2) d, -Delta w(rho1 rho2) clip(d, d_old - eps, d_old + eps))"""
    w12 = importance_weight((logp - old_logp).sum(-1), is_clamp)  # (P,) w(rho1 * rho2), the sum clamped
    d, d_old = logp[:, 0] - logp[:, 1], old_logp[:, 0] - old_logp[:, 1]  # (P,)
    clipped = torch.clamp(d, d_old - clip_eps, d_old + clip_eps)
    return 0.5 * torch.maximum(-delta * w12 * d, -delta * w12 * clipped)  # (P,)


LOSSES = {"p3o-v1": p3o_v1_loss, "p3o-v2": p3o_v2_loss}


# --- setup -------------------------------------------------------------------------------------

def load_reward(spec: str):
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("reward_module", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def no_dropout(model) -> None:
    """Log-ratios must be exact (rho = 1 at the first update): every dropout off."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def left_pad(tokenizer, token_ids: list[list[int]], max_length: int):
    """(G, Lq) left-padded prompts; a long prompt keeps its last tokens (and its BOS)."""
    bos, kept = tokenizer.bos_token_id, []
    for ids in token_ids:
        if len(ids) > max_length:
            head = ids[:1] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(ids) - (max_length - len(head)):]
        kept.append(ids)
    batch = tokenizer.pad({"input_ids": kept}, padding=True, return_tensors="pt", padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


def decode(tokenizer, query_ids, query_mask, response_ids, response_mask) -> list[str]:
    """Each response as it continues its prompt: decode(prompt + response) minus decode(prompt)."""
    prompts = [q[m.bool()].tolist() for q, m in zip(query_ids, query_mask)]
    responses = [r[:int(n)].tolist() for r, n in zip(response_ids, response_mask.sum(-1))]
    p_text = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    full = tokenizer.batch_decode([p + r for p, r in zip(prompts, responses)], skip_special_tokens=True)
    alone = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [f[len(p):] if f.startswith(p) else a for p, f, a in zip(p_text, full, alone)]


def train(cfg: Config):
    assert cfg.algo in LOSSES, f"--algo must be one of {', '.join(LOSSES)}"
    G = cfg.pairs_per_step
    M = cfg.minibatch_pairs or max(d for d in range(1, min(8, G) + 1) if G % d == 0)
    assert G % M == 0, "pairs_per_step must be a multiple of minibatch_pairs (pairs are never split)"

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:  # any id will do: masks come from positions, never from pad ids
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    policy = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    no_dropout(policy)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # pi_ref: the initial policy, frozen
    # A response ends at EOS, or at a stop id of the model's generation config that is a special token.
    extra = policy.generation_config.eos_token_id
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    eos_ids = sorted({tokenizer.eos_token_id, *(i for i in extra if i in tokenizer.all_special_ids)} - {None})
    # Greedy decoding over scores where only the token InverseCdf drew is finite: sampling from pi.
    sampling = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, min_new_tokens=0,
                                repetition_penalty=1.0, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    # Sample from pi itself: a blank generation config, so no top-k, penalty etc. of a hub model's own applies.
    saved_generation_config, policy.generation_config = policy.generation_config, GenerationConfig()
    max_prompt = cfg.max_prompt_length or policy.config.max_position_embeddings - cfg.max_new_tokens

    with open(cfg.prompts) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompt_ids = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    reward_fn = load_reward(cfg.reward_fn)

    # AdamW, decaying matrices only (not biases and norm gains); one optimiser step per minibatch.
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps * cfg.epochs * (G // M))
    beta = cfg.beta

    for step in range(cfg.max_steps):
        # 1. G prompts, each repeated twice: rows 2p and 2p+1 are pair p.
        indices = prompt_indices(cfg, step, len(rows))
        query_ids, query_mask = left_pad(tokenizer, [prompt_ids[i] for i in indices], max_prompt)
        seq = {"query_ids": query_ids.repeat_interleave(2, 0), "query_mask": query_mask.repeat_interleave(2, 0)}

        # 2. Sample y1, y2 from pi_old (the policy as it is now), seeded by the step.
        torch.manual_seed(derived_seed(cfg.seed, "sample/0", step))
        with torch.no_grad():
            out = policy.generate(input_ids=seq["query_ids"], attention_mask=seq["query_mask"],
                                  generation_config=sampling, logits_processor=[InverseCdf(cfg.temperature)])  # (2G, Lq+T)
        seq["response_ids"] = response = out[:, query_ids.shape[1]:]  # (2G, T)
        # The mask covers each response up to and including its first EOS (positions, not pad ids).
        T = response.shape[1]
        is_eos = torch.isin(response, torch.tensor(eos_ids))
        first_eos = torch.where(is_eos, torch.arange(T), T).min(-1).values  # (2G,) T if none
        seq["response_mask"] = (torch.arange(T)[None] <= first_eos[:, None]).long()

        # 3. Score: raw rewards in float64, never normalised (docs/p3o.md section 2).
        completions = decode(tokenizer, seq["query_ids"], seq["query_mask"], response, seq["response_mask"])
        pair_rows = [rows[i] for i in indices for _ in range(2)]
        columns = {k: [r.get(k) for r in pair_rows] for k in rows[0] if k != "prompt"}
        ids = [r[:n] for r, n in zip(response.tolist(), seq["response_mask"].sum(-1).tolist())]
        rewards = torch.tensor([float(r) for r in reward_fn([r["prompt"] for r in pair_rows], completions,
                                                            completion_ids=ids, **columns)], dtype=torch.float64)

        # 4. Sequence log-probs under pi_old and pi_ref; kl(y) = l_old(y) - l_ref(y) (docs/p3o.md section 3).
        with torch.no_grad():
            old_logp = sequence_logprobs(policy, seq, cfg.temperature)  # (2G,)
            ref_logp = sequence_logprobs(reference, seq, cfg.temperature)
        kl = old_logp - ref_logp

        # 5. Delta per pair: the reward difference first, in float64, so that any per-prompt shift of the
        #    reward cancels exactly; then the KL difference (docs/p3o.md section 2).
        rewards, kl_pairs = rewards.view(G, 2), kl.view(G, 2)
        delta = (rewards[:, 0] - rewards[:, 1]).float() - beta * (kl_pairs[:, 0] - kl_pairs[:, 1])  # (G,)
        if cfg.delta_normalization == "rms":
            delta = delta / (delta.pow(2).sum() / len(delta)).sqrt().clamp(min=1e-8)  # rms over the rollout
        if cfg.delta_clip > 0:
            delta = delta.clamp(-cfg.delta_clip, cfg.delta_clip)

        # 6. K epochs; each shuffles the pairs (never splitting one) into minibatches of M pairs, and each
        #    minibatch takes one AdamW step on its mean pair loss (docs/p3o.md section 4, trajectory level;
        #    token-mean: the summed pair losses over the minibatch's response tokens).
        shuffle = generator(cfg.seed, "shuffle", step)
        for _ in range(cfg.epochs):
            for pairs in torch.randperm(G, generator=shuffle).split(M):  # (M,)
                rows_mb = (pairs[:, None] * 2 + torch.arange(2)).flatten()  # (2M,) y1, y2 of each pair
                logp = sequence_logprobs(policy, {k: v[rows_mb] for k, v in seq.items()}, cfg.temperature)
                losses = LOSSES[cfg.algo](logp.view(-1, 2), old_logp[rows_mb].view(-1, 2), delta[pairs],
                                          cfg.clip_eps, cfg.importance_clamp)  # (M,)
                normaliser = (float(seq["response_mask"][rows_mb].sum()) if cfg.loss_aggregation == "token-mean"
                              else float(len(pairs)))
                loss = losses.sum() / normaliser
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or math.inf)
                if math.isfinite(loss.item()) and math.isfinite(norm.item()):  # else the step is dropped
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        if cfg.kl_target > 0:  # adaptive beta for the next rollout (Ziegler et al. 2019)
            error = min(max(kl.mean().item() / cfg.kl_target - 1.0, -0.2), 0.2)
            beta *= 1.0 + error * 2 * G / cfg.kl_horizon
        print(f"step {step + 1}: reward {rewards.mean().item():.3f}  kl {kl.mean().item():.3f}  "
              f"|Delta| {delta.abs().mean().item():.3f}  loss {loss.item():.4f}", flush=True)

    policy.generation_config = saved_generation_config
    if cfg.output_dir:
        policy.save_pretrained(cfg.output_dir)
        tokenizer.save_pretrained(cfg.output_dir)
    return policy


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in fields(Config):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default,
                            required=field.name in ("model", "prompts", "reward_fn"))
    return train(Config(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
