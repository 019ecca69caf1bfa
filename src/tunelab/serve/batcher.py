"""Continuous request batching for `tunelab serve`: requests for many adapters share one forward pass.

A background thread takes the first queued request, keeps collecting for ``window_ms`` (or until
``max_batch``), then splits what it has into *mix groups*: rows whose adapters can run in one call of
the shared generation loop (``tunelab.generate``). All soft-prompt adapters (prompt tuning, IPT,
P-tuning) with the same number of virtual tokens mix into one batch, each row carrying its own
prompt (``RowSoftPrompts``); adapters that only change the text (ICL, discrete prompt, the bare base
model) mix with each other; prefix-tuning and weight-changing adapters (LoRA, full weights) run one
group per adapter. Rows in a group must also share decoding settings (one ``GenerationConfig`` per call).

Greedy rows give the same text batched as alone (positions come from the attention mask, see
``tunelab.modeling``), so a served completion equals offline generation whatever it was batched with.
Sampled rows draw from one generator per call, so they depend on their batch-mates (as in `tunelab eval`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field

import torch

from tunelab.generate import GenerationConfig, generate
from tunelab.methods.base import Adapter, MethodConfig
from tunelab.serve.registry import Served

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One prompt to complete: which served adapter, its prompt ids, how to decode; the answer arrives in ``future``."""

    served: Served
    prompt_ids: list[int]
    cfg: GenerationConfig
    future: Future = field(default_factory=Future)  # -> str, the completion text


class RowSoftPrompts(Adapter):
    """The frozen base model with a different soft prompt on every row of one batch.

    ``soft_prompt(B)`` returns row i's prompt in row i, so the one forward path in ``tunelab.modeling``
    places each row's virtual tokens before its own text. Rows must be given in the order the
    generation loop sees them.
    """

    def __init__(self, model, prompts: Sequence[torch.Tensor]) -> None:
        super().__init__(model, "mixed", MethodConfig())
        self.prompts = torch.stack(list(prompts))  # (B, n, C)

    def soft_prompt(self, batch_size: int) -> torch.Tensor:
        assert batch_size == self.prompts.shape[0], "rows and soft prompts out of step"
        return self.prompts


def mix_key(job: Job, mix: bool = True) -> Hashable:
    """Jobs with equal keys run in one generation call (``Served.mix``, set when the adapter loads).
    ``mix=False`` keeps every adapter in its own call: the one-adapter-per-forward baseline."""
    return (job.served.mix if mix else job.served.name), astuple(job.cfg)


def batch_adapter(jobs: Sequence[Job]) -> Adapter:
    """The adapter one mix group runs through: per-row soft prompts, or the group's common adapter."""
    first = jobs[0].served
    if first.soft is not None:
        return RowSoftPrompts(first.adapter.model, [j.served.soft for j in jobs])
    return first.adapter


def run_group(jobs: Sequence[Job], tokenizer) -> list[str]:
    """Generate for one mix group in a single call of ``tunelab.generate.generate``; texts in ``jobs`` order.

    Rows are sorted by prompt length first: ``generate`` orders rows by length with a stable sort, so
    sorted input keeps row i = job i, which ``RowSoftPrompts`` relies on.
    """
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].prompt_ids))
    ordered = [jobs[i] for i in order]
    texts = generate(batch_adapter(ordered), tokenizer, [j.prompt_ids for j in ordered], jobs[0].cfg,
                     batch_size=len(ordered))
    out = [""] * len(jobs)
    for i, text in zip(order, texts, strict=True):
        out[i] = text
    return out


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
                 runner: Callable[[Sequence[Job], object], list[str]] = run_group) -> None:
        self.tokenizer, self.window, self.max_batch, self.runner = tokenizer, window_ms / 1000, max_batch, runner
        self.mix = mix
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
            texts = self.runner(group, self.tokenizer)
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
