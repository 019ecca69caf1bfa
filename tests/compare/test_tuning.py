"""Equal-budget tuning: `tune:` blocks pick the best dev score, never read the test split, survive SIGKILL.

The tuned grid prunes (median of 2 finished trials, dev loss measured every step): its third trial,
the diverging learning rate, stops at step 1, so every test here also covers pruning.
"""

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
            "tune": {"trials": 3, "dev_rows": 6, "seed": 0, "pruner": "median", "prune_every": 1,
                     "prune_startup_trials": 2},
            "methods": [{"name": "lora", "label": "lora", "tune": {"space": SPACE}}],
            "tasks": [{"task": str(task), "name": "dates", "metrics": ["chrf"]}], "seeds": [0]}
    path = root / f"grid-{task.name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def _trials(store: Path) -> list[tuple]:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT number, params, dev_score, status, dev_loss, pruned_step, cpu_seconds, dev_losses "
                            "FROM trials ORDER BY number").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _tuned(store: Path) -> list[tuple]:
    conn = sqlite3.connect(store)
    try:
        return conn.execute("SELECT study, params, dev_score, trials, cpu_seconds FROM tuned").fetchall()
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
    assert grid.tune.pruner == "none" and grid.tune.prune_startup_trials == 3  # pruning is opt-in
    for bad, message in (({"pruner": "hyperband"}, "tune.pruner: got 'hyperband', expected one of none, median"),
                         ({"prune_every": 0}, "tune.prune_every: got 0, expected an integer >= 1"),
                         ({"prune_warmup_steps": -1}, "tune.prune_warmup_steps"), ({"prune_evry": 5}, "prune_evry")):
        with pytest.raises(ConfigError, match=message):
            parse_grid({**base, "tune": bad})


def test_pruning_that_could_never_measure_is_refused(tmp_path):
    from tunelab.compare.grid import expand
    from tunelab.compare.store import Store
    from tunelab.compare.tuning import run_study
    from tunelab.errors import TunelabError

    grid = parse_grid({"model": {"name": "tiny"}, "train": {"steps": 4},
                       "tune": {"pruner": "median", "prune_every": 4, "dev_rows": 5},
                       "methods": [{"name": "lora", "tune": {"space": {"train.lr": [0.1, 1.0]}}}],
                       "tasks": ["date_format"]})
    (cell,) = expand(grid)
    with pytest.raises(TunelabError, match="tune.prune_every=4 is not below train.steps=4"):
        run_study(grid, grid.methods[0], cell, "s", Store(tmp_path / "r.sqlite"), None, tmp_path)


def test_grid_sampler_walks_every_choice_once_in_a_seeded_order():
    from tunelab.compare.tuning import grid_order

    space = {"train.lr": [0.1, 0.3], "init": ["random", "vocab"]}
    order = grid_order(space, 0, "s")
    assert len(order) == 4 and len({json.dumps(o, sort_keys=True) for o in order}) == 4
    assert order == grid_order(space, 0, "s") and grid_order({"train.lr": {"low": 0.1, "high": 1}}, 0, "s") is None


def _outcome(trials: list[tuple]) -> list[tuple]:
    """What must not change between two runs of a study: each trial's configuration, status and dev values."""
    return [(json.loads(p), status, score, loss, step) for _, p, score, status, loss, step, _, _ in trials]


def test_tuned_cells_use_the_best_dev_configuration(tuned_run):
    root, out, outcome = tuned_run
    store = out / "results.sqlite"
    trials = _trials(store)
    assert [t[0] for t in trials] == [0, 1, 2]
    done = [t for t in trials if t[3] == "done"]
    assert len(done) == 2 and len({t[2] for t in done}) == 2, "two finished trials with distinct scores: a choice"
    best = max(done, key=lambda t: (t[2], -t[0]))
    ((study, params, dev_score, count, cost),) = _tuned(store)
    assert json.loads(params) == json.loads(best[1]) and dev_score == best[2] and count == 3
    (cell,) = outcome.cells
    assert cell.config.train.lr == pytest.approx(json.loads(params)["train.lr"])
    conn = sqlite3.connect(store)
    (config,) = conn.execute("SELECT config FROM cells").fetchone()
    assert json.loads(config)["train"]["lr"] == pytest.approx(json.loads(params)["train.lr"])
    assert (out / "results.optuna.sqlite").is_file()  # the study, beside the store
    report = outcome.report_md.read_text()
    assert "## Tuning" in report and study in report
    assert cost == pytest.approx(sum(t[6] for t in trials), abs=0.01)  # pruned trials cost too


def test_a_clone_with_the_store_and_the_study_file_runs_no_trial_again(tuned_run, tmp_path):
    """A committed store: results.sqlite and results.optuna.sqlite, without tuning/ and cells/ (not committed)."""
    import shutil

    from rich.console import Console

    from tunelab.compare import compare

    root, out, _ = tuned_run
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("results.sqlite", "results.optuna.sqlite"):
        shutil.copy(out / name, clone / name)
    before = {name: (clone / name).read_bytes() for name in ("results.sqlite", "results.optuna.sqlite")}
    console = Console(record=True, width=200)
    rerun = compare(root / "grid-task.yaml", clone, progress=False, console=console)
    assert (rerun.summary.done, rerun.summary.failed, rerun.summary.skipped) == (0, 0, 1)
    text = console.export_text()
    assert "all 1 cells done" in text and "tune tuned/" not in text  # no trial ran
    # a no-op rerun writes nothing: checking a committed store leaves `git status` clean
    assert (clone / "results.sqlite").read_bytes() == before["results.sqlite"]
    assert (clone / "results.optuna.sqlite").read_bytes() == before["results.optuna.sqlite"]
    assert _trials(clone / "results.sqlite") == _trials(out / "results.sqlite")
    assert _tuned(clone / "results.sqlite") == _tuned(out / "results.sqlite")
    assert not (clone / "tuning" / "cells").exists()


def test_a_pruned_trial_is_stored_once_never_chosen_and_shown(tuned_run):
    import optuna

    root, out, outcome = tuned_run
    trials = _trials(out / "results.sqlite")
    (pruned,) = [t for t in trials if t[3] == "pruned"]
    number, params, score, _, loss, step, cpu, losses = pruned
    assert score is None and step == 1 and cpu > 0  # stopped at the first measurement, before train.steps=2
    assert json.loads(losses) == [[1, loss]]  # its last (only) dev loss
    finished = [t for t in trials if t[3] == "done"]
    # the median of the two finished trials' dev losses at step 1 is lower (better) than the pruned one's
    assert loss > sum(json.loads(t[7])[0][1] for t in finished) / 2
    assert all([s for s, _ in json.loads(t[7])] == [1] for t in finished)  # every step but the last (scored)
    (study,) = optuna.get_all_study_summaries(f"sqlite:///{out / 'results.optuna.sqlite'}")
    states = {t.number: t.state.name for t in optuna.load_study(study_name=study.study_name,
                                                                storage=f"sqlite:///{out / 'results.optuna.sqlite'}").trials}
    assert states == {t[0]: {"done": "COMPLETE", "pruned": "PRUNED"}[t[3]] for t in trials}
    (pruned_dir,) = sqlite3.connect(out / "results.sqlite").execute(
        "SELECT out_dir FROM trials WHERE number = ?", (number,)).fetchone()
    assert json.loads((Path(pruned_dir) / "stopped.json").read_text()) == {"step": 1, "dev_loss": loss}
    assert not (Path(pruned_dir) / "result.json").exists()  # never evaluated: pruning saves the generation too
    report = outcome.report_md.read_text()
    assert "pruned at step 1" in report and "3 (1 pruned)" in report


def test_trials_skip_the_passes_only_test_cells_report(tuned_run):
    """A finished trial is read for its dev score alone: no held-out loss pass, no forgetting probe; the test
    cell that uses the winner still has both."""
    root, out, _ = tuned_run
    conn = sqlite3.connect(out / "results.sqlite")
    trial_dirs = [Path(d) for (d,) in conn.execute("SELECT out_dir FROM trials WHERE status = 'done'")]
    assert len(trial_dirs) == 2
    for directory in trial_dirs:
        result = json.loads((directory / "result.json").read_text())
        assert "generalization" not in result and "forgetting" not in result
        assert not {"generalization", "forgetting"} & set(result["phases"]["wall"])
    (cell,) = [json.loads(r) for (r,) in conn.execute("SELECT result FROM cells")]
    assert "generalization" in cell and "forgetting" in cell


def test_the_test_split_is_never_read_while_tuning(tuned_run, tmp_path):
    """Corrupted test outputs: the trials score and prune exactly the same and choose the same configuration."""
    from rich.console import Console

    from tunelab.compare import compare

    root, out, _ = tuned_run
    corrupted = _task_dir(tmp_path, corrupt=True)
    outcome = compare(_grid(tmp_path, corrupted), tmp_path / "out", progress=False, console=Console(quiet=True))
    clean, dirty = _trials(out / "results.sqlite"), _trials(tmp_path / "out" / "results.sqlite")
    assert _outcome(clean) == _outcome(dirty)  # dev scores and dev losses alike
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
    assert _outcome(trials) == _outcome(_trials(out / "results.sqlite"))  # the same trials pruned at the same step
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

    def fake(grid, cell, out_dir, progress=False, monitor=None):
        lr = cell.config.train.lr
        calls.append(lr)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # as if the grid were killed inside this trial
        if monitor is None:
            return {"status": "done", "primary_metric": "chrf", "quality": -abs(lr - 0.3), "cpu_seconds": 1.0,
                    "out_dir": str(out_dir)}
        # a measured trial: the real trial-side pruner sees dev losses 1 + |lr - 0.3| / step at steps 1..3
        trial_dir = Path(out_dir) / f"lr{lr:.6f}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        watch, rows = monitor(trial_dir), []
        for step in range(1, 4):
            rows.append({"step": step, "loss": 0.0, "dev_loss": 1.0 + abs(lr - 0.3) / step})
            (trial_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            if watch(step, rows[-1]["dev_loss"]):
                return {"status": "stopped", "stopped": {"step": step, "dev_loss": rows[-1]["dev_loss"]},
                        "cpu_seconds": 0.5, "out_dir": str(trial_dir)}
        return {"status": "done", "primary_metric": "chrf", "quality": -abs(lr - 0.3), "cpu_seconds": 1.0,
                "out_dir": str(trial_dir)}

    monkeypatch.setattr(runner, "run_cell", fake)


def _study(tmp: Path, name: str, prune: bool = False, space: dict | None = None, trials: int = 6,
           startup: int | None = None):
    import optuna

    from tunelab.compare.grid import expand
    from tunelab.compare.store import Store
    from tunelab.compare.tuning import optuna_path, run_study

    pruning = {"pruner": "median", "prune_every": 1, "prune_startup_trials": 2} if prune else {}
    tune = {"trials": trials, "dev_rows": 5, **pruning, **({"startup_trials": startup} if startup else {})}
    space = space or {"train.lr": {"low": 0.01, "high": 1.0}}
    grid = parse_grid({"name": name, "model": {"name": "tiny"}, "tune": tune,
                       "methods": [{"name": "lora", "tune": {"space": space}}],
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


def test_a_trial_stored_before_the_study_was_told_gets_its_dev_losses_again(tmp_path, monkeypatch):
    """Killed between the store row and `study.tell`: the rerun tells the study the same values and history."""
    import optuna

    from tunelab.compare.store import Store

    _fake_runs(monkeypatch, [])
    run, _ = _study(tmp_path / "a", "a", prune=True)
    best = run()
    clean = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'a' / 'results.optuna.sqlite'}")
    assert {t.state.name for t in clean.trials} == {"COMPLETE", "PRUNED"}, "the fake study should prune some"

    record = Store.record_trial
    written: list = []

    def record_then_die(self, values):
        record(self, values)
        written.append(values["number"])
        if len(written) == 4:
            raise KeyboardInterrupt  # the row is in the store; the study never heard of the trial

    monkeypatch.setattr(Store, "record_trial", record_then_die)
    run, store = _study(tmp_path / "b", "b", prune=True)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(Store, "record_trial", record)
    assert run() == best
    resumed = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'b' / 'results.optuna.sqlite'}")
    told = [(t.params, t.state.name, t.value, t.intermediate_values) for t in resumed.trials if t.state.name != "FAIL"]
    assert told == [(t.params, t.state.name, t.value, t.intermediate_values) for t in clean.trials]
    assert [t["status"] for t in store.trials("s")] == [t.state.name.lower().replace("complete", "done")
                                                        for t in clean.trials]


def test_tpe_in_a_small_choice_space_never_spends_a_trial_on_a_scored_configuration(tmp_path, monkeypatch):
    """TPE's random startup draws with replacement: in the paper preset's 4 x 2 space 3 trials once scored only
    2 distinct configurations. Startup trials walk the seeded grid; a repeated TPE proposal is replaced."""
    space = {"train.lr": [0.01, 0.03, 0.1, 0.3], "r": [4, 8]}
    calls: list = []
    _fake_runs(monkeypatch, calls)
    run, store = _study(tmp_path / "a", "a", space=space, trials=7, startup=3)
    run()
    configs = [tuple(sorted(t["params"].items())) for t in store.trials("s")]
    assert len(configs) == 7 and len(set(configs)) == 7  # 7 of the 8 configurations, none twice
    again: list = []
    _fake_runs(monkeypatch, again, fail_at=5)
    rerun, store_b = _study(tmp_path / "b", "b", space=space, trials=7, startup=3)
    with pytest.raises(KeyboardInterrupt):
        rerun()
    _fake_runs(monkeypatch, again)
    rerun()
    assert [tuple(sorted(t["params"].items())) for t in store_b.trials("s")] == configs  # resumable as before


def test_a_tie_on_the_dev_score_goes_to_the_lower_dev_loss(tmp_path):
    from tunelab.compare.grid import expand
    from tunelab.compare.store import Store
    from tunelab.compare.tuning import _record_winner

    store = Store(tmp_path / "results.sqlite")
    for number, (loss, score) in enumerate([(1.9, 0.0), (1.4, 0.0), (1.2, None)]):  # the last one was pruned
        store.record_trial({"study": "s", "key": f"k{number}", "number": number, "params": {"train.lr": number},
                            "status": "done" if score is not None else "pruned", "metric": "sql_exact_match",
                            "dev_score": score, "dev_loss": loss, "dev_losses": [[20, loss]], "pruned_step": None,
                            "cpu_seconds": 1.0, "out_dir": None})
    grid = parse_grid({"name": "t", "model": {"name": "tiny"}, "methods": ["lora"], "tasks": ["date_format"]})
    assert _record_winner(store, "s", expand(grid)[0], 3) == {"train.lr": 1}


@pytest.mark.parametrize("name", ["paper_v3", "instruction"])  # paper (v4) reuses v3's tuned choices: no trials
def test_the_presets_prune_every_tuned_method_before_its_last_step(name):
    from tunelab.compare.grid import load_grid, preset_path

    grid = load_grid(preset_path(name))
    assert grid.tune.pruner == "median" and grid.eval["precision"] == "auto"
    tuned = [m for m in grid.methods if m.tune is not None]
    assert tuned and all(grid.tune.prune_every < {**grid.train, **m.overrides.get("train", {})}["steps"] for m in tuned)
    assert grid.tune.prune_startup_trials < grid.tune.trials  # some trial can be pruned at all
