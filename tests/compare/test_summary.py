"""The table `tunelab compare` (and `make demo`) ends with, on a small hand-made store."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rich.console import Console

from tunelab.compare.store import Store
from tunelab.compare.summary import claims_table, finished_rows, method_table, print_summary

# (label, registry name, options, per-seed accuracy, trainable params, train seconds, adapter bytes)
CELLS = [("zero_shot", "icl", {"k": 0}, [0.10], 0, 0.0, 310),
         ("prompt_tuning", "prompt_tuning", {}, [0.30, 0.40], 11_520, 40.0, 47_000),
         ("lora", "lora", {"r": 8}, [0.90, 0.85], 460_800, 60.0, 1_850_000)]


def _store(tmp: Path) -> Store:
    store = Store(tmp / "results.sqlite")
    for label, name, options, accuracies, params, seconds, size in CELLS:
        for seed, accuracy in enumerate(accuracies):
            rng = random.Random(f"{label}{seed}")
            scores = [100.0 * (rng.random() < accuracy) for _ in range(60)]
            predictions = tmp / f"{label}-{seed}.jsonl"
            predictions.write_text("".join(json.dumps({"id": f"e{i}", "prediction": "x", "references": ["y"],
                                                       "scores": {"exact_match": s}}) + "\n"
                                           for i, s in enumerate(scores)))
            store.record({"key": f"{label}-{seed}", "grid": "quick", "method": label, "method_name": name,
                          "task": "date_format", "seed": seed, "status": "done",
                          "config": {"method": {"name": name, **options}}, "primary_metric": "exact_match",
                          "quality": sum(scores) / len(scores), "predictions": str(predictions),
                          "trainable_params": params, "train_seconds": seconds, "adapter_bytes": size})
    store.record({"key": "broken", "grid": "quick", "method": "ipt", "method_name": "ipt", "task": "date_format",
                  "seed": 0, "status": "failed", "config": {"method": {"name": "ipt"}}, "error": "boom"})
    return store


def _cells(text: str) -> list[list[str]]:
    """The body rows of a rendered rich table, as lists of cell texts."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def _text(renderable) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_method_table_has_score_params_time_and_bytes_per_method(tmp_path):
    with _store(tmp_path) as store:
        text = _text(method_table(finished_rows(store)))
        rows = finished_rows(store)
    lines = {cells[1]: cells for cells in _cells(text)}
    assert list(lines) == ["zero_shot", "prompt_tuning", "lora"]  # grid order; the failed cell is left out
    lora = [r["quality"] for r in rows if r["method"] == "lora"]
    assert lines["lora"][2].startswith(f"{sum(lora) / 2:.1f} ±") and lines["lora"][2].endswith("exact_match")
    assert lines["lora"][3:] == ["460,800", "60.0", "1,850,000"]
    assert lines["prompt_tuning"][3:] == ["11,520", "40.0", "47,000"]


def test_claims_show_verdicts_that_follow_the_data(tmp_path):
    with _store(tmp_path) as store:
        table, skipped = claims_table(finished_rows(store), n_resamples=300)
    text = _text(table)
    verdicts = {claim: verdict for claim, verdict in _cells(text)}
    assert verdicts["LoRA > PT (same task and data)"] == "supported"
    assert verdicts["PT bytes per task < LoRA / full FT bytes"] == "supported"
    assert not any(k.startswith("IPT >") for k in verdicts)  # no successful IPT cell: not measured, not shown
    assert skipped > 0


def test_print_summary_puts_table_then_claims(tmp_path):
    console = Console(record=True, width=200)
    with _store(tmp_path) as store:
        print_summary(console, store)
    text = console.export_text()
    assert text.index("methods (mean over seeds)") < text.index("claims") < text.index("not measured by this grid")


def test_compare_command_ends_with_the_summary_then_the_report_path(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import tunelab.compare
    from tunelab.cli import app
    from tunelab.compare import Outcome
    from tunelab.compare.runner import GridSummary

    _store(tmp_path).close()

    def fake_compare(source, out, *args, **kwargs):
        cells = [type("C", (), {"key": k})() for k in ("zero_shot-0", "lora-0", "lora-1", "prompt_tuning-0")]
        return Outcome(None, cells, GridSummary(), tmp_path / "results.sqlite", tmp_path / "report.md",
                       tmp_path / "report.html")

    monkeypatch.setattr(tunelab.compare, "compare", fake_compare)
    result = CliRunner().invoke(app, ["compare", "--preset", "quick", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.index("methods (mean over seeds)") < out.index("LoRA > PT") < out.index("report: ")
    assert out.rstrip().endswith("report.html")
    assert "prompt_tuning" in out and "zero_shot" in out


def test_an_empty_store_says_so(tmp_path):
    console = Console(record=True)
    with Store(tmp_path / "s.sqlite") as store:
        print_summary(console, store)
    assert "no finished cells" in console.export_text()
