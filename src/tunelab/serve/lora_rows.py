"""LoRA rows in the shared batch: many LoRA adapters applied per row on the one frozen base model.

The batched-gather design of Punica (Chen et al. 2023, "BGMV") and S-LoRA (Sheng et al. 2023, Sec. 5):
for every target ``nn.Linear`` of the loaded LoRA adapters keep the factors of all slots stacked,

    A: (n_slots, r_max, in)    B: (n_slots, out, r_max)    scale: (n_slots,)

(ranks zero-padded to ``r_max``; slot 0 all zeros, for rows without LoRA), and let a forward hook on that
module add, for the row slot index ``s`` (B,) of the batch being run (``inference.rows.row_slots``),

    y += scale[s] * bmm(bmm(x, A[s]^T), B[s]^T)        x: (B, T, in), y: (B, T, out)

One gather and two small batched matmuls per target module, whatever the mix of adapters (peft's mixed
``adapter_names=`` batches loop over adapters inside every module). The scale is applied after the product,
as peft's LoRA layer does, so a row's output rounds as in offline `tunelab eval`. When no row of a batch
has a slot the hooks return at once: batches without LoRA rows pay nothing.

A slot is taken per LoRA adapter when its first row is admitted and kept, least recently used first out,
up to ``capacity``; a slot some running row still uses is never evicted (its request waits instead).
All slot writes happen on the thread that runs the forwards (the scheduler or the static batcher).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.inference.rows import current_row_slots, register_row_deltas
from tunelab.methods.base import LowRankDelta


@dataclass
class _Stack:
    """The stacked factors of one target module (shapes in the module docstring)."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass
class _Slot:
    index: int
    delta: LowRankDelta
    users: int = 0  # running rows on this slot


@dataclass
class LoraSlotStats:
    """Counters for /health, tests and the benchmark."""

    loads: int = 0  # adapters written into a slot
    evictions: int = 0
    waits: int = 0  # admissions deferred because every slot was in use


class LoraSlots:
    """Up to ``capacity`` LoRA adapters stacked on the target modules of ``model`` (which stays frozen)."""

    def __init__(self, model: nn.Module, capacity: int) -> None:
        self.model, self.capacity = model, max(1, capacity)
        self.stats = LoraSlotStats()
        self._modules = dict(model.named_modules())
        self._stacks: dict[str, _Stack] = {}
        self._scale = torch.zeros(1)  # (n_slots,)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # adapter name -> slot, least recent first
        self._lock = threading.Lock()
        register_row_deltas(model, self)  # the fast decode steps add the same deltas (inference.steps)

    # --- slots ---------------------------------------------------------------------------------------
    def acquire(self, name: str, delta: LowRankDelta) -> int | None:
        """The slot holding ``delta`` for one more running row (loading it, evicting the least recently used
        idle slot if needed); None when every slot is in use by running rows (try again later)."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None and slot.delta is not delta:  # the registry reloaded it: new tensors
                if slot.users:
                    return None
                self._clear(slot.index)
                del self._slots[name]
                slot = None
            if slot is None:
                index = self._free_index()
                if index is None:
                    self.stats.waits += 1
                    return None
                slot = _Slot(index, delta)
                self._write(index, delta)
                self._slots[name] = slot
            self._slots.move_to_end(name)
            slot.users += 1
            return slot.index

    def release(self, index: int) -> None:
        """One running row on slot ``index`` finished."""
        with self._lock:
            for slot in self._slots.values():
                if slot.index == index:
                    slot.users = max(0, slot.users - 1)
                    return

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def nbytes(self) -> int:
        """Bytes of the stacked factors (all slots, zero padding included)."""
        return sum(s.a.numel() * s.a.element_size() + s.b.numel() * s.b.element_size() for s in self._stacks.values())

    def _free_index(self) -> int | None:
        used = {s.index for s in self._slots.values()}
        free = next((i for i in range(1, self.capacity + 1) if i not in used), None)
        if free is not None:
            return free
        idle = next((n for n, s in self._slots.items() if s.users == 0), None)  # least recently used first
        if idle is None:
            return None
        index = self._slots.pop(idle).index
        self._clear(index)
        self.stats.evictions += 1
        return index

    # --- the stacks ----------------------------------------------------------------------------------
    def _write(self, index: int, delta: LowRankDelta) -> None:
        self._ensure_slots(index)
        for name, (a, b) in delta.factors.items():
            stack = self._stack(name, a.shape[0])
            stack.a[index, : a.shape[0]] = a.to(stack.a)
            stack.b[index, :, : b.shape[1]] = b.to(stack.b)
        self._scale[index] = delta.scaling
        self.stats.loads += 1

    def _clear(self, index: int) -> None:
        for stack in self._stacks.values():
            stack.a[index].zero_()
            stack.b[index].zero_()
        self._scale[index] = 0.0

    def _ensure_slots(self, index: int) -> None:
        """Every stack holds slots 0..index (grown by doubling, up to ``capacity`` + 1)."""
        n = self._scale.shape[0]
        if index < n:
            return
        n = min(self.capacity + 1, max(index + 1, 2 * n))
        self._scale = _grown(self._scale, (n,))
        for stack in self._stacks.values():
            stack.a = _grown(stack.a, (n, *stack.a.shape[1:]))
            stack.b = _grown(stack.b, (n, *stack.b.shape[1:]))

    def _stack(self, name: str, rank: int) -> _Stack:
        """The stack of module ``name`` with room for rank ``rank`` (created and hooked on first use)."""
        module = self._modules.get(name)
        if not isinstance(module, nn.Linear):
            raise TunelabError(f"LoRA target {name!r} is not a Linear module of the served base model; "
                               "was the adapter trained on another architecture?")
        n, stack = self._scale.shape[0], self._stacks.get(name)
        if stack is None:
            weight = module.weight
            stack = _Stack(weight.new_zeros(n, rank, module.in_features), weight.new_zeros(n, module.out_features, rank))
            self._stacks[name] = stack
            module.register_forward_hook(self._hook(name))
        if rank > stack.a.shape[1]:  # a larger rank than any before: zero-pad the others
            stack.a = _grown(stack.a, (n, rank, module.in_features))
            stack.b = _grown(stack.b, (n, module.out_features, rank))
        return stack

    def delta(self, name: str, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
        """``scale[s] * (x A[s]^T) B[s]^T`` of module ``name`` for input ``x`` (B, T, in) and the rows' ``slots``
        ((B,), or one 0-dim slot for every row); None when no loaded adapter targets ``name``. The one formula
        of the module hooks and of the lean decode step (``inference.steps``, ``inference.rows.row_deltas``)."""
        stack = self._stacks.get(name)
        if stack is None:
            return None
        if slots.dim() == 0:  # one slot for every row: the two matmuls of peft's LoRA layer
            a, b = stack.a[slots].to(x.dtype), stack.b[slots].to(x.dtype)
            return (x @ a.T @ b.T) * self._scale[slots].to(x.dtype)
        a = stack.a.index_select(0, slots).to(x.dtype)  # (B, r, in)
        b = stack.b.index_select(0, slots).to(x.dtype)  # (B, out, r)
        scale = self._scale.index_select(0, slots).to(x.dtype)[:, None, None]  # (B, 1, 1)
        return torch.bmm(torch.bmm(x, a.mT), b.mT) * scale  # (B, T, out)

    def _hook(self, name: str):
        def add_delta(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            slots = current_row_slots()
            if slots is None:  # no LoRA row in this batch (or a forward outside the server)
                return None
            delta = self.delta(name, args[0], slots)
            return None if delta is None else output + delta

        return add_delta


def _grown(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` zero-padded at the end of each dimension to ``shape`` (itself when it already fits)."""
    if tuple(t.shape) == shape:
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out
