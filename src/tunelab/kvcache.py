"""A decode cache allocated once: keys/values written in place instead of a ``torch.cat`` per layer per step.

transformers' ``DynamicLayer`` grows by concatenation, so every decode step copies the whole cache of every
layer (B x heads x T x head_dim, keys and values): at batch 64 and ~150 cached tokens that is as many
bytes as the fp32 weights themselves, and virtual tokens (prompt/prefix tuning) lengthen every copy.
``preallocate`` moves each layer of a prefilled cache into a buffer with room for the tokens still to come;
``update`` then writes one column and returns views of the filled part, which hold the same values as the
concatenated tensors (so attention computes the same numbers).

Unlike transformers' ``StaticCache`` this keeps the dynamic cache's interface (no cache_position, masks
sized to the filled length), so the one generation path and its left-padded batch caches are unchanged.

Sliding-window layers (Gemma 3's ``DynamicSlidingWindowLayer``, holding only the last ``window - 1`` columns) become
``PreallocatedLayer``s of the full length too, their held columns right-aligned and the dropped ones zero: every layer
then has the mask's width, a query at column c attends columns > c - window (transformers' sliding mask, which
counts columns; ``inference.torch_step`` slices them), and the zero columns lie outside every later window.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in a buffer of ``capacity`` positions, filled from the left.

    ``keys`` / ``values`` are views of the filled positions, made when read (a decode step that writes the
    buffers directly only counts ``length`` up); assigning them replaces the buffers (``precision.cast_cache``).
    ``window``: from a sliding-window layer of that window, whose columns before its last ``window - 1`` at
    conversion are zeros (None: every column is held)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, length: int | None = None,
                 window: int | None = None) -> None:
        super().__init__()
        batch, heads, held, _ = keys.shape
        length = held if length is None else length  # the held columns are the last ``held`` of ``length``
        self._keys = keys.new_empty(batch, heads, max(capacity, length), keys.shape[-1])
        self._values = values.new_empty(batch, heads, max(capacity, length), values.shape[-1])
        for buf, src in ((self._keys, keys), (self._values, values)):
            buf[:, :, :length - held].zero_()  # masked, but a 0 weight times uninitialised NaN would still be NaN
            buf[:, :, length - held:length].copy_(src)
        self.length, self.device, self.dtype, self.is_initialized = length, keys.device, keys.dtype, True
        self.window = window

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


def _columns(layer) -> int | None:
    """How many columns (mask width) a prefilled layer has seen; None for a layer ``preallocate`` does not convert."""
    keys = getattr(layer, "keys", None)
    if keys is None:
        return None
    if type(layer) is DynamicLayer:
        return int(keys.shape[-2])
    # a sliding layer holds the last min(seen, window - 1) columns; recording the past, it holds more until a crop
    if type(layer) is DynamicSlidingWindowLayer and not getattr(layer, "record_past", False):
        return int(layer.cumulative_length)
    return None


def preallocate(cache, extra: int):
    """``cache`` (a prefilled transformers ``DynamicCache``: full-attention and sliding-window layers) with room
    for ``extra`` more tokens per layer; a cache already pre-allocated is kept (with at least that room)."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is PreallocatedLayer for layer in layers):
        for layer in layers:
            layer.reserve(extra)
        return cache
    seen = {_columns(layer) for layer in layers or ()}
    if not layers or None in seen or len(seen) != 1:
        return cache  # other layer kinds, or layers disagreeing on the length: the cache as transformers built it
    length = seen.pop()
    assert length is not None
    cache.layers = [PreallocatedLayer(layer.keys, layer.values, length + extra, length,
                                      getattr(layer, "sliding_window", None)) for layer in layers]
    return cache
