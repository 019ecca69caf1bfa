"""A decode cache allocated once: keys/values written in place instead of a ``torch.cat`` per layer per step.

transformers' ``DynamicLayer`` grows by concatenation, so every decode step copies the whole cache of every
layer (B x heads x T x head_dim, keys and values): at batch 64 and ~150 cached tokens that is as many
bytes as the fp32 weights themselves, and virtual tokens (prompt/prefix tuning) lengthen every copy.
``preallocate`` moves each layer of a prefilled cache into a buffer with room for the tokens still to come;
``update`` then writes one column and returns views of the filled part, which hold the same values as the
concatenated tensors (so attention computes the same numbers).

Unlike transformers' ``StaticCache`` this keeps the dynamic cache's interface (no cache_position, masks
sized to the filled length), so the one generation path and its left-padded batch caches are unchanged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in a buffer of ``capacity`` positions, filled from the left.

    ``keys`` / ``values`` are views of the filled positions, made when read (a decode step that writes the
    buffers directly only counts ``length`` up); assigning them replaces the buffers (``precision.cast_cache``)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        batch, heads, length, _ = keys.shape
        self._keys = keys.new_empty(batch, heads, max(capacity, length), keys.shape[-1])
        self._values = values.new_empty(batch, heads, max(capacity, length), values.shape[-1])
        self._keys[:, :, :length].copy_(keys)
        self._values[:, :, :length].copy_(values)
        self.length, self.device, self.dtype, self.is_initialized = length, keys.device, keys.dtype, True

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return self._keys[:, :, :self.length] if "_keys" in self.__dict__ else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:  # None: DynamicLayer.__init__, before the buffers exist
            self._keys, self.length, self.dtype = value.contiguous(), value.shape[-2], value.dtype

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return self._values[:, :, :self.length] if "_values" in self.__dict__ else None

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            self._values, self.length = value.contiguous(), value.shape[-2]

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more positions; when full, grow by at least the filled length (amortised copies)."""
        end = self.length + extra
        if end > self._keys.shape[-2]:
            capacity = max(end, 2 * self.length, 64)
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :self.length].copy_(old[:, :, :self.length])
                setattr(self, name, new)

    def advance(self, extra: int) -> None:
        """Count ``extra`` positions written into the buffers directly (``inference.torch_step``, ``native.llama``)."""
        self.length += extra

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        self.reserve(n)
        self._keys[:, :, self.length:self.length + n].copy_(key_states)
        self._values[:, :, self.length:self.length + n].copy_(value_states)
        self.advance(n)
        return self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length


def preallocate(cache, extra: int):
    """``cache`` (a prefilled transformers ``DynamicCache``) with room for ``extra`` more tokens per layer;
    a cache already pre-allocated is kept (with at least that room)."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is PreallocatedLayer for layer in layers):
        for layer in layers:
            layer.reserve(extra)
        return cache
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
        return cache  # sliding-window or other layer kinds: keep the cache as transformers built it
    cache.layers = [PreallocatedLayer(layer.keys, layer.values, layer.keys.shape[-2] + extra) for layer in layers]
    return cache
