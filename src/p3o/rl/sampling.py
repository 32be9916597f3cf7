"""Drawing each next token by inverse CDF instead of `torch.multinomial`.

`generate`'s sampling calls `torch.multinomial(probs, 1)`, which on a CPU draws an exponential random
number for every vocabulary entry of every row (49k x 16 per token on SmolLM2: about a seventh of
sampling's time there). One uniform number per row against the cumulative distribution draws from
the same distribution: token i is taken when u falls in [F(i-1), F(i)), which has probability p_i.
The cumulative sum is taken in float64, so its rounding (about 1e-16 per entry) is far below any
probability that matters. Imported when sampling starts (it subclasses a `transformers` class).

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
        scores = self.warpers(input_ids, scores)
        tokens = draw(torch.softmax(scores.float(), dim=-1))  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (B, V), by inverse CDF with the global generator: (B, 1)."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (B, V)
    total = cdf[:, -1:]  # (B, 1), 1 up to rounding
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total  # (B, 1) in [0, total)
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)  # (B, 1): first i with F(i) > u
    # u can round up to `total` (then searchsorted says V): take the last token of positive
    # probability, never a masked one.
    if (probs.gather(1, tokens) == 0).any():
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1, keepdim=True)  # (B, 1)
        tokens = torch.minimum(tokens, last)
    return tokens


def as_inverse_cdf(gen_config) -> tuple[object, LogitsProcessorList | None]:
    """A sampling `GenerationConfig` -> (the greedy config, [InverseCdfSampler]) that samples the same
    distribution; any other config is returned as it is, with no processor."""
    if not gen_config.do_sample or (gen_config.num_beams or 1) > 1:
        return gen_config, None
    sampler = InverseCdfSampler(gen_config.temperature, gen_config.top_k, gen_config.top_p)
    greedy = copy.deepcopy(gen_config)
    greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p = False, None, None, None
    return greedy, LogitsProcessorList([sampler])
