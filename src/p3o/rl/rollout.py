"""The rollout: prompts, k sampled responses each, rewards and log-probabilities.

Shape legend: G = prompts (groups) in a rollout; k = responses per prompt (2 for P3O);
B = G*k sequences, the k responses of prompt g in rows g*k .. g*k+k-1, so selecting whole groups
never splits a pair; Lq = prompt tokens (left-padded); T = response tokens (right-padded);
V = vocabulary.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field, fields

import torch

from p3o.data.turns import opens_with_bos
from p3o.errors import UsageError
from p3o.models.loading import context_length
from p3o.utils.ops import masked_sum, response_mask_from_eos, selective_log_softmax


SEQUENCE, GROUP = "sequence", "group"


def _tensor(per: str):
    """A Rollout field holding one row per sequence (B, ...) or per prompt group (G, ...); None until set."""
    return field(default=None, metadata={"per": per})


@dataclass
class Rollout:
    """One rollout's tensors. Rows: the k = `num_generations` responses of prompt g are rows
    g*k .. g*k+k-1 of every per-sequence field, so selecting whole groups never splits one.

    The engine fills the sampled tokens, the rewards and the log-probs; an algorithm's `prepare`
    fills the fields it needs (P3O `delta`, RLOO/GRPO/PPO `advantages`, DPO `preference` ...).
    An algorithm registered from outside the package keeps anything else in `extra` (B, ...) or
    `group_extra` (G, ...). Unset fields are None; the engine always sets the four token fields (a
    hand-built batch for a test needs only what its loss reads).
    """

    num_generations: int  # k, responses per prompt
    # Per sequence, B = G*k rows. Token tensors are (B, T), 0 past each response's end.
    query_ids: torch.Tensor | None = _tensor(SEQUENCE)  # (B, Lq) left-padded prompt, repeated k times
    query_mask: torch.Tensor | None = _tensor(SEQUENCE)  # (B, Lq)
    response_ids: torch.Tensor | None = _tensor(SEQUENCE)  # (B, T) right-padded
    response_mask: torch.Tensor | None = _tensor(SEQUENCE)  # (B, T) up to and including the end of turn
    rewards: torch.Tensor | None = _tensor(SEQUENCE)  # (B,) float64 on the CPU, what the algorithm trains on:
    #   the raw scores (never shifted or scaled), or with --reward_normalization running_std clipped and scaled
    raw_rewards: torch.Tensor | None = _tensor(SEQUENCE)  # (B,) float64, as scored: what is logged
    monitor_rewards: torch.Tensor | None = _tensor(SEQUENCE)  # (B,) logged, never trained on
    old_token_logp: torch.Tensor | None = _tensor(SEQUENCE)  # (B, T) log pi_old(y_t | x, y_<t)
    old_logp: torch.Tensor | None = _tensor(SEQUENCE)  # (B,) l_old(y), the sum of old_token_logp
    ref_token_logp: torch.Tensor | None = _tensor(SEQUENCE)  # (B, T) under pi_ref
    ref_logp: torch.Tensor | None = _tensor(SEQUENCE)  # (B,)
    kl: torch.Tensor | None = _tensor(SEQUENCE)  # (B,) l_old(y) - l_ref(y), the sampled KL estimate
    old_values: torch.Tensor | None = _tensor(SEQUENCE)  # (B, T) PPO's critic at sampling time
    advantages: torch.Tensor | None = _tensor(SEQUENCE)  # (B,) per response, or (B, T) per token (PPO)
    returns: torch.Tensor | None = _tensor(SEQUENCE)  # (B, T) PPO's value targets
    extra: dict[str, torch.Tensor] = field(default_factory=dict, metadata={"per": SEQUENCE})  # (B, ...) each
    # Per prompt group, G rows.
    delta: torch.Tensor | None = _tensor(GROUP)  # (G,) P3O's Delta = (r1 - r2) - beta (kl1 - kl2), G = pairs
    beta: torch.Tensor | None = _tensor(GROUP)  # (G,) the rollout's KL coefficient, where the loss recomputes Delta
    preference: torch.Tensor | None = _tensor(GROUP)  # (G,) DPO: +1 y1 preferred, -1 y2, 0 tie
    baseline_rewards: torch.Tensor | None = _tensor(GROUP)  # (G,) ReMax: the greedy response's reward
    baseline_kl: torch.Tensor | None = _tensor(GROUP)  # (G,) ReMax: the greedy response's KL
    group_extra: dict[str, torch.Tensor] = field(default_factory=dict, metadata={"per": GROUP})  # (G, ...) each
    stats: dict[str, float] = field(default_factory=dict)  # per-rollout statistics to log
    part_sums: dict[str, tuple[float, float]] = field(default_factory=dict)  # reward part -> (sum, count) of
    #   the completions it applies to (a function's None does not): logged as reward/<name>

    @property
    def num_groups(self) -> int:
        return self.response_mask.shape[0] // self.num_generations

    def update(self, **values: torch.Tensor) -> None:
        """Set fields by name (what `prepare` returns); a name that is no field is an error."""
        for name, value in values.items():
            if name not in _FIELDS:
                raise AttributeError(f"Rollout has no field {name!r}; keep an algorithm's own tensors in "
                                     "`extra` (per sequence) or `group_extra` (per group)")
            setattr(self, name, value)

    def select(self, groups: torch.Tensor) -> "Rollout":
        """The sub-rollout of whole groups `groups` (G',) in that order."""
        k = self.num_generations
        rows = (groups[:, None] * k + torch.arange(k, device=groups.device)).flatten()  # (G'*k,)
        index = {SEQUENCE: rows, GROUP: groups}
        picked = {}
        for name, per in _FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                picked[name] = {n: t[index[per].to(t.device)] for n, t in value.items()}
            elif value is not None:
                picked[name] = value[index[per].to(value.device)]
        return Rollout(k, **picked)

    def split(self, groups_per_part: int) -> list["Rollout"]:
        """Consecutive parts of `groups_per_part` whole groups."""
        return [self.select(idx) for idx in torch.arange(self.num_groups).split(groups_per_part)]


_FIELDS = {f.name: f.metadata["per"] for f in fields(Rollout) if "per" in f.metadata}  # name -> SEQUENCE | GROUP


@dataclass
class PolicyOutputs:
    """The training forward on a micro-batch, what every loss reads beside the batch itself."""

    token_logps: torch.Tensor  # (b, T) log pi_theta(y_t | x, y_<t), with gradient; 0 on padding
    values: torch.Tensor | None = None  # (b, T) the critic's values, with gradient (PPO)


def prompt_budget(model_config, max_new_tokens: int, max_prompt_length: int | None = None) -> int:
    """Prompt tokens kept beside `max_new_tokens` new ones: `max_prompt_length`, else what the context
    leaves. Training, its held-out evaluation, `p3o eval` and `p3o winrate` all cut prompts here, so
    an evaluated prompt is the trained one."""
    context = context_length(model_config)
    if context is not None and max_new_tokens >= context:
        raise UsageError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context} tokens; lower it")
    if max_prompt_length is not None:
        if context is not None and max_prompt_length + max_new_tokens > context:
            raise UsageError(f"--max_prompt_length {max_prompt_length} + --max_new_tokens {max_new_tokens} "
                             f"exceeds the model's context of {context} tokens; lower one of them")
        return max_prompt_length
    return context - max_new_tokens if context is not None else 1024


def pad_prompts(tokenizer, token_ids: list[list[int]], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (G, Lq). A prompt over `max_length` keeps its last tokens
    (the ones next to the response), and its BOS if it began with one that opens the whole sequence
    (`opens_with_bos`: not ChatML's `<|im_start|>`, which SmolLM2 names its BOS)."""
    kept = []
    for ids in token_ids:
        if len(ids) > max_length:
            head = ids[:1] if opens_with_bos(tokenizer, ids) else []
            ids = head + ids[len(ids) - (max_length - len(head)):]
        kept.append(ids)
    batch = tokenizer.pad({"input_ids": kept}, padding=True, return_tensors="pt", padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


def generation_config(cfg, tokenizer, eos_ids: list[int], greedy: bool = False):
    """Sampling exactly from the (tempered) policy: no top-k/top-p unless asked, no other processors.
    `greedy`: the most likely token at each step instead (ReMax's baseline)."""
    from transformers import GenerationConfig

    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": cfg.temperature,
                                                     "top_k": cfg.top_k, "top_p": cfg.top_p}
    return GenerationConfig(
        **sampling,
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, repetition_penalty=1.0,
        eos_token_id=eos_ids or None, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )


@torch.no_grad()
def sample_responses(model, query_ids: torch.Tensor, query_mask: torch.Tensor, gen_config,
                     eos_ids: list[int], synced: bool = False, compiled: bool = False,
                     loop: str = "p3o") -> tuple[torch.Tensor, torch.Tensor]:
    """Batched, KV-cached sampling. (B, Lq) prompts -> response ids and mask (B, T).

    The mask covers tokens up to and including the first EOS (taken from positions, not pad ids).
    Tokens are drawn by inverse CDF (`p3o.rl.sampling`), and a LoRA model samples with its adapters
    merged into copies of its weights, prepacked where bf16 on a CPU (`sampling_weights`): the same
    distributions, faster.
    `synced`: the weights are sharded (FSDP), so every process runs a forward pass per token until
    the last one is done, or the others would wait for it forever.
    `compiled` (`--compile_sampling`): every token after the prompt's runs one `torch.compile`d
    forward over a static KV cache (`compiled_decoding`).
    `loop` (`--decoding_loop`): "p3o" samples Llama-style models on a CPU with p3o's own loop
    (`p3o.rl.decoding`: the same arithmetic, far fewer operations), anything else with `generate`;
    "transformers": `generate` always.
    """
    from transformers import GenerationConfig

    if hasattr(model, "get_base_model"):  # peft: the base model carries the adapters, and the generation config
        model = model.get_base_model()
    # `generate` fills every unset option from the model's own generation_config (a hub model may
    # carry repetition penalties, bad words, top-k ...); a blank one keeps sampling exact.
    from p3o.models.sampling_weights import sampling_weights  # local: they import transformers (and peft),
    from p3o.rl.kv_cache import preallocated_cache  # which p3o --help never needs
    from p3o.rl.sampling import as_inverse_cdf

    capacity = query_ids.shape[1] + gen_config.max_new_tokens
    gen_config, processors = as_inverse_cdf(gen_config)
    if loop == "p3o" and not (compiled or synced):
        from p3o.rl.decoding import fast_decoder

        decoder = fast_decoder(model, gen_config) if bool(query_mask[:, -1].all()) else None  # left padding only
        if decoder is not None:
            response_ids = decoder.sample(query_ids, query_mask, gen_config, processors[0] if processors else None)
            return response_ids, response_mask_from_eos(response_ids, eos_ids)
    cache = None
    if compiled and gen_config.use_cache and not synced:
        cache, gen_config = compiled_decoding(model, capacity, gen_config)
    compiling = cache is not None
    if cache is None and gen_config.use_cache:
        cache = preallocated_cache(model, capacity)
    fast_weights = (sampling_weights(model, prepack=not compiling) if not synced
                    else contextlib.nullcontext())  # sharded: left alone
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with fast_weights:
            out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_config,
                                 logits_processor=processors,
                                 **({"past_key_values": cache} if cache is not None else {}),
                                 **({"synced_gpus": True} if synced else {}))  # (B, Lq+T)
    finally:
        model.generation_config = saved
    response_ids = out[:, query_ids.shape[1]:]  # (B, T)
    return response_ids, response_mask_from_eos(response_ids, eos_ids)


def has_cpp_compiler() -> bool:
    """Whether inductor can build its CPU kernels here: a C++ compiler ($CXX, g++, c++ or clang++)."""
    import os
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def compiled_decoding(model, capacity: int, gen_config):
    """(A static KV cache of at least `capacity` positions, a copy of `gen_config` that makes
    `generate` run each decoding step through one `torch.compile`d forward of `model`); prefill
    stays eager. (None, `gen_config`) where the model has no static cache.

    On CUDA the compiled step is captured as a CUDA graph (mode "reduce-overhead"): one launch per
    token instead of one per kernel. On a CPU, inductor fuses the small element-wise operations
    between the matmuls (norms, rotary embeddings, residuals, casts). The first rollout pays for the
    compilation (tens of seconds on a CPU), and a new batch size or a cache length in a new
    `CAPACITY_STEP` costs another."""
    from transformers.generation.configuration_utils import CompileConfig

    from p3o.rl.kv_cache import static_cache

    cache = static_cache(model, capacity)
    if cache is None:
        return None, gen_config
    mode = "reduce-overhead" if model.device.type == "cuda" else "default"
    compile_config = CompileConfig(fullgraph=False, dynamic=None, mode=mode)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless told
    gen_config = copy.deepcopy(gen_config)
    gen_config.compile_config, gen_config.disable_compile = compile_config, False
    return cache, gen_config


def decode_completions(tokenizer, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                       response_mask: torch.Tensor) -> list[str]:
    """Each response's text as it continues its prompt: prompt + response decoded together, minus
    the prompt's own decoding. Decoding the response alone would drop the space before its first
    word for tokenizers that join words with spaces or mark them with a leading "▁"."""
    prompts = [q[m.bool()].tolist() for q, m in zip(query_ids, query_mask)]
    responses = [r[: int(n)].tolist() for r, n in zip(response_ids, response_mask.sum(-1))]
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    full_texts = tokenizer.batch_decode([p + r for p, r in zip(prompts, responses)], skip_special_tokens=True)
    alone = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [full[len(p):] if full.startswith(p) else a for p, full, a in zip(prompt_texts, full_texts, alone)]


def supports_logits_to_keep(model) -> bool:
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes it through
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def token_logprobs(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, temperature: float = 1.0,
                   logits_to_keep: bool = True) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for every response token (B, T); 0 on padding."""
    return token_logprobs_and_values(model, query_ids, query_mask, response_ids, response_mask, temperature,
                                     logits_to_keep)[0]


def token_logprobs_and_values(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                              response_mask: torch.Tensor, temperature: float = 1.0, logits_to_keep: bool = True,
                              with_values: bool = False, prompt_group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probs (B, T), and with `with_values` (a `PolicyWithValueHead`) the values V(s_t) of
    the states each response token was sampled in (B, T); both 0 on padding. `prompt_group` k > 1:
    rows come in groups of k sharing their prompt, which then runs once (`group_token_logprobs`;
    the engine asks for it where that is exact and pays, `worth_sharing_prompts`).

    Position ids follow the attention mask, as in `generate`, so left padding changes nothing.
    """
    if prompt_group > 1 and not with_values:
        return group_token_logprobs(model, query_ids, query_mask, response_ids, response_mask, temperature,
                                    prompt_group), None
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, Lq+T)
    attention = torch.cat([query_mask, response_mask], dim=1)  # (B, Lq+T)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, Lq+T)
    T = response_ids.shape[1]
    kwargs = {"logits_to_keep": T + 1} if logits_to_keep else {}
    outputs = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False,
                    **kwargs)
    outputs, values = outputs if with_values else (outputs, None)
    logits = outputs.logits[:, -(T + 1):-1]  # (B, T, V): the logits that predicted each response token
    logps = selective_log_softmax(logits, response_ids, temperature)  # (B, T)
    mask = response_mask.bool()
    if values is not None:
        values = torch.where(mask, values[:, -(T + 1):-1], torch.zeros_like(logps))  # (B, T)
    return torch.where(mask, logps, torch.zeros_like(logps)), values


def batched_token_logprobs(model, rollout: Rollout, temperature: float, batch_size: int,
                           logits_to_keep: bool = True) -> torch.Tensor:
    """`token_logprobs` without gradient over the whole rollout, `batch_size` sequences at a time (B, T)."""
    return batched_logprobs_and_values(model, rollout, temperature, batch_size, logits_to_keep)[0]


@torch.no_grad()
def batched_logprobs_and_values(model, rollout: Rollout, temperature: float, batch_size: int,
                                logits_to_keep: bool = True, with_values: bool = False,
                                prompt_group: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs_and_values` without gradient over the whole rollout, `batch_size` sequences
    at a time (a multiple of `prompt_group`)."""
    tokens = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)  # (B, ...) each
    B = rollout.query_ids.shape[0]
    parts = [token_logprobs_and_values(model, *(t[i:i + batch_size] for t in tokens), temperature,
                                       logits_to_keep, with_values, prompt_group)
             for i in range(0, B, batch_size)]
    logps = torch.cat([p[0] for p in parts])  # (B, T)
    return logps, (torch.cat([p[1] for p in parts]) if with_values else None)


def pad_responses(responses: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Given responses (token lists) -> right-padded ids and mask (B, T), as `sample_responses` makes."""
    T = max(1, max(len(r) for r in responses))
    ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in responses])  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in responses])  # (B, T)
    return ids, mask


def sequence_logprobs(token_logps: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """l(y) = sum over response tokens of log pi(y_t | ...): (B, T) -> (B,)."""
    return masked_sum(token_logps, response_mask, dim=-1)


# Architectures whose positions come from `position_ids` (rotary or learned absolute) and whose
# attention honours a custom 4D mask (checked against two separate forwards, tests/test_families.py);
# others (state-space, linear attention) would leak y1 into y2 or crash, so their pairs run as two
# sequences. The position scheme decides within an architecture: Falcon may use ALiBi instead.
PACKABLE_MODEL_TYPES = {"llama", "gpt2", "gpt_neox", "phi3", "opt", "falcon", "mistral", "qwen2", "qwen3"}


def shares_prompt_forward(model, packed_length: int | None = None) -> bool:
    """Whether `group_token_logprobs` is exact on `model` for packed sequences of up to `packed_length`
    tokens (prompt + k responses): positions from `position_ids` (a packable architecture, no ALiBi:
    its biases follow the mask's token count, not the positions given), attention that sees every
    earlier token (no sliding window, or one at least `packed_length` wide: Phi-3 ships 2047), and an
    attention that takes a custom 4D mask."""
    config = _config_of(model)
    layer_types = getattr(config, "layer_types", None)
    windowed = (any(t != "full_attention" for t in layer_types) if layer_types
                else getattr(config, "sliding_window", None) is not None)
    window = getattr(config, "sliding_window", None)
    full_attention = not windowed or (window is not None and packed_length is not None and packed_length <= window)
    return (getattr(config, "model_type", None) in PACKABLE_MODEL_TYPES and not uses_alibi(config)
            and full_attention and getattr(config, "_attn_implementation", None) in ("sdpa", "eager"))


def uses_alibi(config) -> bool:
    """ALiBi attention biases (Falcon's `alibi`, MPT's `attn_config.alibi`, BLOOM) instead of positions."""
    attn_config = getattr(config, "attn_config", None)
    return (bool(getattr(config, "alibi", False)) or bool(getattr(attn_config, "alibi", False))
            or getattr(config, "model_type", None) == "bloom")


def _config_of(model):
    """The model config through a DDP/FSDP wrapper (`.module`) or a peft/reference wrapper."""
    return getattr(getattr(model, "module", model), "config", None)


def group_token_logprobs(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                         response_mask: torch.Tensor, temperature: float = 1.0, k: int = 2) -> torch.Tensor:
    """`token_logprobs` for groups of k rows sharing a prompt (rows k*g .. k*g+k-1), with the prompt
    run once: one sequence [prompt, y1, ..., yk] per group, each response attending to the prompt
    and to itself, never to another response, at the positions it would have alone. The same
    log-probs (up to float rounding) from Lq + kT tokens instead of k(Lq + T). (B, Lq), (B, T) ->
    (B, T); 0 on padding."""
    B, T = response_ids.shape
    query, prompt_mask = query_ids[::k], query_mask[::k]  # (G, Lq)
    G, Lq = query.shape
    L, device = Lq + k * T, query.device
    input_ids = torch.cat([query, response_ids.reshape(G, k * T)], dim=1)  # (G, L)
    real = torch.cat([prompt_mask, response_mask.reshape(G, k * T)], dim=1).bool()  # (G, L)
    steps = torch.arange(T, device=device).repeat(k)  # (kT,)
    position_ids = torch.cat([(prompt_mask.cumsum(-1) - 1).clamp(min=0),
                              prompt_mask.sum(-1, keepdim=True) + steps], dim=1)  # (G, L)
    block = torch.cat([torch.full((Lq,), -1, device=device), torch.arange(k, device=device).repeat_interleave(T)])
    visible = ((block[None, :] == -1) | (block[:, None] == block[None, :])) & torch.ones(L, L, dtype=torch.bool,
                                                                                          device=device).tril()
    allowed = (visible[None] & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)  # (G, L, L)
    mask = allowed[:, None]  # (G, 1, L, L); a padding row sees itself only, so no row is empty
    if _config_of(model)._attn_implementation == "eager":  # eager attention adds the mask to its scores
        mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    # Response i's first token is predicted at the prompt's end (Lq-1), its token t > 0 at Lq+iT+t-1.
    keep = torch.cat([torch.cat([torch.tensor([Lq - 1]), torch.arange(Lq + i * T, Lq + (i + 1) * T - 1)])
                      for i in range(k)]).to(device)  # (kT,)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=keep).logits  # (G, kT, V)
    logps = selective_log_softmax(logits, input_ids[:, Lq:], temperature).reshape(B, T)  # (B, T)
    return torch.where(response_mask.bool(), logps, torch.zeros_like(logps))


ATTENTION_ENTRY_COST = 2.5  # one attention entry, in h multiply-adds of a layer's weights (worth_sharing_prompts)


def worth_sharing_prompts(k: int, prompt_length: int, response_length: int, width: float) -> bool:
    """Whether running each group's k responses as one [prompt, y1, ..., yk] sequence is cheaper
    than k sequences [prompt, y_i] (Lq, T: the batch's padded prompt and response lengths).

    Packing saves (k-1) Lq tokens' pass through every layer's weights, `width` * h multiply-adds a
    token (`layer_width`), and adds (Lq + kT)^2 - k(Lq + T)^2 attention entries, each 2h
    multiply-adds on paper (QK^T and PV). Measured forward and backward on CPU Llamas of width 128
    and 320 in float32, an entry cost as much as 1.2 to 2.3 h of the weights' multiply-adds (by the
    break-even of packed against separate); this takes 2.5, so that what it packs pays: GRPO on the
    1M benchmark model (k 4, Lq 16, T 32) ran 1.23x faster packed, and with T 96 (0.87x) stays apart.
    """
    if k < 2:
        return False
    saved_tokens = (k - 1) * prompt_length
    extra_entries = (prompt_length + k * response_length) ** 2 - k * (prompt_length + response_length) ** 2
    return saved_tokens * width >= ATTENTION_ENTRY_COST * extra_entries


def layer_width(model) -> float:
    """A decoder layer's weights over the hidden size, W / h: one token's multiply-adds in a layer,
    per unit of h (2h + 2 h_kv + 3ff for a Llama, h_kv the keys' and values' width: 1,280 for the
    1M benchmark model, 6,144 for SmolLM2-135M; its norms add a few).
    Counted from the parameters, less the embedding and output matrices (a packed group computes
    the same logits); 0 (never packed) where the config names no layer count or hidden size."""
    config = _config_of(model)
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not layers or not hidden:
        return 0.0
    counted = {id(p): p.numel() for p in model.parameters()}
    for matrix in (model.get_input_embeddings(), model.get_output_embeddings()):
        if matrix is not None:
            counted.pop(id(matrix.weight), None)
    return sum(counted.values()) / layers / hidden
