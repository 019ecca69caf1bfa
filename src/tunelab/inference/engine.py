"""The inference engine: one prefill, one decode step, a batch state that rows join and leave, and the offline loop.

A row is (adapter, prompt ids): its adapter brings its per-row state -- virtual-token or prefix key/values
(``modeling.virtual_kv``, computed once per adapter), a LoRA slot (``inference.rows``), demonstrations already in
the ids. ``prefill`` runs new rows into a ``BatchState`` (each row after its own prefix, left-padded; attention per
row, ``rowattention.exact_rows``, so a row gets the bits it gets alone); ``decode_step`` feeds one token per row
through the step ``inference.steps.choose`` picks; ``join`` / ``leave`` add and drop rows between steps.
``Batch`` holds one running ``BatchState`` with its model and precision: ``admit`` / ``keep`` / ``step``.

- Offline (``Engine.run``, behind ``tunelab.generate.generate``): rows are grouped by the weights they run on
  (``batch_key``), sorted by length, and each static batch is submitted and run to completion: finished rows stay
  masked in the batch (their pad tokens attend nothing), one generator per batch draws sampled tokens.
- Online (``tunelab.serve.scheduler``): rows join a running batch after their prefill and leave when they finish;
  each row samples from its own generator.

Precision per phase (``tunelab.precision``: the prefill in one dtype, decode in another, the cache cast between) is
applied here and only here (``Batch``: ``prefill_phase`` / ``decode_phase`` / ``to_decode``), for eval and serve alike.
Greedy output equals generating each row alone, for every method, because positions come from the attention mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab import kvcache, precision
from tunelab.inference import steps
from tunelab.inference.rows import row_slots
from tunelab.inference.sampling import GenerationConfig, cut_at_stop, eos_ids, next_tokens, stop_checker
from tunelab.modeling import (
    PrefixKV,
    _decoder_and_head,
    batch_cache,
    cache_kwargs,
    cache_tensors,
    extend_kv,
    hidden_states,
    mask_for,
    merge_rows,
    output_cache,
    pad_batch,
    positions_from_mask,
    select_rows,
    virtual_kv,
)
from tunelab.rowattention import exact_rows

Row = tuple[Any, list[int]]  # (adapter, prompt ids)


@dataclass
class BatchState:
    """Rows after prefill or a decode step: their cache, attention mask (B, L), next positions (B,) and last
    logits (B, V); ``slots`` (B,) each row's LoRA slot (``serve.lora_rows``), None when no row has one;
    ``step``: the decode step that produced ``logits`` (``steps.BACKENDS``; "prefill" right after prefill)."""

    cache: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    logits: torch.Tensor
    slots: torch.Tensor | None = None
    step: str = "prefill"


def batch_key(adapter) -> int:
    """Rows may share a batch when they run on the same weights: adapters whose method leaves the base
    weights alone (``Capabilities.changes_weights`` false: prompt/prefix tuning, P-tuning, IPT, ICL,
    discrete prompts) share their base model object; adapters that change weights batch alone."""
    return id(adapter) if adapter.capabilities.changes_weights else id(adapter.model)


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def _slots(slots: torch.Tensor | None):
    """``rows.row_slots(slots)`` when rows carry slots; else the caller's (the static batcher sets one slot for
    every row of a call around ``Engine.run``)."""
    return contextlib.nullcontext() if slots is None else row_slots(slots)


def _slot_tensor(slots: Sequence[int] | torch.Tensor | None, device) -> torch.Tensor | None:
    """(B,) long slots on ``device``, or None when no row has a slot (so LoRA hooks do nothing)."""
    if slots is None:
        return None
    t = torch.as_tensor(slots, dtype=torch.long).to(device)
    return t if bool(t.any()) else None


# --- precision per phase -------------------------------------------------------------------------------------


@contextlib.contextmanager
def prefill_phase(model, phases: precision.PhasePrecision) -> Iterator[None]:
    """Run the prefill forwards inside with the weights in the prefill phase's dtype."""
    with precision.weights_in(model, phases.prefill_dtype):
        yield


@contextlib.contextmanager
def decode_phase(model, phases: precision.PhasePrecision) -> Iterator[None]:
    """Run decode steps inside with the weights in the decode phase's dtype."""
    with precision.weights_in(model, phases.decode_dtype):
        yield


def to_decode(state: BatchState, phases: precision.PhasePrecision) -> BatchState:
    """A prefilled state ready for the decode phase: its cache cast to the decode dtype (in place)."""
    if phases.decode != phases.prefill:
        precision.cast_cache(state.cache, phases.decode_dtype)
    return state


# --- prefill, decode step, join, leave -----------------------------------------------------------------------


@torch.no_grad()
def prefill(rows: Sequence[Row], pad_id: int, slots: Sequence[int] | None = None,
            shared: dict | None = None, shared_prefix_min: int = 0, phase: str = "") -> BatchState:
    """Prefill rows that share one base model object (``batch_key``), each after its own adapter's virtual-token /
    prefix key/values (``virtual_kv``), left-padded; ``slots``: each row's LoRA slot (0 = none), applied in this
    forward and every ``decode_step`` after it.

    Opt-in (``shared_prefix_min`` > 0, offline): the rows of one adapter whose prompts start with the same >=
    ``shared_prefix_min`` tokens get that prefix's keys/values computed once (``modeling.extend_kv``, kept in
    ``shared`` under ``phase``) and prefill only their suffixes; equal up to float rounding."""
    model = rows[0][0].model
    body, head = _decoder_and_head(model)
    device = model.get_input_embeddings().weight.device
    row_slot = _slot_tensor(slots, device)
    prompts = [list(p) for _, p in rows]
    if body is None or any(a.soft_prompt(1) is not None and virtual_kv(a) is None for a, _ in rows):
        # an architecture without a separate decoder body: the whole forward, one adapter per batch
        if len({id(a) for a, _ in rows}) > 1:
            raise ValueError("prefill: on this architecture rows of different adapters cannot share a batch")
        ids = pad_batch(prompts, pad_id, side="left").to(device)
        with _slots(row_slot):
            hidden, cache, inputs, are_logits = hidden_states(rows[0][0], ids, mask_for(prompts, side="left").to(device),
                                                              use_cache=True)
        logits = hidden[:, -1] if are_logits else model.get_output_embeddings()(hidden[:, -1])
        return BatchState(cache, inputs.attention_mask, inputs.position_ids[:, -1] + 1, logits, row_slot)
    prefixes: list[PrefixKV | None] = [None] * len(rows)
    for key in dict.fromkeys(id(a) for a, _ in rows):
        idx = [i for i, (a, _) in enumerate(rows) if id(a) == key]
        adapter = rows[idx[0]][0]
        kv = virtual_kv(adapter)
        # the shared prefix leaves every row at least one token to prefill (its last logits start decoding)
        n = min(_common_prefix([prompts[i] for i in idx]), min(len(prompts[i]) for i in idx) - 1) \
            if len(idx) > 1 else 0
        if shared is not None and shared_prefix_min > 0 and n >= shared_prefix_min:
            head_ids = (key, tuple(prompts[idx[0]][:n]), phase)
            if head_ids not in shared:
                shared[head_ids] = extend_kv(adapter, head_ids[1], kv)
            kv = shared[head_ids]
            for i in idx:
                prompts[i] = prompts[i][n:]
        for i in idx:
            prefixes[i] = kv
    cache, pmask = batch_cache(model, prefixes)  # outside row_slots: one row each
    mask = torch.cat([pmask.to(device), mask_for(prompts, side="left").to(device)], dim=1)
    ids = pad_batch(prompts, pad_id, side="left").to(device)
    positions = positions_from_mask(mask)[:, pmask.shape[1]:]
    with _slots(row_slot), exact_rows():  # each row's attention as alone: batched == one-by-one, also in bf16
        out = body(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(body, cache),
                   use_cache=True)
    return BatchState(output_cache(out), mask, positions[:, -1] + 1, head(out.last_hidden_state[:, -1]),
                      row_slot)


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, state: BatchState, attend: torch.Tensor | None = None,
                chosen: tuple[str, steps.Step] | None = None) -> BatchState:
    """Feed one token per row (B,) to the rows of ``state``; ``attend`` (B,) bool: which rows' new token is
    attended by later steps (default all; offline, finished rows' pads are not). The cache becomes a pre-allocated
    one that grows by doubling (``kvcache``); the step is ``chosen`` (from ``steps.choose``) or chosen now."""
    column = state.mask.new_ones(state.mask.shape[0], 1) if attend is None else attend.long().unsqueeze(-1)
    mask = torch.cat([state.mask, column], dim=-1)
    cache = kvcache.preallocate(state.cache, 1)
    with _slots(state.slots):  # LoRA rows: the module hooks, or the fast steps' deltas (inference.rows)
        name, step = chosen if chosen is not None else steps.choose(model, cache)
        logits = step(tokens, mask, state.next_pos, cache)
    return BatchState(cache, mask, state.next_pos + 1, logits, state.slots, name)


def join(model, parts: Sequence[BatchState]) -> BatchState:
    """Running rows and newly prefilled ones as one batch (``modeling.merge_rows``), slots carried along."""
    cache, mask = merge_rows(model, [(cache_tensors(p.cache), p.mask) for p in parts])
    slots = None
    if any(p.slots is not None for p in parts):
        slots = torch.cat([p.slots if p.slots is not None else p.next_pos.new_zeros(p.next_pos.shape[0])
                           for p in parts])
    return BatchState(cache, mask, torch.cat([p.next_pos for p in parts]), torch.cat([p.logits for p in parts]),
                      slots, parts[0].step)


def leave(model, state: BatchState, keep: torch.Tensor) -> BatchState:
    """Only rows ``keep`` (indices) of ``state`` (``modeling.select_rows``), slots carried along."""
    cache, mask = select_rows(model, state.cache, state.mask, keep)
    slots = None if state.slots is None else _slot_tensor(state.slots.index_select(0, keep), keep.device)
    return BatchState(cache, mask, state.next_pos.index_select(0, keep), state.logits.index_select(0, keep), slots,
                      state.step)


@dataclass
class Batch:
    """Rows running on one model object in one precision (``phases``): rows join (``admit``: prefilled with the
    weights in the prefill phase's dtype, the cache cast to the decode phase's, then ``join``) and leave
    (``keep``) between decode steps (``step``: the weights in the decode phase's dtype). A serve lane is one; an
    offline static batch is one that admits its rows once and runs to completion (``run_to_completion``)."""

    model: Any
    phases: precision.PhasePrecision
    state: BatchState | None = None

    @classmethod
    def on(cls, model, precision_name: str, key: str = "eval.precision") -> Batch:
        """An empty batch for ``model`` in ``precision_name`` (fp32 | bf16 | auto, resolved for its device)."""
        return cls(model, precision.resolve(precision_name, model.get_input_embeddings().weight.device, key))

    def admit(self, rows: Sequence[Row], pad_id: int, slots: Sequence[int] | None = None, shared: dict | None = None,
              shared_prefix_min: int = 0) -> BatchState:
        """Prefill ``rows`` and add them after the running ones; the running rows are untouched if it fails."""
        with prefill_phase(self.model, self.phases):
            new = prefill(rows, pad_id, slots, shared, shared_prefix_min, self.phases.prefill)
        new = to_decode(new, self.phases)
        self.state = new if self.state is None else join(self.model, [self.state, new])
        return self.state

    def keep(self, index: torch.Tensor) -> BatchState:
        """Only rows ``index`` stay (the others leave)."""
        assert self.state is not None
        self.state = leave(self.model, self.state, index)
        return self.state

    def step(self, tokens: torch.Tensor, attend: torch.Tensor | None = None,
             chosen: tuple[str, steps.Step] | None = None) -> BatchState:
        """One decode step for every row (``decode_step``), with the weights in the decode phase's dtype."""
        assert self.state is not None
        with decode_phase(self.model, self.phases):
            self.state = decode_step(self.model, tokens, self.state, attend, chosen)
        return self.state


# --- offline: submit rows and run them to completion ---------------------------------------------------------


@torch.no_grad()
def run_to_completion(batch: Batch, cfg: GenerationConfig, eos: Sequence[int], pad_id: int,
                      stop_check: Callable[[int, list[int]], bool] | None = None) -> tuple[list[list[int]], str]:
    """Decode an admitted static batch until every row ends (EOS, a stop string, ``max_new_tokens``): the new token
    ids of each row (EOS excluded) and the step that ran (``steps.BACKENDS``).

    Finished rows stay in the batch with their new column masked; the tokens stay in one (B, steps) tensor,
    turned into lists once at the end (per-row Python per step only for stop strings); no step after the last
    token (its logits would go unused); the cache is allocated once for all steps (``kvcache.preallocate``)."""
    state = batch.state
    assert state is not None
    n, steps_n = state.logits.shape[0], cfg.max_new_tokens
    device = state.logits.device
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
    eos_t = torch.tensor(list(eos), device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens = torch.full((n, max(steps_n, 1)), pad_id, dtype=torch.long, device=device)
    keep = torch.zeros(n, max(steps_n, 1), dtype=torch.bool, device=device)  # token t of row b is output
    state.cache = kvcache.preallocate(state.cache, steps_n)
    with decode_phase(batch.model, batch.phases), _slots(state.slots):
        chosen = steps.choose(batch.model, state.cache)
    out: list[list[int]] = [[] for _ in range(n)]
    taken = 0
    for step in range(steps_n):
        token = torch.where(done, pad_id, next_tokens(state.logits, cfg, generator))  # (B,)
        finished_now = torch.isin(token, eos_t) & ~done
        tokens[:, step], keep[:, step] = token, ~done & ~finished_now
        taken = step + 1
        if stop_check is not None:
            for row in keep[:, step].nonzero().flatten().tolist():
                out[row].append(int(token[row]))
                if stop_check(row, out[row]):
                    finished_now[row] = True
        done |= finished_now
        if bool(done.all()) or step == steps_n - 1:
            break
        state = batch.step(token, ~done, chosen)
    if stop_check is not None:
        return out, chosen[0]
    rows, kept = tokens[:, :taken].tolist(), keep[:, :taken].tolist()
    return [[t for t, k in zip(r, m, strict=True) if k] for r, m in zip(rows, kept, strict=True)], chosen[0]


@dataclass
class Engine:
    """Offline generation over the engine: ``run`` submits (adapter, prompt ids) rows that may mix adapters and
    runs them to completion in static batches. ``steps_used``: the decode steps that ran (``steps.BACKENDS``)."""

    tokenizer: Any
    cfg: GenerationConfig
    batch_size: int = 16
    shared_prefix_min: int = 0
    steps_used: set[str] = field(default_factory=set)

    @torch.no_grad()
    def run_ids(self, rows: Sequence[Row], progress: Callable[[int], None] | None = None) -> list[list[int]]:
        """New token ids of each row (EOS excluded), in order.

        - Rows are grouped by ``batch_key``: adapters that add only virtual tokens or text share batches with each
          other and the base model; weight-changing adapters (LoRA, full fine-tuning) get batches of their own rows;
          within a group, rows are batched by length (``batch_size`` a batch).
        - Greedy output equals generating each row alone; sampled output depends on which rows share a batch (one
          generator per batch seeded with ``cfg.seed``): fix ``batch_size`` to reproduce it.
        """
        out: list[list[int]] = [[] for _ in rows]
        groups: dict[int, list[int]] = {}
        for i, (adapter, _) in enumerate(rows):
            groups.setdefault(batch_key(adapter), []).append(i)
        shared: dict[tuple, PrefixKV] = {}
        for members in groups.values():
            order = sorted(members, key=lambda i: len(rows[i][1]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                for part in self._parts([rows[i] for i in batch]):
                    new = self._run_batch([rows[batch[j]] for j in part], shared)
                    for j, ids in zip(part, new, strict=True):
                        out[batch[j]] = ids
                if progress:
                    progress(len(batch))
        return out

    def run(self, rows: Sequence[Row], progress: Callable[[int], None] | None = None) -> list[str]:
        """Text of each row (special tokens skipped, cut at the first stop string), in order."""
        return [cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.cfg.stop)
                for ids in self.run_ids(rows, progress)]

    @staticmethod
    def _parts(batch: Sequence[Row]) -> list[list[int]]:
        """Indices of the rows that prefill together: all, or one adapter at a time where the model has no
        separate decoder body (``prefill``'s whole-forward path takes one adapter)."""
        body, _ = _decoder_and_head(batch[0][0].model)
        if body is not None:
            return [list(range(len(batch)))]
        parts: dict[int, list[int]] = {}
        for i, (adapter, _) in enumerate(batch):
            parts.setdefault(id(adapter), []).append(i)
        return list(parts.values())

    def _run_batch(self, rows: Sequence[Row], shared: dict) -> list[list[int]]:
        model = rows[0][0].model
        batch = Batch.on(model, self.cfg.precision)
        batch.admit(rows, self.tokenizer.pad_token_id, shared=shared, shared_prefix_min=self.shared_prefix_min)
        stop_check = stop_checker(self.tokenizer, self.cfg.stop) if self.cfg.stop else None
        with decode_phase(model, batch.phases):  # one weight swap for the loop (the steps' own are no-ops then)
            new, name = run_to_completion(batch, self.cfg, eos_ids(model, self.tokenizer),
                                          self.tokenizer.pad_token_id, stop_check)
        if self.cfg.max_new_tokens > 1:
            self.steps_used.add(name)
        return new
