"""The trial-side pruner: median of the finished trials at the same step, and the history a resumed trial replays."""

from __future__ import annotations

import json

import pytest

from tunelab.compare.pruning import PruneProbe, measured_before_resume

optuna = pytest.importorskip("optuna", reason="tuning needs optuna (pip install 'tunelab[tune]')")


def _log(out, rows):
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _checkpoint(out, step):
    (out / "checkpoint" / f"step-{step:08d}").mkdir(parents=True)
    (out / "checkpoint" / f"step-{step:08d}" / "state.json").write_text(json.dumps({"step": step}))


def test_a_resumed_run_replays_only_the_losses_up_to_its_checkpoint(tmp_path):
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9, "dev_loss": 3.0}, {"step": 3, "loss": 1.8},
            {"step": 4, "loss": 1.7, "dev_loss": 2.5}]
    _log(tmp_path, rows)
    assert measured_before_resume(tmp_path) == []  # no checkpoint: the run starts again from step 0
    _checkpoint(tmp_path, 3)
    assert measured_before_resume(tmp_path) == [(2, 3.0)]  # step 4 is after the checkpoint: measured again


def _study(tmp_path, finished: list[dict[int, float]]):
    """A study with finished trials whose dev losses per step are ``finished``; then one running trial."""
    url = f"sqlite:///{tmp_path / 'study.sqlite'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for losses in finished:
        trial = study.ask()
        for step, loss in losses.items():
            trial.report(-loss, step)
        study.tell(trial, 1.0)
    return url, study, study.ask()


def test_the_trial_pruner_stops_a_trial_worse_than_the_median_at_that_step(tmp_path):
    url, study, running = _study(tmp_path, [{1: 2.0, 2: 1.0}, {1: 3.0, 2: 2.0}])
    probe = PruneProbe(url, "s", running.number, every=1, startup_trials=2, warmup_steps=0)
    pruner = probe(tmp_path / "trial")
    assert pruner.every == 1
    assert not pruner(1, 2.4)  # median at step 1 is 2.5: better, go on
    assert pruner(2, 1.6)  # median at step 2 is 1.5: worse than its best so far (1.6), stop
    frozen = study.get_trials()[running.number]
    assert frozen.intermediate_values == {1: -2.4, 2: -1.6}  # reported negated: the study maximises


def test_startup_and_warmup_hold_pruning_back(tmp_path):
    url, _, running = _study(tmp_path, [{1: 1.0, 2: 1.0}])
    assert not PruneProbe(url, "s", running.number, 1, startup_trials=2, warmup_steps=0)(tmp_path / "a")(1, 9.0)
    (tmp_path / "b").mkdir()
    url, _, running = _study(tmp_path / "b", [{1: 1.0, 2: 1.0}, {1: 1.0, 2: 1.0}])
    late = PruneProbe(url, "s", running.number, 1, startup_trials=2, warmup_steps=2)(tmp_path / "c")
    assert not late(1, 9.0) and late(2, 9.0)


@pytest.mark.parametrize("resumed", [True, False])
def test_a_resumed_trial_reports_its_history_before_it_goes_on(tmp_path, resumed):
    """Optuna prunes on a trial's best value so far: a replayed good step 1 keeps a worse step 2 alive."""
    url, study, running = _study(tmp_path, [{1: 2.0, 2: 1.0}, {1: 2.0, 2: 1.0}])
    out = tmp_path / "trial"
    _log(out, [{"step": 1, "loss": 0.0, "dev_loss": 0.5}, {"step": 2, "loss": 0.0, "dev_loss": 9.0}])
    if resumed:
        _checkpoint(out, 1)  # the run goes on from step 1: step 2 is measured again
    pruner = PruneProbe(url, "s", running.number, 1, startup_trials=2, warmup_steps=0)(out)
    assert study.get_trials()[running.number].intermediate_values == ({1: -0.5} if resumed else {})
    assert pruner(2, 1.5) is not resumed  # median 1.0 at step 2; its best so far is 0.5 only with the replay
