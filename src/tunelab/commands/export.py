"""`tunelab export ADAPTER --to lora|vllm OUT`: a soft prompt distilled into a LoRA that LoRA-only servers load, or
an adapter written for vLLM (soft prompt as prompt_embeds, LoRA files, or the fine-tuned model) with a script."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tunelab.commands import console as make_console


def print_export(console: Console, report: dict[str, Any], out: str) -> None:
    """Teacher and student scores side by side, then the KL before and after distillation."""
    teacher, student = report["teacher"], report["student"]
    table = Table(title=f"{teacher['method']} -> lora (rank {student['r']}) on {report['task']} "
                        f"({report['n_eval']} eval rows)")
    for col in ("metric", "teacher (soft prompt)", "student (LoRA)"):
        table.add_column(col)
    for name, value in teacher["metrics"].items():
        table.add_row(name, f"{value:.2f}", f"{student['metrics'][name]:.2f}")
    table.add_row("KL(teacher || student)", "", f"{report['kl']['before']:.4f} -> {report['kl']['after']:.4f}")
    console.print(table)
    console.print(f"wrote {out} (PEFT LoRA; distill.json beside it) in {report['distill']['seconds']:.1f} s")


def export_command(
    adapter: Annotated[str, typer.Argument(help="the adapter to export: a run directory or its adapter/")],
    out: Annotated[str, typer.Argument(help="output directory (replaced if it holds an earlier export)")],
    to: Annotated[str, typer.Option(help="lora: distil a soft prompt (prompt_tuning, p_tuning) into a LoRA; vllm: what "
                                         "vLLM needs (soft prompt for prompt_embeds, LoRA, or model) + a script")] = "lora",
    rank: Annotated[int | None, typer.Option(help="lora: rank of the student (default: 8)")] = None,
    alpha: Annotated[int | None, typer.Option(help="lora: scale alpha / rank (default: 2 x rank)")] = None,
    target_modules: Annotated[str | None, typer.Option(help="lora: comma-separated module names, or all-linear "
                                                             "(default: q_proj,k_proj,v_proj,o_proj)")] = None,
    steps: Annotated[int | None, typer.Option(help="lora: distillation steps (default: 200)")] = None,
    lr: Annotated[float | None, typer.Option(help="lora: learning rate (default: 1e-3)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="lora: default: the adapter's run's train.batch_size")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Export an adapter for other servers; --to lora distils a soft prompt into a PEFT LoRA (writes OUT/distill.json)."""
    from tunelab.config import build
    from tunelab.export import ExportConfig, export

    flags = {"adapter": adapter, "out": out, "to": to, "rank": rank, "alpha": alpha, "target_modules": target_modules,
             "steps": steps, "lr": lr, "batch_size": batch_size}
    cfg = build(ExportConfig, flags=flags)
    report = export(cfg, progress=not quiet)
    if cfg.to == "vllm":
        make_console().print(f"wrote {cfg.out}: {', '.join(report['parts'])} ({report['method']} on "
                             f"{report['base_model']}); run: python {cfg.out}/serve_with_vllm.py \"INPUT\"")
        return
    print_export(make_console(), report, cfg.out)
