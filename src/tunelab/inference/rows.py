"""Per-row weight deltas in a shared batch (serve's LoRA rows, ``serve.lora_rows``): which slot each row of the
forward running now uses (``row_slots``), and who computes a projection's delta for a model (``RowDeltas``,
registered per model), so that a decode step that reads the weights directly (``inference.torch_step``,
``native.llama``) adds the same deltas as the module hooks of the transformers forward.

Serving state, kept out of the core forward (``modeling``): a model without registered deltas has none.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator
from typing import Protocol

import torch

_ROW_SLOTS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("tunelab_row_slots", default=None)


@contextlib.contextmanager
def row_slots(slots: torch.Tensor | None) -> Iterator[None]:
    """The weight-delta slot of each row, (B,) long (0 = none), or one slot for every row (a 0-dim tensor),
    for the forwards run inside; ``serve.lora_rows`` hooks read it. None (the default): no row has a delta."""
    token = _ROW_SLOTS.set(slots)
    try:
        yield
    finally:
        _ROW_SLOTS.reset(token)


def current_row_slots() -> torch.Tensor | None:
    """The slots ``row_slots`` set for the forward running now (None outside one)."""
    return _ROW_SLOTS.get()


class RowDeltas(Protocol):
    """What adds the per-row weight deltas of ``row_slots`` to a projection's output (``serve.lora_rows``)."""

    def delta(self, name: str, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
        """The delta to add to module ``name``'s output for input ``x`` (B, T, in) and ``slots``; None when
        ``name`` has none."""
        ...


_ROW_DELTAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its RowDeltas


def register_row_deltas(model, deltas: RowDeltas) -> None:
    """Declare where the per-row deltas of ``model``'s projections come from, so that a forward which reads
    the weights directly (``inference.torch_step.step``, ``native.llama.step``) can add them as the module hooks do."""
    _ROW_DELTAS[model] = deltas


def row_deltas(model) -> RowDeltas | None:
    """The ``RowDeltas`` registered for ``model`` (None: its per-row deltas live only in module hooks)."""
    return _ROW_DELTAS.get(model)
