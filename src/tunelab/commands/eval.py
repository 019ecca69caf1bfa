"""`tunelab eval`: score a model (optionally with an adapter) on a data file, with 95% intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tunelab.commands import console as make_console


def _fmt(value: float, ci: list[float] | None) -> tuple[str, str]:
    return f"{value:.2f}", (f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def print_report(console: Console, report) -> None:
    """Overall scores with intervals, then one row per task when the protocol scores tasks."""
    info = report.info
    title = f"{info['protocol']}: {info['model']}" + (f" + {info['method']} adapter" if info.get("adapter") else "")
    table = Table(title=f"{title} on {info['data']} ({info['n_eval']} examples)")
    for col in ("metric", "score", "95% CI"):
        table.add_column(col)
    for name, value in report.metrics.items():
        table.add_row(name, *_fmt(value, report.metrics_ci.get(name)))
    console.print(table)
    if report.per_task:
        names = [n for n in next(iter(report.per_task.values()))["metrics"]]
        tasks = Table(title="per task")
        tasks.add_column("task", overflow="fold")
        tasks.add_column("n", justify="right")
        for n in names:
            tasks.add_column(f"{n} [95% CI]", justify="right")
        for task, row in sorted(report.per_task.items()):
            cells = [" ".join(_fmt(row["metrics"][n], row["metrics_ci"].get(n))) for n in names]
            tasks.add_row(task, str(row["n"]), *cells)
        console.print(tasks)
    if info.get("excluded_seen_tasks"):
        console.print(f"excluded {len(info['excluded_seen_tasks'])} tasks seen in training ({info['seen_from']})")
    cut = info.get("termination")
    if cut and cut["at_limit"]:
        console.print(f"{cut['at_limit']} of {cut['answers']} answers ran to the token limit without ending (raise "
                      "eval.max_new_tokens, set eval.stop, or train longer: a prompt that never learned the end token "
                      "loops)")
    console.print(f"{info['n_eval']} examples in {info['seconds']:.1f} s (model load {info['load_seconds']:.1f} s)")


Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. eval.batch_size=4 protocol=super_ni")]


def eval_command(
    data: Annotated[str | None, typer.Option(help="JSONL file, or a task directory (its test/eval split)")] = None,
    model: Annotated[str | None, typer.Option(help="base model (default: the adapter's, else smollm2-135m)")] = None,
    adapter: Annotated[str | None, typer.Option(help="adapter directory (RUN/adapter, with tunelab_adapter.json)")] = None,
    protocol: Annotated[str | None, typer.Option(help="standard | super_ni (unseen tasks, definition + k examples) "
                                                      "(default: standard)")] = None,
    k: Annotated[int | None, typer.Option(help="super_ni: positive examples shown with each definition (default: 2)")] = None,
    tasks_file: Annotated[str | None, typer.Option(help="super_ni: tasks.jsonl (default: beside --data)")] = None,
    seen_from: Annotated[str | None, typer.Option(help="super_ni: training data whose tasks are excluded "
                                                         "(default: the adapter's run)")] = None,
    include_seen: Annotated[bool | None, typer.Option("--include-seen", help="super_ni: keep tasks seen in training")] = None,
    metrics: Annotated[str | None, typer.Option(help="comma-separated metric names (default: the task's)")] = None,
    max_eval: Annotated[int | None, typer.Option(help="cap on examples")] = None,
    max_per_task: Annotated[int | None, typer.Option(help="first N examples of each task")] = None,
    batch_size: Annotated[int | None, typer.Option(help="generation batch size (default: 16)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="default: from reference lengths (per task)")] = None,
    template: Annotated[str | None, typer.Option(help="auto | chat | alpaca | plain (an adapter's own wins under auto) "
                                                      "(default: auto)")] = None,
    sample: Annotated[bool | None, typer.Option("--sample", help="sample instead of greedy decoding")] = None,
    temperature: Annotated[float | None, typer.Option(help="(default: 1.0)")] = None,
    top_p: Annotated[float | None, typer.Option(help="(default: 1.0)")] = None,
    resamples: Annotated[int | None, typer.Option(help="bootstrap resamples for the 95% intervals (default: 1000)")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16 | auto: prefill and decode each in bf16 where the "
                                                      "device is fast at it (docs/performance.md) (default: fp32)")] = None,
    engine: Annotated[str | None, typer.Option(help="tunelab | vllm: which engine generates (vllm: the optional extra, "
                                                   "tunelab[vllm]; docs/serving.md) (default: tunelab)")] = None,
    out: Annotated[str | None, typer.Option(help="write OUT/metrics.json and OUT/predictions.jsonl")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with EvalCommandConfig keys")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    overrides: Overrides = None,
) -> None:
    """Evaluate a model (and adapter) on a data file; prints scores with 95% bootstrap intervals.

    Settings come from defaults < --config YAML < dotted overrides (``eval.batch_size=4``) < flags;
    every value is checked before the model loads.
    """
    from tunelab.config import EvalCommandConfig, build
    from tunelab.progress import bar
    from tunelab.protocols import run_eval, select_examples  # torch loads with the model, not before

    console = make_console()
    flags = {"data": data, "model": model, "adapter": adapter, "protocol": protocol, "k": k, "tasks_file": tasks_file,
             "seen_from": seen_from, "include_seen": include_seen, "metrics": metrics, "max_eval": max_eval,
             "max_per_task": max_per_task, "eval.batch_size": batch_size, "eval.max_new_tokens": max_new_tokens,
             "template": template, "eval.do_sample": sample, "eval.temperature": temperature, "eval.top_p": top_p,
             "n_resamples": resamples, "out": out, "eval.precision": precision,
             "eval.engine": engine}
    req = build(EvalCommandConfig, config, overrides, flags)
    n = len(select_examples(req)[0])  # validates data and flags before the model loads
    with bar("evaluating", n, not quiet) as advance:
        report = run_eval(req, progress=advance)
    print_report(console, report)
    if req.out:
        console.print(f"wrote {req.out}/metrics.json and {req.out}/predictions.jsonl")
