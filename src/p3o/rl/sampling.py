"""Drawing each next token by inverse CDF instead of `torch.multinomial`.

`generate`'s sampling calls `torch.multinomial(probs, 1)`, which on a CPU draws an exponential random
number for every vocabulary entry of every row (49k x 16 per token on SmolLM2: about a seventh of
sampling's time there). One uniform number per row against the cumulative distribution draws from
the same distribution: token i is taken when u falls in [F(i-1), F(i)), which has probability p_i.
The cumulative sums are taken in float64, so their rounding (about 1e-16 per entry) is far below
any probability that matters. Imported when sampling starts (it subclasses a `transformers` class).

`generate` runs greedy decoding with `InverseCdfSampler` as its one logits processor: the processor
applies the same temperature, top-k and top-p warpers `generate` would, draws the token, and leaves
it the only finite score, so the greedy step's argmax takes it.
"""
from __future__ import annotations

import copy

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


class InverseCdfSampler(LogitsProcessor):
    """Scores (B, V) -> (B, V) with one finite entry per row: a token drawn from the warped softmax."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
        # The warpers `generate` adds when sampling, in its order (`_get_logits_processor`).
        self.warpers = LogitsProcessorList()
        if temperature is not None and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = self.next_tokens(scores, input_ids)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)

    def next_tokens(self, scores: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B, V) -> the drawn tokens (B, 1). The warpers read only the scores."""
        return draw(torch.softmax(self.warpers(input_ids, scores).float(), dim=-1))


BLOCK = 1024  # vocabulary entries per block of the two-level draw


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (B, V), by inverse CDF with the global generator: (B, 1).

    In two levels, so no cumulative sum runs over the whole vocabulary (a float64 one over 49k
    entries cost 9 ms a token, as much as three of SmolLM2's layers): u ~ U[0, S) picks the block
    whose cumulative mass first exceeds it, and u minus the mass before that block, uniform over
    the block's own mass, picks the token within it. The same distribution as one cumulative sum."""
    B, V = probs.shape
    size = min(BLOCK, V)
    full = V - V % size
    mass = probs[:, :full].reshape(B, -1, size).sum(-1, dtype=torch.float64)  # (B, V // size)
    if full < V:
        mass = torch.cat([mass, probs[:, full:].sum(-1, keepdim=True, dtype=torch.float64)], dim=1)  # (B, nb)
    cdf = mass.cumsum(dim=-1)  # (B, nb)
    if not torch.isfinite(cdf[:, -1]).all():  # torch.multinomial refuses these too
        raise FloatingPointError("the policy's next-token probabilities are not finite (NaN or inf): its weights "
                                 "have diverged; lower --learning_rate or resume from an earlier checkpoint")
    u = torch.rand((B, 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]  # (B, 1) in [0, S)
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # (B, 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(u))  # (B, 1)
    index = block * size + torch.arange(size, device=probs.device)  # (B, size)
    inside = torch.where(index < V, probs.gather(1, index.clamp(max=V - 1)), 0.0)  # (B, size)
    within = torch.searchsorted(inside.cumsum(-1, dtype=torch.float64), u - before, right=True)  # (B, 1)
    tokens = (block * size + within.clamp_(max=size - 1)).clamp_(max=V - 1)  # (B, 1)
    # Rounding can put u at the very end of a block, or of the whole mass, where the entries may be
    # masked: such a row (probability about 1e-16 a draw) is drawn again with one cumulative sum.
    wrong = (probs.gather(1, tokens) == 0).flatten()
    if wrong.any():
        tokens[wrong] = _draw_with_one_cumsum(probs[wrong])
    return tokens


def _draw_with_one_cumsum(probs: torch.Tensor) -> torch.Tensor:
    """`draw` with one float64 cumulative sum over the vocabulary, never a masked token: (B, 1)."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (B, V)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)  # (B, 1): first i with F(i) > u
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1, keepdim=True)  # last positive entry
    return torch.minimum(tokens, last)


def as_inverse_cdf(gen_config) -> tuple[object, LogitsProcessorList | None]:
    """A sampling `GenerationConfig` -> (the greedy config, [InverseCdfSampler]) that samples the same
    distribution; any other config is returned as it is, with no processor."""
    if not gen_config.do_sample or (gen_config.num_beams or 1) > 1:
        return gen_config, None
    sampler = InverseCdfSampler(gen_config.temperature, gen_config.top_k, gen_config.top_p)
    greedy = copy.deepcopy(gen_config)
    greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p = False, None, None, None
    return greedy, LogitsProcessorList([sampler])
