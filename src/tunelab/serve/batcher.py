"""Continuous request batching for `tunelab serve`: requests for many adapters share one forward pass.

A background thread takes the first queued request, keeps collecting for ``window_ms`` (or until
``max_batch``), then hands the rows to the one generation path, ``tunelab.generate.generate_rows``,
one call per set of decoding settings (one ``GenerationConfig`` per call). There, rows of every adapter
that leaves the base weights alone (prompt tuning, IPT, P-tuning, prefix tuning, ICL, discrete prompt,
the bare base model) share forward passes, each row with its own virtual-token key/values; LoRA adapters
are batched per adapter on the shared model (one slot of ``serve.lora_rows`` for the whole call), and
full-weight adapters per adapter on their own copy of the model. (The continuous scheduler puts LoRA rows
in the shared batch; this batcher is kept as the baseline it is compared with.)

Greedy rows give the same text batched as alone (positions come from the attention mask, see
``tunelab.modeling``), so a served completion equals offline generation whatever it was batched with.
Sampled rows draw from one generator per call, so they depend on their batch-mates (as in `tunelab eval`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field

import torch

from tunelab.generate import GenerationConfig, generate_rows
from tunelab.inference.rows import row_slots
from tunelab.methods.base import Adapter, MethodConfig
from tunelab.serve.lora_rows import LoraSlots
from tunelab.serve.registry import Served

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One prompt to complete: which served adapter, its prompt ids, how to decode; the answer arrives in ``future``."""

    served: Served
    prompt_ids: list[int]
    cfg: GenerationConfig
    future: Future = field(default_factory=Future)  # -> str, the completion text


class SoftPromptRow(Adapter):
    """The frozen base model with one served soft prompt: what ``generate_rows`` needs for a row.

    Only the (n, C) tensor is kept per served adapter; ``modeling.virtual_kv`` caches the prompt's
    key/values per object of this class, so ``HotPrompts`` decides how many such caches stay alive.
    """

    def __init__(self, model, soft: torch.Tensor) -> None:
        super().__init__(model, "served_soft_prompt", MethodConfig())
        self.soft = soft  # (n, C)

    def soft_prompt(self, batch_size: int) -> torch.Tensor:
        return self.soft.unsqueeze(0).expand(batch_size, -1, -1)  # (B, n, C)


# soft prompts whose virtual-token key/values stay cached by default: ~0.9 MB each on SmolLM2-135M (20 tokens),
# ~230 MB at most. A cap below the number of adapters in use makes a cyclic or random mix miss at every
# request and compute each row's virtual tokens again (measured at 32 with 100 adapters: bench_serve's mixed
# traffic at 16 requests/s reached 0.65-0.72x one adapter's throughput, most of the gap in time to first token)
HOT_PROMPTS = 256


class HotPrompts:
    """The ``SoftPromptRow`` of the ``capacity`` most recently used soft-prompt adapters.

    Keeping a row adapter alive keeps its cached virtual-token key/values (~0.9 MB for SmolLM2-135M with
    20 virtual tokens: 30 layers x K and V x 20 x 192 floats), so prefill skips the virtual tokens; an
    adapter outside the cap gets a fresh row adapter per batch and its key/values are computed once per
    batch and then freed. Memory is thus (soft prompt bytes) per adapter + at most ``capacity`` caches.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: OrderedDict[str, SoftPromptRow] = OrderedDict()

    def row(self, served: Served) -> SoftPromptRow:
        hit = self._rows.get(served.name)
        if hit is not None and hit.soft is served.soft:
            self._rows.move_to_end(served.name)
            return hit
        row = SoftPromptRow(served.adapter.model, served.soft)
        if self.capacity > 0:
            self._rows[served.name] = row
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)
        return row


def mix_key(job: Job, mix: bool = True) -> Hashable:
    """Jobs with equal keys go to one ``generate_rows`` call, which batches rows on the same weights together.
    ``mix=False`` keeps every adapter in its own call: the one-adapter-per-forward baseline."""
    return (() if mix else job.served.name), astuple(job.cfg)


def run_group(jobs: Sequence[Job], tokenizer, hot: HotPrompts, lora: LoraSlots | None = None) -> list[str]:
    """Generate for one group of jobs with ``tunelab.generate.generate_rows``; texts in ``jobs`` order.

    Rows of soft-prompt, prefix and text-only adapters all run on the shared base model, so
    ``generate_rows`` puts them in one batch, each row with its own virtual-token key/values; rows
    of weight-changing adapters (full weights) are batched per adapter; LoRA rows per adapter, inside
    ``inference.rows.row_slots`` with the adapter's slot.
    """
    texts: list[str] = [""] * len(jobs)
    rows: list = []
    plain: list[int] = []
    local: dict = {}
    by_lora: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        served = job.served
        if served.lora is not None:
            by_lora.setdefault(served.name, []).append(i)
            continue
        if served.soft is not None:  # one row adapter per adapter per call, shared by its rows
            local.setdefault(served.name, hot.row(served))
            rows.append((local[served.name], job.prompt_ids))
        else:
            rows.append((served.adapter, job.prompt_ids))
        plain.append(i)
    if rows:
        for i, text in zip(plain, generate_rows(rows, tokenizer, jobs[0].cfg, batch_size=len(rows)), strict=True):
            texts[i] = text
    for members in by_lora.values():
        for i, text in zip(members, _lora_rows([jobs[i] for i in members], tokenizer, lora), strict=True):
            texts[i] = text
    return texts


def _lora_rows(jobs: Sequence[Job], tokenizer, lora: LoraSlots | None) -> list[str]:
    """The rows of one LoRA adapter, on the shared base model with that adapter's slot for every row."""
    served = jobs[0].served
    assert served.lora is not None
    if lora is None:
        raise ValueError("a LoRA row needs the registry's LoraSlots: Batcher(lora=registry.lora)")
    slot = lora.acquire(served.name, served.lora)
    if slot is None:
        raise RuntimeError("every LoRA slot is in use")  # cannot happen: this thread releases every slot it takes
    try:
        with row_slots(torch.tensor(slot)):
            return generate_rows([(served.adapter, j.prompt_ids) for j in jobs], tokenizer, jobs[0].cfg,
                                 batch_size=len(jobs))
    finally:
        lora.release(slot)


@dataclass
class BatchStats:
    """Counters for /health and the benchmark."""

    batches: int = 0  # collection rounds
    calls: int = 0  # generation calls (one per mix group)
    rows: int = 0
    max_rows_per_call: int = 0


class Batcher:
    """Collects jobs from request handlers and runs them in mixed batches on one background thread."""

    def __init__(self, tokenizer, window_ms: float = 5.0, max_batch: int = 32, mix: bool = True,
                 hot_prompts: int = HOT_PROMPTS, lora: LoraSlots | None = None) -> None:
        self.tokenizer, self.window, self.max_batch, self.mix = tokenizer, window_ms / 1000, max_batch, mix
        self.lora = lora
        self.hot = HotPrompts(hot_prompts)
        self.stats = BatchStats()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tunelab-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue a job; its future resolves to the completion text (or the exception generation raised)."""
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _collect(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        deadline = time.monotonic() + self.window
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            jobs.append(job)
        return jobs

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while (jobs := self._collect()) is not None:
            self.stats.batches += 1
            groups: dict[Hashable, list[Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():
                    groups.setdefault(mix_key(job, self.mix), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[Job]) -> None:
        try:
            texts = run_group(group, self.tokenizer, self.hot, self.lora)
        except Exception as exc:  # reported to each waiting request; the server keeps running
            log.exception("generation failed for a batch of %d rows", len(group))
            for job in group:
                job.future.set_exception(exc)
            return
        self.stats.calls += 1
        self.stats.rows += len(group)
        self.stats.max_rows_per_call = max(self.stats.max_rows_per_call, len(group))
        for job, text in zip(group, texts, strict=True):
            job.future.set_result(text)
