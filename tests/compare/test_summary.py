"""The table `tunelab compare` (and `make demo`) ends with, on a small hand-made store."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
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
        cells = [type("C", (), {"key": k, "coords": lambda self: {}})()  # the stored labels
                 for k in ("zero_shot-0", "lora-0", "lora-1", "prompt_tuning-0")]
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


def _tuned_store(tmp: Path) -> Store:
    """``_store`` plus each cell's CPU seconds, random ICL scoring as PT does, the grid's margins, and the
    ``tuned`` rows a tuned grid leaves (PT's trials cheap, LoRA's dear)."""
    store = _store(tmp)
    for row in store.rows(status="done"):
        store.record({**row.data, "cpu_seconds": {"prompt_tuning": 40.0, "lora": 60.0}.get(row.data["method"], 5.0),
                      "eval_seconds": 1.0, "config": {**row.data["config"], "model": {"name": "tiny"}}})
    for seed in (0, 1):  # the same answers as PT seed 0, whatever the seed: equivalent within a wide margin
        pt = next(r.data for r in store.rows(keys=["prompt_tuning-0"]))
        store.record({**pt, "key": f"icl-{seed}", "method": "icl_random", "method_name": "icl", "seed": seed,
                      "config": {"method": {"name": "icl", "k": 1, "selection": "random"}, "model": {"name": "tiny"}},
                      "cpu_seconds": 5.0})
    store.set_margins({"exact_match": 40.0})
    for method, cpu in (("prompt_tuning", 10.0), ("lora", 1000.0)):
        store.record_tuned({"study": f"{method}/date_format", "method": method, "task": "date_format",
                            "params": {"train.lr": 0.1}, "dev_score": 1.0, "trials": 3, "cpu_seconds": cpu})
    return store


def test_summary_and_report_give_every_claim_the_same_verdict(tmp_path):
    """The summary reads the store as the report does: tuning costs (``pt_cheaper_tuned`` was *not measured* in
    the summary while the report measured it) and the grid's equivalence margins (PT vs random ICL is
    *equivalent* within ±40, *underpowered* at exact match's own margin)."""
    from tunelab.compare.report import build_report

    with _tuned_store(tmp_path) as store:
        table, _ = claims_table(finished_rows(store), n_resamples=300, margins=store.margins())
        report = build_report(store, n_resamples=300, sizing=False)
        console = Console(record=True, width=250)
        print_summary(console, store)
    summary = dict(_cells(_text(table)))
    claims = next(items for name, items in report.sections if name == "Claims")
    in_report = {row[1]: row[2] for row in claims[1].rows if row[2] != "not measured"}
    assert summary == in_report
    assert summary["PT CPU seconds incl. its share of tuning < LoRA / full FT's"] == "supported"
    assert summary["PT > random ICL"] == "equivalent"
    procedures = {row[1]: row[3] for row in claims[1].rows}
    assert procedures["PT CPU seconds incl. its share of tuning < LoRA / full FT's"] == "measured"  # no test
    assert procedures["PT > random ICL"] == "fixed-sample"
    printed = dict(_cells(console.export_text())[-len(summary):])
    assert printed == summary  # what `tunelab compare` prints


def test_the_board_gives_every_claim_the_report_s_verdict(tmp_path):
    """The board's Results tab reads a store as the report does: with tuning costs and the grid's margins (it
    evaluated the claims on bare rows, so ``pt_cheaper_tuned`` was *not measured* there and PT vs random ICL
    *underpowered* at exact match's own margin)."""
    pytest.importorskip("pandas")
    from tunelab.board.results import claims_frames
    from tunelab.board.stores import claim_settings, store_rows
    from tunelab.compare.report import build_report

    with _tuned_store(tmp_path) as store:
        report = build_report(store, n_resamples=300, sizing=False)
        path = store.path
    claims = next(items for name, items in report.sections if name == "Claims")
    in_report = {row[1]: row[2] for row in claims[1].rows}
    frame, _ = claims_frames(store_rows(path), n_resamples=300, **claim_settings(path))
    on_board = dict(zip(frame["tested as"], frame["verdict"], strict=True))
    assert on_board == {claim: in_report[claim] for claim in on_board}
    assert on_board["PT CPU seconds incl. its share of tuning < LoRA / full FT's"] == "supported"
    assert on_board["PT > random ICL"] == "equivalent"
