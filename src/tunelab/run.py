"""The `tunelab run` recipe, top to bottom: validate, load, build, train, evaluate, save."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab import distributed, envinfo
from tunelab.checkpoint import training_identity
from tunelab.config import RunConfig, to_dict
from tunelab.data import TaskData, load_task
from tunelab.evaluate import EvalResult, evaluate, reference_nll
from tunelab.formatting import encode_example, resolve_template
from tunelab.methods import method_config
from tunelab.methods.base import Adapter, write_meta
from tunelab.metrics import check_names
from tunelab.models import count_parameters, load_model
from tunelab.paths import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    directory_bytes,
)
from tunelab.progress import bar
from tunelab.steplog import StepLog
from tunelab.train import TrainStats, train

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything validated before the first byte is written or the model is loaded."""

    cfg: RunConfig
    method: Any
    method_cfg: Any
    task: TaskData
    metrics: tuple[str, ...]


def prepare(cfg: RunConfig) -> Prepared:
    """Validate config, method options and data; raises TunelabError naming what to fix."""
    method, method_cfg = method_config(cfg.method)
    task = load_task(cfg.data.task, cfg.data.train, cfg.data.eval, skip_bad=cfg.data.skip_bad,
                     task_cap=cfg.data.task_cap, mixture=cfg.data.mixture, seed=cfg.train.seed,
                     sni_encoding=cfg.data.sni_encoding)
    task = method.prepare_data(method_cfg, task, cfg.train.seed)  # e.g. instruction tuning holds out tasks
    if cfg.data.max_train is not None:
        task.train = task.train[: cfg.data.max_train]
    if cfg.data.max_eval is not None:
        task.eval = task.eval[: cfg.data.max_eval]
    metric_names = tuple(cfg.eval.metrics or task.metrics)
    check_names(metric_names)
    return Prepared(cfg, method, method_cfg, task, metric_names)


def run(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Train (if the method trains) and evaluate one method on one task; write results to ``cfg.out``.

    ``OUT/result.json`` is written last, so it exists only for a finished run. A failed run
    (``TrainingDiverged``, a disk error) raises, and a killed one dies, before writing it;
    ``OUT/checkpoint/`` then holds the last good training state for ``train.resume``. A finished
    run deletes its checkpoint (``adapter/`` holds the weights).
    """
    prep = prepare(cfg)
    out = check_writable_dir(cfg.out) if cfg.out else None  # fail before hours of training, not after
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    load_start = time.perf_counter()
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code, cfg.train.seed,
                                  allow_pickle=cfg.model.allow_pickle)
    load_seconds = time.perf_counter() - load_start
    device = distributed.resolve_device(cfg.model.device)
    torch.manual_seed(cfg.train.seed)
    adapter = prep.method.build(model, tokenizer, prep.method_cfg, prep.task.train, cfg.train.seed).to(device)
    demos = prep.method.demonstrations(prep.method_cfg, prep.task.train, cfg.train.seed)
    template = resolve_template(cfg.data.template, tokenizer)

    stats, truncated = TrainStats(), 0
    if prep.method.trains:
        stats, truncated = _train(adapter, tokenizer, prep, template, demos, out, progress)
        if stats.rank != 0:  # under accelerate launch, process 0 evaluates and writes; the others are done
            return {"rank": stats.rank, "train": {"losses": stats.losses, "tokens": stats.tokens}}
    eval_examples = [adapter.rewrite(e) for e in prep.task.eval]  # a discrete prompt swaps the instruction
    with bar("evaluating", len(prep.task.eval), progress) as advance:
        result = evaluate(adapter, tokenizer, eval_examples, prep.metrics, cfg.eval, template, demos,
                          cfg.data.system_prompt, progress=advance)
    _add_demo_similarity(result, eval_examples, demos)
    _add_demonstrations(result, eval_examples, demos)
    adapter_bytes = _save_adapter(adapter, cfg, template, out / "adapter") if out else 0
    summary = _summary(prep, adapter, stats, result, load_seconds, adapter_bytes, truncated, model)
    if prep.method.trains and cfg.eval.loss:
        summary["generalization"] = _generalization(adapter, tokenizer, prep, template, demos, eval_examples)
    if out:
        atomic_write_text(out / "predictions.jsonl",
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.predictions))
        atomic_write_json(out / "result.json", summary)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # finished: adapter/ holds the weights now
    return summary


def _train(adapter: Adapter, tokenizer, prep: Prepared, template: str, demos, out: Path | None,
           progress: bool) -> tuple[TrainStats, int]:
    cfg = prep.cfg
    examples = [adapter.rewrite(e) for e in prep.task.train]
    encoded = [encode_example(tokenizer, e, template, demos(e) if demos else (), cfg.data.system_prompt,
                              cfg.data.max_length) for e in examples]
    lr = cfg.train.lr if cfg.train.lr is not None else prep.method_cfg.lr
    checkpoint_dir = out / "checkpoint" if out else None
    steps = StepLog(out, resume=cfg.train.resume) if out else None  # live loss curve for `tunelab board`

    def on_step(step: int, loss: float) -> None:
        advance(loss=loss)
        if steps is not None:
            steps.write(step, loss)

    try:
        with bar(f"training {prep.method.name}", cfg.train.steps, progress) as advance:
            stats = train(adapter, encoded, cfg.train, lr, tokenizer.pad_token_id, checkpoint_dir,
                          resume=cfg.train.resume, on_step=on_step,
                          identity=training_identity(cfg, prep.method_cfg, lr, encoded))
    finally:
        if steps is not None:
            steps.close()
    return stats, sum(e.truncated for e in encoded)


def _generalization(adapter: Adapter, tokenizer, prep: Prepared, template: str, demos,
                    eval_examples: list) -> dict[str, Any]:
    """Loss on the eval rows minus loss on as many training rows (the first ones), both teacher-forced."""
    cfg = prep.cfg
    train_examples = [adapter.rewrite(e) for e in prep.task.train[: len(eval_examples)]]
    per_split = {split: reference_nll(adapter, tokenizer, rows, template, demos, cfg.data.system_prompt,
                                      cfg.data.max_length, cfg.eval.batch_size)
                 for split, rows in (("train", train_examples), ("eval", eval_examples))}
    loss = {split: sum(n for n, _ in v) / max(1, sum(t for _, t in v)) for split, v in per_split.items()}
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


def _save_adapter(adapter: Adapter, cfg: RunConfig, template: str, directory: Path) -> int:
    with atomic_directory(directory) as tmp:
        adapter.save_weights(tmp)
        write_meta(tmp, adapter, {"base_model": cfg.model.name, "template": template,
                                  "system_prompt": cfg.data.system_prompt,
                                  "tunelab_version": envinfo.versions()["tunelab"]})
    return directory_bytes(directory)


def _summary(prep: Prepared, adapter: Adapter, stats: TrainStats, result: EvalResult, load_seconds: float,
             adapter_bytes: int, truncated: int, model) -> dict[str, Any]:
    return {
        "method": prep.method.name,
        "task": prep.task.name,
        "model": prep.cfg.model.name,
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
                  "truncated_examples": truncated, "skipped_bad_records": prep.task.skipped},
        "eval": {"seconds": round(result.seconds, 3), "generated_tokens": result.generated_tokens,
                 "tokens_per_second": round(result.generated_tokens / result.seconds, 2) if result.seconds else None},
        "load_seconds": round(load_seconds, 3),
        "peak_rss_mb": round(envinfo.peak_rss_mb(), 1),
        "config": to_dict(prep.cfg),
        "versions": envinfo.versions(),
        "git_commit": envinfo.git_commit(),
    }
