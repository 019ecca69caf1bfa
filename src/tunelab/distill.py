"""Distilling a soft prompt into a LoRA: `tunelab export ADAPTER --to lora OUT`.

Teacher: the base model with the adapter's soft prompt (a method declaring ``Capabilities.soft_prompt``
and nothing a LoRA on the plain base could not stand in for: prompt tuning, P-tuning). Student: the same
base weights with fresh LoRA layers and no soft prompt. On the adapter's own training rows, laid out as
its run laid them out, both read prompt + reference output (teacher forcing); at every text position that
predicts an output token (the positions the training loss uses; the teacher's virtual tokens are dropped,
so position t is the same token for both) the student is trained towards the teacher's next-token
distribution, loss = mean KL(teacher || student) over those positions (Hinton et al. 2015 at T = 1; the
context being distilled is a learned one, as in Snell et al. 2022, "Learning by Distilling Context").
The loop is ``train.train``'s: the student's ``forward`` returns the KL instead of the cross-entropy.

OUT is a PEFT LoRA directory (``peft.PeftModel.from_pretrained`` loads it; so does
``methods.io.load_adapter``, as a ``lora`` adapter) with a model card naming the teacher, and
``distill.json``: teacher and student metrics on the run's eval rows, the mean KL there before and after,
and the distillation's cost.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunelab import distributed, envinfo
from tunelab.config import RunConfig, from_dict, to_dict
from tunelab.data.example import Example
from tunelab.errors import ConfigError, TunelabError
from tunelab.evaluate import evaluate
from tunelab.export import ExportConfig
from tunelab.formatting import IGNORE_INDEX, PromptLayout, encode_example
from tunelab.methods import METHODS, method_config
from tunelab.methods.base import ADAPTER_META, Adapter, Method, read_meta
from tunelab.methods.io import adapter_dir, load_adapter, read_checked_meta, run_config, save_adapter
from tunelab.modelcard import CARD, CardInfo, finish_adapter_dir
from tunelab.modeling import hidden_states
from tunelab.paths import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    directory_bytes,
)
from tunelab.progress import bar
from tunelab.train import collate, train

DISTILL_FILE = "distill.json"


def check_distillable(directory: Path, method: Method, config: Any, meta: dict[str, Any]) -> None:
    """Refuse an adapter a LoRA on the plain base model cannot replace: decided by its capabilities (with its
    options: the generic peft method's depend on its peft_type)."""
    caps = method.capabilities_for(config)
    if not caps.soft_prompt or caps.demonstrations or caps.prefix or caps.changes_weights or caps.rewrites_input:
        raise ConfigError(f"{directory}: `tunelab export --to lora` distils a soft prompt shown without "
                          f"demonstrations; this {method.name} adapter declares {caps.describe()} (needs soft_prompt "
                          "and none of demonstrations, prefix, changes_weights, rewrites_input); export a "
                          "prompt_tuning or p_tuning run")
    if meta.get("folded_from"):
        raise ConfigError(f"{directory}: its soft prompt was trained on base + the run folded in from "
                          f"{meta['folded_from']} (method.init_from), which a LoRA on the plain base does not "
                          "reproduce; export a soft prompt trained on the base model itself")


def check_out(out: str, source: Path) -> Path:
    """OUT, absolute; refused when it would replace the teacher or a directory that is not an earlier export."""
    path = Path(out).expanduser().resolve()
    if path == source or source.is_relative_to(path):
        raise ConfigError(f"OUT={path} holds the adapter being exported ({source}); pass another directory")
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / DISTILL_FILE).is_file())):
        raise ConfigError(f"OUT={path} exists and is not an earlier export (no {DISTILL_FILE}); "
                          "pass a new or empty directory")
    check_writable_dir(path.parent)  # fail before the distillation, not after
    return path


def teacher_run(directory: Path, meta: dict[str, Any]) -> RunConfig:
    """The resolved config of the run that trained the teacher: its data, layout, model and training settings."""
    saved = run_config(directory, meta)
    if saved is None:
        raise TunelabError(f"{directory}: distillation trains on the adapter's own training rows, named by its run "
                           f"config ({ADAPTER_META} run_config, or the run's result.json); pass the adapter/ of a "
                           "`tunelab run --out X` (or copy X/result.json beside it)")
    return from_dict(RunConfig, {k: v for k, v in saved.items() if k != "out"})


def target_logits(adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """(N, V) next-token logits at the N text positions that predict a label token, in row-major order.

    Virtual tokens are dropped first, so the same (row, position) means the same text token for an
    adapter with a soft prompt and one without (``modeling.token_logprobs`` picks the same positions)."""
    hidden, _, inputs, are_logits = hidden_states(adapter, input_ids, attention_mask)
    hidden = hidden[:, inputs.n_soft:]  # (B, T, C)
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # token t+1 is predicted at t
    picked = hidden[:, :-1][rows, cols]  # (N, C) or (N, V)
    return picked if are_logits else adapter.model.get_output_embeddings()(picked)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at each position, (N,)."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)


class Distillation(Adapter):
    """The student as ``train.train`` sees it: its trainable LoRA, and a forward that is the KL to the teacher."""

    def __init__(self, student: Adapter, teacher: Adapter) -> None:
        super().__init__(student.model, student.method, student.config)
        self.student, self.teacher = student, teacher  # the teacher's parameters are all frozen

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            target = target_logits(self.teacher, input_ids, attention_mask, labels)
        kl = token_kl(target, target_logits(self.student, input_ids, attention_mask, labels))
        if kl.numel() == 0:
            return kl.sum() * 0.0, 0
        return kl.mean(), int(kl.numel())

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        self.teacher.eval()  # the teacher is never trained
        return self


@torch.no_grad()
def mean_kl(teacher: Adapter, student: Adapter, tokenizer, layout: PromptLayout, examples: Sequence[Example],
            batch_size: int = 16) -> float:
    """Token-weighted mean KL(teacher || student) over the output positions of ``examples`` (teacher-forced)."""
    teacher.eval()
    student.eval()
    encoded = [encode_example(tokenizer, layout, e) for e in examples]
    device = student.model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        ids, mask, labels = (t.to(device) for t in collate(encoded[start:start + batch_size], tokenizer.pad_token_id))
        kl = token_kl(target_logits(teacher, ids, mask, labels), target_logits(student, ids, mask, labels))
        total, count = total + float(kl.sum()), count + kl.numel()
    return total / max(1, count)


def student_config(cfg: ExportConfig):
    """The student's LoRA options, as the ``lora`` method validates them (no dropout: it matches a teacher)."""
    _, config = method_config({"name": "lora", "r": cfg.rank, "alpha": cfg.alpha or 2 * cfg.rank, "dropout": 0.0,
                               "target_modules": list(cfg.target_modules), "lr": cfg.lr}, path="export")
    return config


def export_command_line(cfg: ExportConfig, source: Path, out: Path) -> str:
    """The `tunelab export` command that reproduces this export."""
    args = ["tunelab", "export", str(source), "--to", "lora", str(out), "--rank", str(cfg.rank),
            "--steps", str(cfg.steps), "--lr", f"{cfg.lr:g}", "--target-modules", ",".join(cfg.target_modules)]
    args += ["--alpha", str(cfg.alpha)] if cfg.alpha else []
    args += ["--batch-size", str(cfg.batch_size)] if cfg.batch_size else []
    return " ".join(shlex.quote(a) for a in args)


def export_lora(cfg: ExportConfig, progress: bool = True) -> dict[str, Any]:
    """Distil the soft prompt in ``cfg.adapter`` into a LoRA written to ``cfg.out``; returns distill.json's content."""
    from tunelab.data.prepare import prepare_task
    from tunelab.models import load_model, portable_name, resolve_base_model

    source = adapter_dir(cfg.adapter, "ADAPTER")
    method, method_cfg, meta = read_checked_meta(source)
    check_distillable(source, method, method_cfg, meta)
    out = check_out(cfg.out, source)
    run_cfg = teacher_run(source, meta)
    lora_cfg = student_config(cfg)
    task = prepare_task(run_cfg.data, run_cfg.train.seed, method, method_cfg)  # the teacher's training and eval rows, as its run had them
    if not task.train:
        raise TunelabError(f"{source}: the teacher's run has no training rows to distil on (data.task={run_cfg.data.task})")
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    name = resolve_base_model(meta.get("base_model")) or run_cfg.model.name
    models = [load_model(name, run_cfg.model.dtype, run_cfg.model.trust_remote_code, run_cfg.train.seed,
                         allow_pickle=run_cfg.model.allow_pickle) for _ in range(2)]  # teacher's, student's copy
    tokenizer = models[0][1]
    device = distributed.resolve_device(run_cfg.model.device)
    loaded = load_adapter(source, models[0][0], tokenizer, base_model=name)
    teacher, layout = loaded.adapter.to(device), loaded.layout
    student = METHODS["lora"].build(models[1][0], tokenizer, lora_cfg, [], run_cfg.train.seed).to(device)
    batch = cfg.batch_size or run_cfg.train.batch_size
    kl_before = mean_kl(teacher, student, tokenizer, layout, task.eval, run_cfg.eval.batch_size)

    encoded = [encode_example(tokenizer, layout, e) for e in task.train]
    train_cfg = dataclasses.replace(run_cfg.train, steps=cfg.steps, batch_size=batch, warmup_steps=0,
                                    schedule="linear", weight_decay=0.0, checkpoint_every=0, resume=False)
    with bar("distilling", cfg.steps, progress) as advance:
        stats = train(Distillation(student, teacher), encoded, train_cfg, cfg.lr, tokenizer.pad_token_id,
                      on_step=lambda step, loss: advance(loss=loss))
    kl_after = mean_kl(teacher, student, tokenizer, layout, task.eval, run_cfg.eval.batch_size)
    metrics = tuple(run_cfg.eval.metrics or task.metrics)
    scores = {}
    for role, adapter in (("teacher", teacher), ("student", student)):
        with bar(f"evaluating the {role}", len(task.eval), progress) as advance:
            scores[role] = evaluate(adapter, tokenizer, layout, task.eval, metrics, run_cfg.eval, progress=advance)

    base = meta.get("base_model") or portable_name(name)
    report: dict[str, Any] = {
        "teacher": {"adapter": str(source), "method": method.name, "metrics": scores["teacher"].metrics,
                    "metrics_ci": scores["teacher"].ci},
        "student": {"method": "lora", "r": lora_cfg.r, "alpha": lora_cfg.alpha,
                    "target_modules": lora_cfg.target_modules, "metrics": scores["student"].metrics,
                    "metrics_ci": scores["student"].ci, "trainable_params": student.num_trainable()},
        "kl": {"before": round(kl_before, 6), "after": round(kl_after, 6), "on": "eval rows, output positions"},
        "distill": {"steps": stats.steps, "lr": cfg.lr, "batch_size": batch, "losses": stats.losses,
                    "seconds": round(time.perf_counter() - wall_start, 3),
                    "cpu_seconds": round(time.process_time() - cpu_start, 3)},
        "task": task.name, "n_train": len(task.train), "n_eval": len(task.eval), "base_model": base,
        "command": export_command_line(cfg, source, out), "versions": envinfo.versions(),
    }
    _write(out, student, layout, run_cfg, lora_cfg, report)
    return report


def _write(out: Path, student: Adapter, layout: PromptLayout, run_cfg: RunConfig, lora_cfg,
           report: dict[str, Any]) -> None:
    """The LoRA in PEFT format, tunelab_adapter.json (naming its teacher), the model card and distill.json."""
    saved = {k: v for k, v in to_dict(run_cfg).items() if k != "out"}  # its data, for eval's seen-task checks
    saved["method"] = lora_cfg.as_given()
    with atomic_directory(out) as tmp:
        save_adapter(student, tmp, report["base_model"], layout, saved)
        meta = read_meta(tmp)
        meta["distilled_from"] = {"adapter": report["teacher"]["adapter"], "method": report["teacher"]["method"]}
        atomic_write_json(tmp / ADAPTER_META, meta)
        finish_adapter_dir(tmp, CardInfo(
            report["base_model"], "lora", report["task"], report["student"]["metrics"],
            report["student"]["metrics_ci"], report["n_train"], report["n_eval"], report["command"],
            asdict(lora_cfg), report["versions"]))
        card = (tmp / CARD).read_text()
        head, sep, rest = card.partition("\n## Base model")
        atomic_write_text(tmp / CARD, f"{head}\n{origin_section(report)}{sep}{rest}")
        report["student"]["adapter_bytes"] = directory_bytes(tmp)
        atomic_write_json(tmp / DISTILL_FILE, report)


def origin_section(report: dict[str, Any]) -> str:
    """The model card's "Distilled from" section: the teacher, the objective, both scores."""
    teacher, student = report["teacher"], report["student"]
    rows = "\n".join(f"| {m} | {teacher['metrics'][m]:.4f} | {student['metrics'][m]:.4f} |" for m in teacher["metrics"])
    return f"""
## Distilled from

This LoRA (rank {student['r']}, alpha {student['alpha']}, on {', '.join(student['target_modules'])}) was distilled
from the {teacher['method']} adapter `{teacher['adapter']}` by `tunelab export --to lora`: on its
{report['n_train']} training rows, {report['distill']['steps']} steps minimising KL(teacher || student) of the
next-token distributions at the output positions (teacher: the base model with the soft prompt; student: the
base model with this LoRA and no soft prompt). Mean KL on the {report['n_eval']} eval rows:
{report['kl']['before']:.4f} before, {report['kl']['after']:.4f} after.

| metric | teacher (soft prompt) | student (this LoRA) |
|---|---|---|
{rows}
"""
