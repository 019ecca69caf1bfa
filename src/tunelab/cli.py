"""The `tunelab` command: parse, build a config, call one library function, report errors in one line."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tunelab.commands import console as make_console
from tunelab.errors import TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adapt causal language models with many methods and measure what each buys.")
console = make_console()

Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. train.lr=1e-3 method.k=2")]


RUN_FLAGS = {"method": "method.name", "task": "data.task", "model": "model.name", "steps": "train.steps",
             "seed": "train.seed", "out": "out", "lr": "train.lr", "batch_size": "train.batch_size",
             "max_train": "data.max_train", "max_eval": "data.max_eval", "resume": "train.resume",
             "restart": "train.restart",
             "trust_remote_code": "model.trust_remote_code", "allow_pickle": "model.allow_pickle",
             "init_from": "method.init_from"}  # flag -> the config key it sets


@app.command()
def run(
    method: Annotated[str | None, typer.Option(help="method name (tunelab ls methods)")] = None,
    task: Annotated[str | None, typer.Option("--task", "--data", help="built-in task, data file (any format) or directory")] = None,
    model: Annotated[str | None, typer.Option(help="registry name, hub id or local path")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: the method's)")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    max_train: Annotated[int | None, typer.Option(help="cap on training examples")] = None,
    max_eval: Annotated[int | None, typer.Option(help="cap on evaluation examples")] = None,
    out: Annotated[str | None, typer.Option(help="output directory (result.json, adapter/, predictions)")] = None,
    resume: Annotated[bool | None, typer.Option("--resume", help="continue from OUT/checkpoint (the default when "
                                                "it matches this run's settings)")] = None,
    restart: Annotated[bool | None, typer.Option("--restart", help="throw OUT/checkpoint away and start from "
                                                 "step 1")] = None,
    trust_remote_code: Annotated[bool | None, typer.Option("--trust-remote-code", help="run the model repo's own code")] = None,
    allow_pickle: Annotated[bool | None, typer.Option("--allow-pickle", help="load pickle-only model weights (can run code)")] = None,
    init_from: Annotated[str | None, typer.Option(help="start from another run's adapter (its --out DIR)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    overrides: Overrides = None,
) -> None:
    """Train and evaluate one method on one task; writes OUT/result.json."""
    from tunelab.config import RunConfig, build
    from tunelab.prepare import prepare

    flags = dict(method=method, task=task, model=model, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                 max_train=max_train, max_eval=max_eval, out=out, resume=resume, restart=restart,
                 trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, init_from=init_from)
    # defaults < --config < overrides < flags; flag values are set as typed, not re-read as YAML
    cfg = build(RunConfig, config, overrides, {RUN_FLAGS[k]: v for k, v in flags.items()})
    prepared = prepare(cfg)  # config, method options and data checked before torch loads
    from tunelab.run import run as run_one

    result = run_one(cfg, progress=not quiet, prepared=prepared)
    if result.get("rank"):  # a non-zero process under accelerate launch: process 0 reports
        return
    print_result(result)
    if cfg.out:
        console.print(f"wrote {Path(cfg.out) / 'result.json'}")


def print_result(result: dict) -> None:
    from tunelab.envinfo import describe_machine

    table = Table(title=f"{result['method']} on {result['task']} ({result['model']})")
    for name in ("metric", "value"):
        table.add_column(name)
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.2f}")
    table.add_row("trainable params", f"{result['trainable_params']:,}")
    table.add_row("train seconds", f"{result['train']['seconds']:.1f}")
    table.add_row("eval seconds", f"{result['eval']['seconds']:.1f}")
    table.add_row("peak RSS (MB)", f"{result['peak_rss_mb']:.0f}")
    table.add_row("adapter bytes", f"{result['adapter_bytes']:,}")
    table.add_row("machine", describe_machine(result.get("machine")))  # what the seconds were measured on
    console.print(table)


@app.command("ls")
def ls(what: Annotated[str, typer.Argument(help="models | tasks | methods | all")] = "all",
       model: Annotated[str | None, typer.Option(help="with `ls methods`: count trainable params on this model")] = None) -> None:
    """List registered models, built-in tasks and methods."""
    from tunelab.listing import list_things

    list_things(console, what, model)


@app.command()
def demo(steps: Annotated[int, typer.Option(help="prompt-tuning steps")] = 60,
         task: Annotated[str, typer.Option()] = "date_format",
         model: Annotated[str, typer.Option()] = "smollm2-135m",
         out: Annotated[str, typer.Option(help="output folder (runs/demo is where `make demo` writes its grid)")] = "runs/demo-pt") -> None:
    """Zero-shot prompting vs prompt tuning on a built-in task, side by side."""
    from tunelab.demo import run_demo

    run_demo(console, task=task, model=model, steps=steps, out=out)


from tunelab.commands.board import board_command  # noqa: E402
from tunelab.commands.compare import compare_command, report_command, size_command  # noqa: E402
from tunelab.commands.data import app as data_app  # noqa: E402
from tunelab.commands.eval import eval_command  # noqa: E402  (one module per command group)
from tunelab.commands.export import export_command  # noqa: E402
from tunelab.commands.serve import serve_command  # noqa: E402

app.add_typer(data_app, name="data")

app.command("eval")(eval_command)
app.command("serve")(serve_command)
app.command("compare")(compare_command)
app.command("report")(report_command)
app.command("size")(size_command)
app.command("board")(board_command)
app.command("export")(export_command)


def _stop_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a board job's Stop, Docker, Slurm) stops a command as Ctrl-C does: a grid packs its
    store, training keeps its last checkpoint; without this the process would die before any of that."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    logging.basicConfig(level=os.environ.get("TUNELAB_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _stop_as_interrupt)  # `serve` replaces it with uvicorn's graceful drain
    try:
        app()
    except TunelabError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        console.print("interrupted; rerun the same command to continue from the last checkpoint")
        sys.exit(128 + signal.SIGTERM if str(exc) == "SIGTERM" else 130)


if __name__ == "__main__":
    main()
