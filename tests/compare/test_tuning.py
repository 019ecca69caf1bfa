"""Equal-budget tuning: `tune:` blocks pick the best dev score, never read the test split, survive SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunelab.compare.grid import parse_grid
from tunelab.errors import ConfigError

pytest.importorskip("optuna", reason="tuning needs optuna (pip install 'tunelab[tune]')")

SPACE = {"train.lr": [0.0001, 1.0, 10.0]}  # far apart: the tiny model's dev chrF differs between them


def _task_dir(root: Path, corrupt: bool = False) -> Path:
    """A file task from the built-in date_format rows: 40 train, 6 test (outputs replaced when ``corrupt``)."""
    from tunelab.data.tasks import TASKS

    spec = TASKS["date_format"]
    target = root / ("task_corrupt" if corrupt else "task")
    target.mkdir(parents=True, exist_ok=True)
    test = [e.to_dict() for e in spec.examples("eval", 6)]
    if corrupt:
        test = [{**row, "output": "CORRUPTED", "references": ["CORRUPTED"]} for row in test]
    for name, rows in (("train", [e.to_dict() for e in spec.examples("train", 40)]), ("test", test)):
        (target / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


def _grid(root: Path, task: Path) -> Path:
    grid = {"name": "tuned", "model": {"name": "tiny"}, "data": {"max_eval": 6, "max_train": 16},
            "train": {"steps": 2, "batch_size": 4}, "eval": {"batch_size": 8, "max_new_tokens": 4},
            "tune": {"trials": 3, "dev_rows": 6, "seed": 0},
            "methods": [{"name": "lora", "label": "lora", "tune": {"space": SPACE}}],
            "tasks": [{"task": str(task), "name": "dates", "metrics": ["chrf"]}], "seeds": [0]}
    path = root / f"grid-{task.name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _trials(store: Path) -> list[tuple]:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT number, params, dev_score, status FROM trials ORDER BY number").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _tuned(store: Path) -> list[tuple]:
    conn = sqlite3.connect(store)
    try:
        return conn.execute("SELECT study, params, dev_score, trials FROM tuned").fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """One uninterrupted tuned grid: (root, out dir, Outcome)."""
    from rich.console import Console

    from tunelab.compare import compare

    root = tmp_path_factory.mktemp("tuning")
    outcome = compare(_grid(root, _task_dir(root)), root / "out", progress=False, console=Console(quiet=True))
    return root, root / "out", outcome


def test_tune_block_is_validated():
    base = {"methods": [{"name": "prompt_tuning", "tune": {"space": {"train.lr": [0.1, 0.3]}}}], "tasks": ["date_format"]}
    grid = parse_grid(base)
    assert grid.methods[0].tune.space == {"train.lr": [0.1, 0.3]} and grid.tune.trials == 8
    for bad, message in (({"train.lrr": [0.1]}, "train.lrr"), ({"rank": [4]}, "no option 'rank'"),
                         ({"train.lr": {"low": 1, "high": 0.1}}, "low: A, high: B"), ({"train.lr": 0.1}, "choices")):
        with pytest.raises(ConfigError, match=message):
            parse_grid({**base, "methods": [{"name": "prompt_tuning", "tune": {"space": bad}}]})
    with pytest.raises(ConfigError, match="tune.sampler"):
        parse_grid({**base, "tune": {"sampler": "bayes"}})


def test_grid_sampler_walks_every_choice_once_in_a_seeded_order():
    from tunelab.compare.tuning import grid_order

    space = {"train.lr": [0.1, 0.3], "init": ["random", "vocab"]}
    order = grid_order(space, 0, "s")
    assert len(order) == 4 and len({json.dumps(o, sort_keys=True) for o in order}) == 4
    assert order == grid_order(space, 0, "s") and grid_order({"train.lr": {"low": 0.1, "high": 1}}, 0, "s") is None


def test_tuned_cells_use_the_best_dev_configuration(tuned_run):
    root, out, outcome = tuned_run
    store = out / "results.sqlite"
    trials = _trials(store)
    assert [t[0] for t in trials] == [0, 1, 2] and all(t[3] == "done" for t in trials)
    scores = [t[2] for t in trials]
    assert len(set(scores)) > 1, "the trials tie: the test would not show a choice"
    best = max(range(3), key=lambda i: (scores[i], -i))
    ((study, params, dev_score, count),) = _tuned(store)
    assert json.loads(params) == json.loads(trials[best][1]) and dev_score == scores[best] and count == 3
    (cell,) = outcome.cells
    assert cell.config.train.lr == pytest.approx(json.loads(params)["train.lr"])
    conn = sqlite3.connect(store)
    (config,) = conn.execute("SELECT config FROM cells").fetchone()
    assert json.loads(config)["train"]["lr"] == pytest.approx(json.loads(params)["train.lr"])
    assert (out / "results.optuna.sqlite").is_file()  # the study, beside the store
    report = outcome.report_md.read_text()
    assert "## Tuning" in report and study in report


def test_the_test_split_is_never_read_while_tuning(tuned_run, tmp_path):
    """Corrupted test outputs: the trials score exactly the same and choose the same configuration."""
    from rich.console import Console

    from tunelab.compare import compare

    root, out, _ = tuned_run
    corrupted = _task_dir(tmp_path, corrupt=True)
    outcome = compare(_grid(tmp_path, corrupted), tmp_path / "out", progress=False, console=Console(quiet=True))
    clean, dirty = _trials(out / "results.sqlite"), _trials(tmp_path / "out" / "results.sqlite")
    assert [(json.loads(p), s) for _, p, s, _ in clean] == [(json.loads(p), s) for _, p, s, _ in dirty]
    assert json.loads(_tuned(out / "results.sqlite")[0][1]) == json.loads(_tuned(tmp_path / "out" / "results.sqlite")[0][1])
    conn = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    assert conn.execute("SELECT quality FROM cells").fetchone()[0] < 5  # the test cells do read the corrupted split
    assert outcome.cells[0].config.train.lr == pytest.approx(json.loads(_tuned(out / "results.sqlite")[0][1])["train.lr"])


def _launch(grid: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", "compare", "--config", str(grid), "--out", str(out),
                             "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_sigkill_during_tuning_three_times_then_rerun(tuned_run, tmp_path):
    root, out, _ = tuned_run
    grid = _grid(tmp_path, _task_dir(tmp_path))
    rerun_out = tmp_path / "out"
    study_file = rerun_out / "results.optuna.sqlite"
    rng = random.Random(17)
    kills = 0
    while kills < 3:
        process = _launch(grid, rerun_out)
        deadline = time.monotonic() + 300
        while not study_file.is_file() or not _trial_started(study_file):  # tuning has begun
            if process.poll() is not None:
                break
            assert time.monotonic() < deadline, "tuning never started"
            time.sleep(0.05)
        if process.poll() is not None:  # it finished before this kill: the test kills earlier next time
            break
        time.sleep(rng.uniform(0.0, 4.0))  # a random point inside a trial (or between two)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        time.sleep(1)  # the orphaned trial process notices and exits
    assert kills == 3, "the grid finished before it was killed three times"
    final = _launch(grid, rerun_out)
    output, _ = final.communicate(timeout=600)
    assert final.returncode == 0, output
    store = rerun_out / "results.sqlite"
    trials = _trials(store)
    assert [t[0] for t in trials] == [0, 1, 2]  # every trial stored once
    clean = _trials(out / "results.sqlite")
    assert [(json.loads(p), s) for _, p, s, _ in trials] == [(json.loads(p), s) for _, p, s, _ in clean]
    assert json.loads(_tuned(store)[0][1]) == json.loads(_tuned(out / "results.sqlite")[0][1])
    conn = sqlite3.connect(store)
    assert conn.execute("SELECT COUNT(*), MAX(attempts) FROM cells WHERE status = 'done'").fetchone() == (1, 1)


def _trial_started(study_file: Path) -> bool:
    conn = sqlite3.connect(f"file:{study_file}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0] > 0
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def _fake_runs(monkeypatch, calls: list, fail_at: int | None = None):
    """run_cell replaced by a score of the configuration (fast); optionally dies inside one call."""
    import tunelab.compare.runner as runner

    def fake(grid, cell, out_dir, progress=False):
        lr = cell.config.train.lr
        calls.append(lr)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # as if the grid were killed inside this trial
        return {"status": "done", "primary_metric": "chrf", "quality": -abs(lr - 0.3), "cpu_seconds": 1.0,
                "out_dir": str(out_dir)}

    monkeypatch.setattr(runner, "run_cell", fake)


def _study(tmp: Path, name: str):
    import optuna

    from tunelab.compare.grid import expand
    from tunelab.compare.store import Store
    from tunelab.compare.tuning import optuna_path, run_study

    grid = parse_grid({"name": name, "model": {"name": "tiny"}, "tune": {"trials": 6, "dev_rows": 5},
                       "methods": [{"name": "lora", "tune": {"space": {"train.lr": {"low": 0.01, "high": 1.0}}}}],
                       "tasks": ["date_format"]})
    (cell,) = expand(grid)
    store = Store(tmp / "results.sqlite")
    storage = optuna.storages.RDBStorage(f"sqlite:///{optuna_path(store.path)}")
    return lambda: run_study(grid, grid.methods[0], cell, "s", store, storage, tmp), store


def test_tpe_study_resumed_after_an_interrupted_trial_asks_the_same_configurations(tmp_path, monkeypatch):
    from rich.console import Console  # noqa: F401  (run_study prints; quiet enough under pytest)

    clean_calls: list = []
    _fake_runs(monkeypatch, clean_calls)
    run, clean_store = _study(tmp_path / "a", "a")
    best = run()
    assert len(clean_calls) == 6 and best["train.lr"] == pytest.approx(min(clean_calls, key=lambda v: abs(v - 0.3)))

    calls: list = []
    _fake_runs(monkeypatch, calls, fail_at=4)
    run, store = _study(tmp_path / "b", "b")
    with pytest.raises(KeyboardInterrupt):
        run()
    _fake_runs(monkeypatch, calls)
    assert run() == best
    stored = [t["params"]["train.lr"] for t in store.trials("s")]
    assert stored == pytest.approx(clean_calls)  # the same six configurations, each stored once, in order
    assert calls[:3] == pytest.approx(clean_calls[:3]) and calls[3] == pytest.approx(calls[4])  # the killed one, asked again
