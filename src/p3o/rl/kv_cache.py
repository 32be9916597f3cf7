"""KV caches for sampling.

* `preallocated_cache` writes each new token into buffers sized for the whole response, instead of
  `DynamicCache`'s concatenation, which copies the entire cache at every token of every layer:
  O(T^2) copying per response, and on a CPU the largest single cost of generating. Under autocast
  it holds keys and values in autocast's dtype (`storage_dtype`).
* `static_cache` is `transformers`' `StaticCache` for a compiled decoding step (`--compile_sampling`):
  fixed shapes, so one compiled graph serves every token.

Imported when sampling starts (they subclass `transformers` classes)."""
from __future__ import annotations

import math

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

CAPACITY_STEP = 16  # a static cache's length is rounded up to this: prompts of similar lengths share a compiled graph


def preallocated_cache(model, capacity: int):
    """A `DynamicCache` for `model` whose layers hold `capacity` positions up front. None unless
    every layer is a plain full-attention one: `generate` then builds the cache the model needs."""
    cache = _full_attention_cache(model)
    if cache is not None:
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def supports_static_cache(model) -> bool:
    """Whether `static_cache` (and so a compiled decoding step) can serve `model`."""
    return _full_attention_cache(model) is not None


def static_cache(model, capacity: int):
    """A `StaticCache` of at least `capacity` positions (rounded up to CAPACITY_STEP) whose layers
    store keys and values in the autocast dtype; None where `preallocated_cache` is None."""
    if not supports_static_cache(model):
        return None
    length = math.ceil(capacity / CAPACITY_STEP) * CAPACITY_STEP
    cache = StaticCache(config=model.config, max_cache_len=length)
    cache.layers = [AutocastStaticLayer(length) for _ in cache.layers]
    return cache


def _full_attention_cache(model):
    """An empty `DynamicCache` for `model` if every layer is a plain full-attention one, else None."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is None or not supports() or getattr(model.config, "is_encoder_decoder", False):
        return None  # an architecture with a cache of its own (state-space, encoder-decoder, ...)
    try:
        cache = DynamicCache(config=model.config)
    except Exception:
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding windows, linear attention, ...: `generate` builds the cache it needs
    return cache


def storage_dtype(key_states: torch.Tensor) -> torch.dtype:
    """The dtype a cache holds keys and values in: autocast's where it is on, else the keys' own.
    Under bf16 autocast, rotary embeddings leave the keys in float32 (and the values in bf16), and
    attention casts both to bf16 at every token: stored in bf16, the whole cache is not cast again
    at each token of each layer, and attention gets the same numbers."""
    device = key_states.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else key_states.dtype


class AutocastStaticLayer(StaticLayer):
    """A `StaticLayer` holding keys and values in `storage_dtype` (a `StaticLayer` holds both in the
    first key's dtype, and refuses bf16 values beside float32 keys)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        dtype = storage_dtype(key_states)
        return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)


class PreallocatedLayer(DynamicLayer):
    """keys/values are views of (B, H, capacity, D) buffers; a token is written, never copied again.
    Anything that replaces the views (beam reordering, cropping) falls back to concatenation."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.key_buffer = self.value_buffer = self.view = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = storage_dtype(key_states), key_states.device
        B, H, _, _ = key_states.shape
        self.key_buffer = key_states.new_empty(B, H, self.capacity, key_states.shape[-1], dtype=self.dtype)
        self.value_buffer = value_states.new_empty(B, H, self.capacity, value_states.shape[-1], dtype=self.dtype)
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.view = self.keys  # replaced by anything but `update`: then the buffers are stale
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        if end > self.capacity or self.keys is not self.view or key_states.shape[0] != self.key_buffer.shape[0]:
            return super().update(key_states, value_states)
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        self.view = self.keys
        return self.keys, self.values
