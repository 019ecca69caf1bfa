"""Running grids on the tiny model: resume skips finished cells, a failing cell is recorded, the rest go on."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from tunelab.compare import compare
from tunelab.compare.store import Store

QUIET = Console(quiet=True)


def test_grid_runs_then_resumes_without_redoing_cells(grid_file, tmp_path):
    grid = grid_file()
    first = compare(grid, tmp_path / "out", progress=False, console=QUIET)
    assert (first.summary.done, first.summary.failed, first.summary.skipped) == (4, 0, 0)
    with Store(first.store) as store:
        rows = store.rows()
    assert len(rows) == 4 and {r.status for r in rows} == {"done"}
    for row in rows:
        assert Path(row.predictions).is_file() and row.n_eval == 6
        assert row.peak_rss_mb > 0 and row.eval_seconds > 0 and row.cpu_seconds > 0 and row.versions["torch"]
        assert set(row.metrics) == {"exact_match", "rouge_l"} and row.quality == row.metrics["exact_match"]
        assert row.config["train"]["seed"] == row.seed
    pt = [r for r in rows if r.method == "pt"]
    assert all(r.trainable_params > 0 and r.adapter_bytes > 0 and r.train_seconds > 0 for r in pt)
    assert all(r.trainable_params == 0 for r in rows if r.method == "zero_shot")

    again = compare(grid, tmp_path / "out", progress=False, console=QUIET)
    assert (again.summary.done, again.summary.skipped) == (0, 4)
    with Store(first.store) as store:
        assert [r.attempts for r in store.rows()] == [1, 1, 1, 1]

    # killed after a cell's result.json was written but before its row: recovered from disk, not rerun
    first.store.unlink()
    recovered = compare(grid, tmp_path / "out", progress=False, console=QUIET)
    assert (recovered.summary.done, recovered.summary.reused) == (4, 4)
    assert first.report_html.is_file() and first.report_md.is_file()


def test_failed_cell_is_recorded_and_the_grid_goes_on(grid_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    grid = grid_file(seeds=[0], methods=[{"name": "icl", "k": 0, "label": "broken",
                                          "model": {"name": "nobody/no-such-model"}},
                                         {"name": "icl", "k": 0, "label": "zero_shot"}])
    outcome = compare(grid, tmp_path / "out", progress=False, console=QUIET)
    assert (outcome.summary.done, outcome.summary.failed) == (1, 1)
    with Store(outcome.store) as store:
        (failed,) = store.rows(status="failed")
        assert failed.method == "broken" and "nobody/no-such-model" in failed.error
        assert failed.metrics is None and failed.quality is None
    assert "Failed cells" in outcome.report_md.read_text()

    skipped = compare(grid, tmp_path / "out", progress=False, console=QUIET)
    assert (skipped.summary.skipped, skipped.summary.failed) == (2, 0)  # failures are not retried by default
    retried = compare(grid, tmp_path / "out", progress=False, retry_failed=True, console=QUIET)
    assert (retried.summary.failed, retried.summary.skipped) == (1, 1)
    with Store(outcome.store) as store:
        assert store.rows(status="failed")[0].attempts == 2


def test_cell_result_matches_a_plain_run(grid_file, tmp_path):
    """A grid cell is exactly `tunelab run` with that config: same predictions as an in-process run."""
    from tunelab.config import RunConfig, from_dict
    from tunelab.run import run

    outcome = compare(grid_file(seeds=[0], methods=[{"name": "prompt_tuning", "num_virtual_tokens": 4}]),
                      tmp_path / "out", progress=False, console=QUIET)
    with Store(outcome.store) as store:
        (row,) = store.rows()
    cfg = from_dict(RunConfig, {**row.config, "out": str(tmp_path / "direct")})
    cfg.train.resume = False
    direct = run(cfg, progress=False)
    stored = [json.loads(line) for line in Path(row.predictions).read_text().splitlines()]
    assert direct["metrics"] == row.metrics
    assert [p["prediction"] for p in stored] == [
        json.loads(line)["prediction"] for line in (tmp_path / "direct" / "predictions.jsonl").read_text().splitlines()]


def test_two_workers_give_the_same_results_as_one(grid_file, tmp_path):
    """``--workers 2`` runs cells concurrently (1 torch thread each) and stores the same results as one worker."""
    grid = grid_file(model={"name": "tiny", "threads": 1})  # same thread count both ways: same float rounding
    serial = compare(grid, tmp_path / "one", progress=False, console=QUIET, workers=1)
    parallel = compare(grid, tmp_path / "two", progress=False, console=QUIET, workers=2)
    assert serial.summary.done == parallel.summary.done == 4 and parallel.summary.failed == 0
    with Store(serial.store) as one, Store(parallel.store) as two:
        a = {r.key: r for r in one.rows()}
        b = {r.key: r for r in two.rows()}
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert a[key].metrics == b[key].metrics
        assert a[key].result["train"]["losses"] == b[key].result["train"]["losses"]
        assert [json.loads(x) for x in Path(a[key].predictions).read_text().splitlines()] == \
            [json.loads(x) for x in Path(b[key].predictions).read_text().splitlines()]
    # the cells overlapped in time: some cell started before another had finished
    spans = sorted((r.finished_at - r.cell_seconds, r.finished_at) for r in b.values())
    assert any(start < end for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
