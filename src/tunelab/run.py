"""The `tunelab run` recipe, top to bottom: validate, load, build, train, evaluate, save."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from tunelab import convergence, distributed, envinfo, forgetting, tracking
from tunelab.checkpoint import latest_checkpoint, training_identity
from tunelab.config import ReportConfig, RunConfig, to_dict
from tunelab.errors import TunelabError
from tunelab.evaluate import EvalResult, evaluate, reference_nll
from tunelab.formatting import DemoSelector, PromptLayout, encode_example
from tunelab.methods.base import Adapter
from tunelab.methods.io import TaskPrompt, build_adapter, save_adapter
from tunelab.modelcard import CardInfo, equivalent_command, finish_adapter_dir
from tunelab.models import count_parameters, load_model, portable_name, random_weights
from tunelab.paths import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    directory_bytes,
)
from tunelab.phases import PhaseClock
from tunelab.prepare import Prepared, prepare
from tunelab.progress import bar
from tunelab.steplog import StepLog
from tunelab.train import TrainStats, lr_lambda, train

log = logging.getLogger(__name__)

STOPPED_FILE = "stopped.json"  # written instead of result.json when a monitor stopped training


class DevMonitor(Protocol):
    """Watches a run's teacher-forced loss on its eval rows while it trains (e.g. a tuning trial's pruner)."""

    every: int  # optimizer steps between two measurements

    def __call__(self, step: int, dev_loss: float) -> bool:
        """Called after steps every, 2 * every, ... before the last one; True stops training there."""
        ...


def layout_of(cfg: RunConfig, demos: DemoSelector | None = None) -> PromptLayout:
    """The prompt layout a run trains, evaluates and saves with."""
    return PromptLayout(cfg.data.template, cfg.data.system_prompt, demos, cfg.data.max_length)


def run(cfg: RunConfig, progress: bool = True, monitor: DevMonitor | None = None,
        prepared: Prepared | None = None) -> dict[str, Any]:
    """Train (if the method trains) and evaluate one method on one task; write results to ``cfg.out``.

    ``OUT/result.json`` is written last, so it exists only for a finished run. A failed run
    (``TrainingDiverged``, a disk error) raises, and a killed one dies, before writing it;
    ``OUT/checkpoint/`` then holds the last good training state for ``train.resume``. A finished
    run deletes its checkpoint (``adapter/`` holds the weights).

    With ``monitor``, the mean teacher-forced loss on the eval rows is measured every
    ``monitor.every`` steps before the last (logged as ``dev_loss`` in ``train_log.jsonl``) and handed
    to it; a run that trained to the end is always evaluated. When the monitor says stop, the run ends
    there without evaluating: ``OUT/stopped.json`` (step, dev loss) is written instead of
    ``result.json`` and the returned dict is ``{"stopped": {...}}``.
    """
    clock = PhaseClock()  # result.json's phases: where the run's seconds went (tunelab.phases)
    with clock.phase("data"):
        prep = prepared or prepare(cfg)  # the CLI prepares first, before torch loads
    if monitor is not None and distributed.world_size() > 1:
        raise TunelabError("a dev-loss monitor (tune.pruner) needs a single-process run; set resources.processes: 1")
    out = check_writable_dir(cfg.out) if cfg.out else None  # fail before hours of training, not after
    report = cfg.report if distributed.is_main_process() else ReportConfig()  # process 0 reports
    with tracking.open_trackers(report, run_name(prep), out, to_dict(cfg)) as tracker:
        return _run(prep, out, tracker, progress, monitor, clock)


def run_name(prep: Prepared) -> str:
    """``report.run_name``, else METHOD-TASK-seedS (plus -nN with a training-size cap)."""
    cfg = prep.cfg
    if cfg.report.run_name:
        return cfg.report.run_name
    size = f"-n{cfg.data.max_train}" if cfg.data.max_train is not None else ""
    return f"{prep.method.name}-{prep.task.name}-seed{cfg.train.seed}{size}"


def _run(prep: Prepared, out: Path | None, tracker: tracking.Trackers, progress: bool,
         monitor: DevMonitor | None = None, clock: PhaseClock | None = None) -> dict[str, Any]:
    cfg = prep.cfg
    clock = clock or PhaseClock()
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    load_start = time.perf_counter()
    with clock.phase("model_load"):
        model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code, cfg.train.seed,
                                      allow_pickle=cfg.model.allow_pickle)
    load_seconds = time.perf_counter() - load_start
    device = distributed.resolve_device(cfg.model.device)
    torch.manual_seed(cfg.train.seed)
    build_start = time.perf_counter()  # a search in build (prompt_optimization, discrete_prompt) is its training
    with clock.phase("build"):
        adapter = build_adapter(prep.method, model, tokenizer, prep.method_cfg, prep.task.train,
                                cfg.train.seed).to(device)
    build_seconds = time.perf_counter() - build_start
    with clock.phase("demonstrations"):  # a retrieval index over the training rows (ICL, IPT)
        demos = prep.method.demonstrations(prep.method_cfg, prep.task.train, cfg.train.seed)
    layout = layout_of(cfg, demos).resolved(tokenizer)

    stats, truncated = TrainStats(), 0
    if prep.method.trains:
        with clock.phase("train"):
            stats, truncated, dev_losses = _train(adapter, tokenizer, prep, layout, out, progress, tracker, monitor,
                                                  clock)
        if stats.rank != 0:  # under accelerate launch, process 0 evaluates and writes; the others are done
            return {"rank": stats.rank, "train": {"losses": stats.losses, "tokens": stats.tokens}}
        if stats.stopped:
            return _stopped(stats, dev_losses, out)
    eval_examples = [adapter.rewrite(e) for e in prep.task.eval]  # a discrete prompt swaps the instruction
    with clock.phase("eval"), bar("evaluating", len(prep.task.eval), progress) as advance:
        result = evaluate(adapter, tokenizer, layout, eval_examples, prep.metrics, cfg.eval, progress=advance)
    _add_demo_similarity(result, eval_examples, demos)
    _add_demonstrations(result, eval_examples, demos)
    with clock.phase("save"):
        adapter_bytes = _save_adapter(adapter, prep, layout, result, out / "adapter") if out else 0
    summary = _summary(prep, adapter, stats, result, load_seconds, adapter_bytes, truncated, model)
    summary["train"]["build_seconds"] = round(build_seconds, 3)
    if prep.method.trains and cfg.eval.loss:
        with clock.phase("generalization"):
            summary["generalization"] = _generalization(adapter, tokenizer, prep, layout, eval_examples)
    if prep.method.trains and cfg.eval.forgetting:
        with clock.phase("forgetting"):
            summary["forgetting"] = forgetting.measure(adapter, tokenizer, cfg)
    if out:
        with clock.phase("save"):
            atomic_write_text(out / "predictions.jsonl",
                              "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.predictions))
    summary["phases"] = clock.record()  # up to here; writing result.json itself is a grid's `other`
    if out:
        atomic_write_json(out / "result.json", summary)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # finished: adapter/ holds the weights now
    tracker.log_metrics(tracking_summary(summary), step=stats.steps)
    if out:
        tracker.log_artifact(out / "adapter", "adapter")
    return summary


def tracking_summary(summary: dict[str, Any]) -> dict[str, float]:
    """The end-of-run values trackers get, under Trainer's ``train/`` and ``eval/`` names."""
    train, evaluation = summary["train"], summary["eval"]
    values = {f"eval/{k}": v for k, v in summary["metrics"].items()}
    values.update({"eval/runtime": evaluation["seconds"], "eval/tokens_per_second": evaluation["tokens_per_second"],
                   "train/train_runtime": train["seconds"], "train/tokens_per_second": train["tokens_per_second"],
                   "train/train_loss": train["final_loss"], "train/trainable_params": summary["trainable_params"],
                   "adapter_bytes": summary["adapter_bytes"], "peak_rss_mb": summary["peak_rss_mb"]})
    if "generalization" in summary:
        values["eval/loss"] = summary["generalization"]["eval_loss"]
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float)}


def _stopped(stats: TrainStats, dev_losses: list[tuple[int, float]], out: Path | None) -> dict[str, Any]:
    """A run its monitor stopped: no evaluation, no adapter; ``stopped.json`` says where and why."""
    info = {"step": stats.steps, "dev_loss": dev_losses[-1][1] if dev_losses else None}
    if out:
        atomic_write_json(out / STOPPED_FILE, info)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # a stopped run is not resumed
    return {"stopped": info}


def _train(adapter: Adapter, tokenizer, prep: Prepared, layout: PromptLayout, out: Path | None,
           progress: bool, tracker: tracking.Trackers, monitor: DevMonitor | None = None,
           clock: PhaseClock | None = None) -> tuple[TrainStats, int, list[tuple[int, float]]]:
    """Train; returns the stats, the number of truncated examples and the (step, dev loss) measured."""
    cfg = prep.cfg
    examples = [adapter.rewrite(e) for e in prep.task.train]
    encoded = [encode_example(tokenizer, layout, e) for e in examples]
    dev_rows = [adapter.rewrite(e) for e in prep.task.eval] if monitor is not None else []
    lr = cfg.train.lr if cfg.train.lr is not None else prep.method_cfg.lr
    checkpoint_dir = out / "checkpoint" if out else None
    resume = _resumes(cfg.train, checkpoint_dir)
    schedule = lr_lambda(cfg.train.warmup_steps, cfg.train.steps, cfg.train.schedule)  # as train() sets it
    steps = StepLog(out, resume=resume) if out else None  # live loss curve for `tunelab board`
    dev_losses: list[tuple[int, float]] = []

    def on_step(step: int, loss: float) -> bool:
        advance(loss=loss)
        tracker.log_metrics({"train/loss": loss, "train/learning_rate": lr * schedule(step - 1)}, step=step)
        dev_loss, stop = None, False
        if monitor is not None and step % monitor.every == 0 and step < cfg.train.steps:
            with (clock or PhaseClock()).phase("dev_loss"):  # a pruner's measurement: not training
                dev_loss = _mean_loss(reference_nll(adapter, tokenizer, layout, dev_rows, cfg.eval.batch_size,
                                                    cfg.eval.precision))
            adapter.train()  # reference_nll scores in eval mode; training goes on
            dev_losses.append((step, dev_loss))
            tracker.log_metrics({"eval/loss": dev_loss}, step=step)
            stop = bool(monitor(step, dev_loss))
        if steps is not None:
            steps.write(step, loss, dev_loss)
        return stop

    try:
        with bar(f"training {prep.method.name}", cfg.train.steps, progress) as advance:
            stats = train(adapter, encoded, cfg.train, lr, tokenizer.pad_token_id, checkpoint_dir,
                          resume=resume, on_step=on_step,
                          identity=training_identity(cfg, prep.method_cfg, lr, encoded))
    finally:
        if steps is not None:
            steps.close()
    for step, loss in enumerate(stats.losses[: stats.resumed_from or 0], start=1):  # the curve before a resume
        tracker.log_metrics({"train/loss": loss, "train/learning_rate": lr * schedule(step - 1)}, step=step)
    return stats, sum(e.truncated for e in encoded), dev_losses


def _resumes(train_cfg: Any, checkpoint_dir: Path | None) -> bool:
    """Whether training continues from ``checkpoint_dir``: whenever it holds a checkpoint (``train`` refuses one
    made with other settings and names them), unless ``train.restart`` throws it away first."""
    if checkpoint_dir is None:
        return False
    if train_cfg.restart:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return False
    return train_cfg.resume or latest_checkpoint(checkpoint_dir) is not None


def _mean_loss(per_example: list[tuple[float, int]]) -> float:
    """Token-weighted mean of (summed NLL, tokens) pairs: the training loss's own average."""
    return sum(n for n, _ in per_example) / max(1, sum(t for _, t in per_example))


def _generalization(adapter: Adapter, tokenizer, prep: Prepared, layout: PromptLayout,
                    eval_examples: list) -> dict[str, Any]:
    """Loss on the eval rows minus loss on as many training rows (the first ones), both teacher-forced."""
    cfg = prep.cfg
    train_examples = [adapter.rewrite(e) for e in prep.task.train[: len(eval_examples)]]
    per_split = {split: reference_nll(adapter, tokenizer, layout, rows, cfg.eval.batch_size)
                 for split, rows in (("train", train_examples), ("eval", eval_examples))}
    loss = {split: _mean_loss(v) for split, v in per_split.items()}
    return {"train_loss": round(loss["train"], 5), "eval_loss": round(loss["eval"], 5),
            "gap": round(loss["eval"] - loss["train"], 5),
            "train_nll": [[round(n, 4), t] for n, t in per_split["train"]],  # per example: summed NLL, tokens
            "eval_nll": [[round(n, 4), t] for n, t in per_split["eval"]]}


def _add_demo_similarity(result: EvalResult, examples, demos) -> None:
    """Per-example mean cosine between input and demonstrations (for analyses by demo similarity)."""
    similarity = getattr(demos, "similarity", None)
    if similarity is not None:
        for row, example in zip(result.predictions, examples, strict=True):
            row["demo_similarity"] = similarity(example)


def _add_demonstrations(result: EvalResult, examples, demos) -> None:
    """The demonstrations each example was shown (ids and text), for reading predictions example by example."""
    if demos is None:
        return
    for row, example in zip(result.predictions, examples, strict=True):
        row["demonstrations"] = [{"id": d.id, "instruction": d.instruction, "input": d.input, "output": d.output}
                                 for d in demos(example)]


def _save_adapter(adapter: Adapter, prep: Prepared, layout: PromptLayout, result: EvalResult, directory: Path) -> int:
    """Weights, tunelab_adapter.json and a model card; the base model named the same on every machine."""
    cfg = prep.cfg
    base = portable_name(cfg.model.name)
    versions = envinfo.versions()
    with atomic_directory(directory) as tmp:
        # the run config, so eval and serve rebuild demonstrations from its data; not where it wrote (`out`)
        # and the instruction its examples shared, so a server lays out a bare input as training did
        save_adapter(adapter, tmp, base, layout, {k: v for k, v in to_dict(cfg).items() if k != "out"},
                     TaskPrompt.shared_by([*prep.task.train, *prep.task.eval]))
        finish_adapter_dir(tmp, CardInfo(
            base, prep.method.name, prep.task.name, result.metrics, result.ci,
            len(prep.task.train) if prep.method.trains else 0, len(prep.task.eval),
            equivalent_command(to_dict(cfg), to_dict(RunConfig())), asdict(prep.method_cfg), versions))
    return directory_bytes(directory)


def _summary(prep: Prepared, adapter: Adapter, stats: TrainStats, result: EvalResult, load_seconds: float,
             adapter_bytes: int, truncated: int, model) -> dict[str, Any]:
    return {
        "method": prep.method.name,
        "task": prep.task.name,
        "model": prep.cfg.model.name,
        # false for random-weight models (tiny, random:*): the speed figures hold, the metrics mean nothing
        "quality_meaningful": not random_weights(prep.cfg.model.name),
        "metrics": result.metrics,
        "metrics_ci": result.ci,  # 95% bootstrap interval per metric (tunelab.stats)
        "n_train": len(prep.task.train) if prep.method.trains else 0,
        "n_eval": len(prep.task.eval),
        "trainable_params": adapter.num_trainable() if prep.method.trains else 0,
        "total_params": count_parameters(model),
        "adapter_bytes": adapter_bytes,
        "train": {"steps": stats.steps, "precision": stats.precision, "processes": stats.processes,
                  "parallel": stats.parallel, "seconds": round(stats.seconds, 3), "tokens": stats.tokens,
                  "tokens_per_second": round(stats.tokens / stats.seconds, 2) if stats.seconds else None,
                  "final_loss": stats.final_loss, "losses": stats.losses, "resumed_from": stats.resumed_from,
                  "convergence": convergence.assess(stats.losses),  # had the loss flattened (None: too few steps)
                  "truncated_examples": truncated, "skipped_bad_records": prep.task.skipped},
        "eval": {"seconds": round(result.seconds, 3), "generated_tokens": result.generated_tokens,
                 "decode_step": result.decode_step or None,  # which inference.steps backend decoded (None: scoring only)
                 "termination": result.termination,  # answers cut at the token limit (tunelab.termination)
                 "tokens_per_second": round(result.generated_tokens / result.seconds, 2) if result.seconds else None},
        "load_seconds": round(load_seconds, 3),
        "peak_rss_mb": round(envinfo.peak_rss_mb(), 1),
        "config": to_dict(prep.cfg),
        "versions": envinfo.versions(),
        "git_commit": envinfo.git_commit(),
        "machine": envinfo.machine(),  # what the seconds above were measured on
    }
