"""Iteration-level (continuous) batching for `tunelab serve`: requests join and leave the running batch
between decode steps.

One background thread loops:
1. **admit** queued requests (up to ``max_batch`` running rows): the new rows are prefilled together
   (``inference.engine.prefill``: each row after its own adapter's virtual-token / prefix key/values, the
   demonstrations already in its prompt) and join the running batch of their base model object
   (``engine.join``: ``modeling.merge_rows`` left-pads the shorter caches and masks the pads);
2. **pick** each running row's next token from its last logits, stream its new text (incremental
   detokenisation that holds back a possible stop-string start or a half UTF-8 character), and finish it on
   EOS, a stop string or its token budget; cancelled rows (client gone, shutdown) finish too;
3. **remove** finished rows at once (``engine.leave``), then run **one decode step**
   (``engine.decode_step``, the step ``inference.steps`` chooses) for all rows still running.

Each lane is an ``engine.Batch``: its prefill and decode steps run in the precision of their phase (``precision``:
fp32 | bf16 | auto, applied by the engine as offline; a model `tunelab serve` cast once is not swapped).

Rows of adapters that leave the base weights alone (soft prompts, prefixes, IPT, ICL, the bare model) and
LoRA rows share one running batch ("lane"): a LoRA row takes a slot of ``serve.lora_rows.LoraSlots`` at
admission (waiting in the queue while every slot is held by running rows) and gives it back when it
finishes; its slot index travels with the row through prefill, merges, removals and decode steps
(``BatchState.slots``). Only adapters on a private model copy (full weights, a folded ``init_from``) have a
lane of their own. Positions come from the attention mask, so greedy output equals offline
`tunelab eval` (the same engine, ``Engine.run``) whatever a row is batched with. Sampled rows draw from a
generator of their own seeded with the request's seed (so, unlike offline, independent of batch-mates).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.inference.engine import Batch, batch_key
from tunelab.inference.sampling import GenerationConfig, cut_at_stop, eos_ids, next_token, stop_checker
from tunelab.serve.batcher import HOT_PROMPTS, HotPrompts
from tunelab.serve.lora_rows import LoraSlots
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.registry import Served

log = logging.getLogger(__name__)


class Rejected(Exception):
    """The scheduler is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class Result:
    """A finished row: its text (stop string cut), why it ended, how many tokens it generated."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (token budget), "cancelled"
    completion_tokens: int


@dataclass
class Request:
    """One prompt to complete. ``on_text`` (called on the scheduler thread) receives each new piece of text
    as soon as it is safe to send; ``future`` resolves to a ``Result``. ``cancel()`` removes the row."""

    served: Served
    prompt_ids: list[int]
    cfg: GenerationConfig
    on_text: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the scheduler to drop this row at its next step (no-op once finished)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Row:
    request: Request
    adapter: Any  # tunelab.methods.base.Adapter (None for a row never admitted)
    stop: Callable[[int, list[int]], bool] | None
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    first_token_at: float | None = None
    slot: int = 0  # LoRA slot (serve.lora_rows); 0 = none


@dataclass
class _Lane:
    """The running batch of one base model object."""

    model: Any
    eos: torch.Tensor
    rows: list[_Row]
    batch: Batch  # the engine's running batch: rows join, leave and decode in their phases' precision


class LoopControl:
    """Draining and closing a scheduler whose loop runs on ``_thread``, woken by ``_wake`` (both schedulers)."""

    _admitting: bool
    _deadline: float | None
    _stop: bool
    _wake: threading.Event
    _thread: threading.Thread

    def drain(self, grace_s: float) -> None:
        """Stop admitting; rows still running ``grace_s`` seconds from now are cancelled."""
        self._admitting = False
        self._deadline = time.monotonic() + grace_s
        self._wake.set()

    def close(self, grace_s: float = 0.0) -> None:
        """Drain (see ``drain``), wait for the loop to empty, then stop the thread."""
        if self._deadline is None:
            self.drain(grace_s)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=grace_s + 30)


@dataclass
class SchedulerStats:
    """Counters for /health, tests and the benchmark."""

    steps: int = 0  # decode iterations
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    max_running: int = 0  # most rows ever in the running batches at once
    mixed_steps: int = 0  # steps in which one forward held rows of more than one adapter
    step: str = ""  # the decode step that ran last (inference.steps.BACKENDS)


class Scheduler(LoopControl):
    """Continuous batching over the registry's adapters on one background thread."""

    def __init__(self, tokenizer, max_batch: int = 32, hot_prompts: int = HOT_PROMPTS,
                 metrics: ServeMetrics | None = None, lora: LoraSlots | None = None, precision: str = "fp32") -> None:
        self.tokenizer, self.max_batch, self.lora, self.precision = tokenizer, max_batch, lora, precision
        self.hot = HotPrompts(hot_prompts)
        self.metrics = metrics or ServeMetrics()
        self.stats = SchedulerStats()
        self._stream = RowStream(tokenizer, self.metrics, self.stats)
        self._queue: queue.Queue[Request] = queue.Queue()
        self._held: deque[Request] = deque()  # LoRA requests waiting for a free slot (scheduler thread only)
        self._lanes: dict[Hashable, _Lane] = {}
        self._wake = threading.Event()
        self._admitting = True
        self._stop = False
        self._deadline: float | None = None  # shutdown: cancel what still runs after this time
        self._thread = threading.Thread(target=self._loop, name="tunelab-scheduler", daemon=True)
        self._thread.start()

    # --- called from request handlers -----------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        """Queue a request; its future resolves to a ``Result``. Raises ``Rejected`` while shutting down."""
        if not self._admitting:
            raise Rejected("the server is shutting down")
        self._queue.put(request)
        self.metrics.queue_length.set(self._queue.qsize())
        self._wake.set()
        return request.future

    def running(self) -> int:
        """Rows in the running batches now."""
        return sum(len(lane.rows) for lane in list(self._lanes.values()))

    def queued(self) -> int:
        return self._queue.qsize() + len(self._held)

    # --- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            if not self._lanes and self._queue.empty() and not self._held:
                if self._stop:
                    return
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._admit()
                self._step()
            except Exception as exc:  # a broken step fails its rows; the server keeps running
                log.exception("scheduler step failed")
                for lane in self._lanes.values():
                    for row in lane.rows:
                        self._release(row)
                        if not row.request.future.done():
                            row.request.future.set_exception(exc)
                self._lanes.clear()

    def _admit(self) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            while self._held:
                self._finish(_Row(self._held.popleft(), None, None, None), "cancelled")
            while not self._queue.empty():  # not started before the grace period ran out
                self._finish(_Row(self._queue.get_nowait(), None, None, None), "cancelled")
        room = self.max_batch - self.running()
        new: dict[Hashable, list[_Row]] = {}
        waiting, self._held = self._held, deque()
        while room > 0:
            request = waiting.popleft() if waiting else self._next_queued()
            if request is None:
                break
            if request.cancelled or request.future.cancelled():
                self._finish(_Row(request, None, None, None), "cancelled")
                continue
            try:
                slot = self._slot_for(request)
            except ValueError as exc:
                request.future.set_exception(exc)
                continue
            if slot is None:  # every LoRA slot is held by running rows: wait (still pending) for one to finish
                self._held.append(request)
                continue
            if not request.future.set_running_or_notify_cancel():
                self._finish(_Row(request, None, None, None, slot=slot), "cancelled")
                continue
            served = request.served
            adapter = self.hot.row(served) if served.soft is not None else served.adapter
            cfg = request.cfg
            row = _Row(request, adapter, stop_checker(self.tokenizer, cfg.stop) if cfg.stop else None,
                       torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None, slot=slot)
            new.setdefault(batch_key(adapter), []).append(row)
            room -= 1
        self._held.extend(waiting)
        self.metrics.queue_length.set(self._queue.qsize())
        for key, rows in new.items():
            model = rows[0].adapter.model
            lane = self._lanes.get(key)
            try:
                batch = lane.batch if lane is not None else Batch.on(model, self.precision, "precision")
                state = batch.admit([(r.adapter, r.request.prompt_ids) for r in rows], self.tokenizer.pad_token_id,
                                    [r.slot for r in rows])
            except Exception as exc:
                log.exception("prefill failed for %d rows", len(rows))
                for r in rows:
                    self._release(r)
                    r.request.future.set_exception(exc)
                continue
            self.stats.admitted += len(rows)
            if lane is None:
                eos = torch.tensor(eos_ids(model, self.tokenizer), device=state.logits.device)
                self._lanes[key] = _Lane(model, eos, rows, batch)
            else:
                lane.rows.extend(rows)
        running = self.running()
        self.stats.max_running = max(self.stats.max_running, running)
        self.metrics.running.set(running)

    def _next_queued(self) -> Request | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _slot_for(self, request: Request) -> int | None:
        """The LoRA slot of the request's row (0 for a row without LoRA); None while all slots are busy."""
        if request.served.lora is None:
            return 0
        if self.lora is None:
            raise ValueError("a LoRA row needs the registry's LoraSlots: Scheduler(lora=registry.lora)")
        return self.lora.acquire(request.served.name, request.served.lora)

    def _release(self, row: _Row) -> None:
        if row.slot and self.lora is not None:
            self.lora.release(row.slot)
            row.slot = 0

    def _step(self) -> None:
        expired = self._deadline is not None and time.monotonic() > self._deadline
        for key in list(self._lanes):
            lane = self._lanes[key]
            tokens, keep = [], []
            state = lane.batch.state
            assert state is not None
            greedy = state.logits.argmax(-1).tolist()  # one call for the batch; sampled rows draw below
            for i, row in enumerate(lane.rows):
                if row.request.cancelled or expired:
                    self._finish(row, "cancelled")
                    continue
                token = next_token(state.logits[i], row.request.cfg, row.generator) \
                    if row.request.cfg.do_sample else int(greedy[i])
                reason = self._advance(row, lane, token)
                if reason is not None:
                    self._finish(row, reason)
                    continue
                tokens.append(row.ids[-1])
                keep.append(i)
            if not keep:
                del self._lanes[key]
                continue
            if len(keep) < len(lane.rows):
                lane.batch.keep(torch.tensor(keep, device=state.mask.device))
                lane.rows = [lane.rows[i] for i in keep]
            if len({id(r.request.served) for r in lane.rows}) > 1:
                self.stats.mixed_steps += 1
            state = lane.batch.step(torch.tensor(tokens, device=state.mask.device))
            self.stats.steps += 1
            self.stats.step = state.step
            self.metrics.decode_steps.inc(state.step)
        running = self.running()
        self.metrics.running.set(running)
        self.metrics.batch_occupancy.observe(running)

    def _advance(self, row: _Row, lane: _Lane, token: int) -> str | None:
        """Append the row's next token and stream what became safe to send; the finish reason, if it ended."""
        return self._stream.advance(row, token, bool((lane.eos == token).any()))

    def _finish(self, row: _Row, reason: str) -> None:
        self._release(row)
        self._stream.finish(row, reason)


class RowStream:
    """What a scheduler does with each new token of a row, the same in both engines' schedulers (this one and
    ``serve.vllm_scheduler``): EOS, then stop strings, then the budget end it; the text that can no longer change
    streams (``on_text``); the finish decodes, cuts at the first stop string and resolves the request's future.
    A row is anything with ``request``, ``ids``, ``sent``, ``stop`` and ``first_token_at``."""

    def __init__(self, tokenizer, metrics: ServeMetrics, stats: SchedulerStats) -> None:
        self.tokenizer, self.metrics, self.stats = tokenizer, metrics, stats

    def advance(self, row, token: int, eos: bool) -> str | None:
        cfg = row.request.cfg
        now = time.monotonic()
        if row.first_token_at is None:
            row.first_token_at = now
            self.metrics.ttft.observe(now - row.request.submitted)
        if eos:
            return "stop"
        row.ids.append(token)
        self.metrics.tokens.inc()
        if row.stop is not None and row.stop(0, row.ids):
            return "stop"
        if len(row.ids) >= cfg.max_new_tokens:
            return "length"
        self.emit(row, _safe_prefix(self.tokenizer.decode(row.ids, skip_special_tokens=True), cfg.stop))
        return None

    def emit(self, row, text: str) -> None:
        # only text that extends what was sent goes out (a detokeniser may revise its last characters)
        if row.request.on_text is not None and len(text) > len(row.sent) and text.startswith(row.sent):
            piece, row.sent = text[len(row.sent):], text
            try:
                row.request.on_text(piece)
            except Exception:  # the client's sink failing is the client's problem: drop its row
                log.exception("streaming callback failed")
                row.request.cancel()

    def finish(self, row, reason: str) -> None:
        request = row.request
        text = cut_at_stop(self.tokenizer.decode(row.ids, skip_special_tokens=True), request.cfg.stop)
        if reason != "cancelled":
            self.emit(row, text)
            self.stats.finished += 1
            if row.first_token_at is not None and len(row.ids) > 1:
                self.metrics.tpot.observe((time.monotonic() - row.first_token_at) / (len(row.ids) - 1))
        else:
            self.stats.cancelled += 1
        self.metrics.finished.inc(reason)
        if not request.future.done():
            request.future.set_result(Result(text, reason, len(row.ids)))


def _safe_prefix(text: str, stop: tuple[str, ...]) -> str:
    """``text`` less what may still change: a trailing half character, or a tail that could begin a stop string."""
    if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                text = text[:-k]
                break
    return text
