"""`make demo`: zero-shot prompting vs prompt tuning on one built-in task, printed side by side."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from tunelab.config import build_config
from tunelab.run import run


def run_demo(console: Console, task: str = "date_format", model: str = "smollm2-135m", steps: int = 60,
             out: str = "runs/demo-pt", max_eval: int = 60) -> dict[str, dict]:
    """Run both arms and print metrics plus a few predictions; returns {arm: result}."""
    arms = {
        "zero-shot": ["method.name=icl", "method.k=0"],
        "prompt tuning": ["method.name=prompt_tuning", f"train.steps={steps}"],
    }
    results = {}
    for arm, extra in arms.items():
        console.print(Rule(f"[bold]{arm}"), width=min(console.width, 100))
        slug = arm.replace(" ", "_").replace("-", "_")
        cfg = build_config(None, [f"data.task={task}", f"model.name={model}", f"data.max_eval={max_eval}",
                                  f"out={out}/{slug}", *extra])
        results[arm] = run(cfg)
    _print(console, results, out)
    return results


def _print(console: Console, results: dict[str, dict], out: str) -> None:
    first = next(iter(results.values()))
    table = Table(title=f"{first['task']} on {first['model']}: zero-shot vs prompt tuning")
    table.add_column("")
    for arm in results:
        table.add_column(arm, justify="right")
    for metric in first["metrics"]:
        table.add_row(metric, *(f"{r['metrics'][metric]:.1f}" for r in results.values()))
    table.add_row("trainable params", *(f"{r['trainable_params']:,}" for r in results.values()))
    table.add_row("train seconds", *(f"{r['train']['seconds']:.0f}" for r in results.values()))
    table.add_row("adapter bytes", *(f"{r['adapter_bytes']:,}" for r in results.values()))
    console.print(table)
    examples = Table(title="first predictions")
    examples.add_column("reference")
    for arm in results:
        examples.add_column(arm)
    rows = {arm: _predictions(Path(out) / arm.replace(" ", "_").replace("-", "_")) for arm in results}
    for i in range(min(4, *(len(r) for r in rows.values()))):
        examples.add_row(rows["zero-shot"][i]["references"][0], *(rows[arm][i]["prediction"][:60] for arm in rows))
    console.print(examples)
    console.print(f"results in {out}/*/result.json")


def _predictions(directory: Path) -> list[dict]:
    path = directory / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
