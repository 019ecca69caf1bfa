"""One plain training loop for every method: AdamW, warmup, grad accumulation, checkpoints, NaN guard."""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab import distributed
from tunelab.checkpoint import fingerprint, latest_checkpoint, load_checkpoint, save_checkpoint
from tunelab.choices import SCHEDULES
from tunelab.errors import TunelabError
from tunelab.formatting import IGNORE_INDEX, Encoded
from tunelab.modeling import mask_for, pad_batch
from tunelab.sections import TrainConfig

log = logging.getLogger(__name__)


class TrainingDiverged(TunelabError):
    """The loss became NaN or infinite."""


@dataclass
class TrainStats:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step
    tokens: int = 0  # tokens processed (padding excluded)
    seconds: float = 0.0
    resumed_from: int | None = None
    precision: str = "fp32"  # what train.precision resolved to on this machine
    processes: int = 1  # data-parallel processes (accelerate launch)
    rank: int = 0  # this process's index among them (0 writes checkpoints and results)
    parallel: str = "none"  # how accelerate wrapped training: MULTI_CPU / MULTI_GPU (DDP), FSDP, DEEPSPEED
    stopped: bool = False  # on_step asked to stop before cfg.steps (e.g. a pruned tuning trial)

    @property
    def final_loss(self) -> float | None:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None


MEGABATCH = 50  # length grouping sorts within windows of MEGABATCH x batch_size examples


def batch_indices(n: int, batch_size: int, step: int, seed: int, lengths: Sequence[int] | None = None) -> list[int]:
    """Example indices of optimizer step ``step``: a pure function of (seed, step, lengths), so resuming
    needs no sampler state. Each epoch is a fresh seeded permutation; examples are drawn from the
    stream of epochs ``batch_size`` at a time (a batch may straddle two epochs).

    With ``lengths`` (one per example), each epoch is length-grouped: the permutation is cut into
    windows of ``MEGABATCH * batch_size`` examples, each window is sorted by length, cut into batches,
    and the batches are shuffled; so a batch holds examples of similar length (little padding) while
    the batch order stays random. Batch boundaries are those of the ungrouped stream.
    """
    start = step * batch_size
    out: list[int] = []
    key = tuple(lengths) if lengths is not None else None
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        order = _epoch_order(n, batch_size, epoch, seed, key)
        out.extend(order[offset: offset + batch_size - len(out)])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, batch_size: int, epoch: int, seed: int, lengths: tuple[int, ...] | None) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    if lengths is None:
        return order
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} examples")
    # the epoch starts `head` examples before a batch boundary of the global stream: keep that partial
    # batch first so every full batch of this epoch is one chunk of a sorted window
    head = (-epoch * n) % batch_size
    head = min(head, n)
    rest = order[head:]
    window = MEGABATCH * batch_size
    grouped: list[int] = []
    for w in range(0, len(rest), window):
        grouped.extend(sorted(rest[w: w + window], key=lambda i: -lengths[i]))
    full = len(grouped) // batch_size * batch_size
    chunks = [grouped[i: i + batch_size] for i in range(0, full, batch_size)]
    random.Random(f"{seed}:{epoch}:batches").shuffle(chunks)
    return order[:head] + [i for chunk in chunks for i in chunk] + grouped[full:]


def step_indices(n: int, batch_size: int, grad_accum: int, step: int, seed: int,
                 lengths: Sequence[int] | None = None) -> list[int]:
    """Indices of optimizer step ``step`` as ``grad_accum`` consecutive micro-batches of ``batch_size``."""
    return [i for micro in range(grad_accum)
            for i in batch_indices(n, batch_size, step * grad_accum + micro, seed, lengths)]


def collate(examples: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest in the batch: (input_ids, attention_mask, labels), each (B, T)."""
    ids = [e.input_ids for e in examples]
    return pad_batch(ids, pad_id), mask_for(ids), pad_batch([e.labels for e in examples], IGNORE_INDEX)




def lr_lambda(warmup: int, total: int, kind: str = "linear") -> Callable[[int], float]:
    """Linear warmup, then linear decay to 10% of the peak (``linear``) or a flat rate (``constant``)."""
    if kind not in SCHEDULES:
        raise TunelabError(f"train.schedule={kind!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.1, 1.0 - 0.9 * progress)

    return factor


def train(adapter, data: Sequence[Encoded], cfg: TrainConfig, lr: float, pad_id: int,
          checkpoint_dir: Path | None = None, resume: bool = False,
          on_step: Callable[[int, float], bool | None] | None = None,
          identity: dict[str, Any] | None = None) -> TrainStats:
    """Train ``adapter``'s trainable parameters on encoded examples for ``cfg.steps`` optimizer steps.

    With ``checkpoint_dir``, state is saved every ``cfg.checkpoint_every`` steps and at the end;
    ``resume`` continues from the newest checkpoint there, refusing one whose ``identity``
    (``checkpoint.training_identity``) differs. A NaN/inf loss raises ``TrainingDiverged``.

    ``on_step(step, loss)`` runs after each optimizer step (``step`` counts from 1), before that step's
    checkpoint; a true return stops training there (``stats.stopped``), without a checkpoint of that step.

    Under ``accelerate launch`` with N processes, ``cfg.batch_size`` is per process (as Trainer's
    per-device batch): an optimizer step sees ``batch_size * grad_accum * N`` examples, each process
    its own slice, and gradients are averaged by the accelerate-prepared wrapper (``tunelab.distributed``).
    """
    if not data:
        raise TunelabError("no training examples: check data.task / data.train")
    named = {n: p for n, p in adapter.named_parameters() if p.requires_grad}
    if not named:
        raise TunelabError(f"method {adapter.method} has no trainable parameters")
    torch.manual_seed(cfg.seed)
    device = _device_of(adapter)
    precision = distributed.resolve_precision(getattr(cfg, "precision", "fp32"), device)
    if getattr(cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(adapter)
    optimizer = torch.optim.AdamW(named.values(), lr=lr, weight_decay=cfg.weight_decay)
    parallel, module, optimizer = distributed.setup(adapter, optimizer)
    schedule = lr_lambda(cfg.warmup_steps, cfg.steps, cfg.schedule)
    stats = TrainStats(precision=precision, processes=parallel.world, rank=parallel.rank, parallel=parallel.kind)
    step = 0
    if resume and latest_checkpoint(checkpoint_dir) is None:
        log.warning("no checkpoint in %s; starting from step 0", checkpoint_dir)
    elif resume and checkpoint_dir is not None:
        meta = load_checkpoint(checkpoint_dir, named, optimizer, identity)
        step = stats.resumed_from = int(meta["step"])
        stats.losses = list(meta.get("losses", []))
        stats.tokens = int(meta.get("tokens", 0))
    adapter.train()
    start = time.perf_counter()
    # grouping works on micro-batches: an optimizer step of grad_accum micro-batches takes grad_accum grouped
    # chunks of the global micro-batch (batch_size x processes), so a step's examples are the same for any N
    global_batch = cfg.batch_size * parallel.world
    lengths = [len(e.input_ids) for e in data] if getattr(cfg, "group_by_length", True) else None
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step)
        indices = step_indices(len(data), global_batch, cfg.grad_accum, step, cfg.seed, lengths)
        micro = [parallel.shard([data[i] for i in indices[m: m + global_batch]], cfg.batch_size)
                 for m in range(0, len(indices), global_batch)]
        loss_value = _optimizer_step(module, micro, cfg, optimizer, named, pad_id, stats, parallel, device, precision)
        if not math.isfinite(loss_value):
            kept = latest_checkpoint(checkpoint_dir)
            raise TrainingDiverged(f"training diverged: loss became {loss_value} at step {step + 1} (train.lr={lr:g}); "
                                   "lower train.lr or raise train.warmup_steps"
                                   + (f"; the last good checkpoint is kept in {kept}" if kept else ""))
        step += 1
        stats.losses.append(loss_value)
        if on_step and on_step(step, loss_value):
            stats.stopped = True
            break
        if checkpoint_dir is not None and (step == cfg.steps or cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            if parallel.is_main:
                _checkpoint(checkpoint_dir, step, named, optimizer, stats, identity)
            parallel.wait()
    adapter.eval()
    stats.steps = step
    stats.seconds = time.perf_counter() - start
    return stats


def enable_gradient_checkpointing(adapter) -> None:
    """Non-reentrant activation checkpointing of the transformer layers (works with a frozen embedding table,
    so prompt tuning needs no ``enable_input_require_grads`` hack). Prefix tuning is refused: its trained
    keys/values enter every layer through the cache, which checkpointed layers do not support."""
    if adapter.prefix_cache(1) is not None:
        raise TunelabError(f"train.gradient_checkpointing is not supported with {adapter.method} (key/value "
                           "prefixes enter each layer through the cache); turn it off or use prompt tuning / LoRA")
    if not getattr(adapter.model, "supports_gradient_checkpointing", False):
        raise TunelabError(f"train.gradient_checkpointing: {type(adapter.model).__name__} does not support it")
    adapter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _device_of(adapter) -> torch.device:
    return next(adapter.parameters()).device


def _checkpoint(directory: Path, step: int, named: dict[str, torch.nn.Parameter], optimizer, stats: TrainStats,
                identity: dict[str, Any] | None) -> None:
    # a finite loss can still come with an inf gradient that poisons the weights; never save those as "good"
    if not all(bool(torch.isfinite(p).all()) for p in named.values()):
        raise TrainingDiverged(f"training diverged: parameters became NaN/inf at step {step}; lower train.lr "
                               "or raise train.warmup_steps")
    save_checkpoint(directory, step, named, optimizer, {"losses": stats.losses, "tokens": stats.tokens,
                                                        "identity": identity,
                                                        "fingerprint": fingerprint(identity) if identity else None})


def _optimizer_step(module, micro: list[list[Encoded]], cfg: TrainConfig, optimizer, named, pad_id: int,
                    stats: TrainStats, parallel: distributed.Parallel, device: torch.device, precision: str) -> float:
    """One optimizer step over this process's micro-batches; returns the step's loss (mean over processes)."""
    optimizer.zero_grad(set_to_none=True)
    total, tokens = 0.0, 0
    for index, chunk in enumerate(micro):
        ids, mask, labels = (t.to(device) for t in collate(chunk, pad_id))
        with parallel.no_sync(module, last=index == len(micro) - 1):
            with distributed.autocast(precision, device):  # forward only; backward follows the forward's dtypes
                loss, _ = module(ids, mask, labels)
            (loss / len(micro)).backward()
        total += float(loss.detach()) / len(micro)
        tokens += int(mask.sum())
    total, tokens = parallel.step_totals(total, tokens)
    stats.tokens += tokens
    if math.isfinite(total):
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
        optimizer.step()
    return total
