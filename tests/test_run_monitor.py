"""`run`'s dev-loss monitor: measuring leaves training untouched, and a monitor can stop a run early."""

from __future__ import annotations

import json

import pytest

from tunelab.config import build_config
from tunelab.run import STOPPED_FILE, run
from tunelab.steplog import read_step_log


class Recorder:
    """A DevMonitor that records what it is shown and stops at ``stop_at`` (never when None)."""

    def __init__(self, every: int, stop_at: int | None = None) -> None:
        self.every, self.stop_at, self.seen = every, stop_at, []

    def __call__(self, step: int, dev_loss: float) -> bool:
        self.seen.append((step, dev_loss))
        return step == self.stop_at


def _run(out, monitor=None, steps=4):
    # a flat learning rate: the first steps of a longer run are the steps of a shorter one
    cfg = build_config(None, ["model.name=tiny", "data.task=date_format", "data.max_train=8", "data.max_eval=4",
                              "eval.max_new_tokens=3", "method.name=lora", "method.dropout=0.1",
                              f"train.steps={steps}", "train.batch_size=4", "train.lr=0.05",
                              "train.schedule=constant", "train.warmup_steps=0", f"out={out}"])
    return run(cfg, progress=False, monitor=monitor)


def test_measuring_the_dev_loss_changes_nothing_and_is_the_eval_loss_at_that_step(tmp_path):
    plain = _run(tmp_path / "plain", steps=6)
    monitor = Recorder(every=2)
    watched = _run(tmp_path / "watched", monitor, steps=6)
    assert watched["train"]["losses"] == plain["train"]["losses"]  # dropout RNG and weights untouched
    assert watched["metrics"] == plain["metrics"]
    assert [s for s, _ in monitor.seen] == [2, 4]  # not at the last step: a finished run is evaluated instead
    # the loss at step 2 is what a 2-step run measures on the same eval rows after training (run's eval loss)
    short = _run(tmp_path / "short", steps=2)
    assert short["train"]["losses"] == watched["train"]["losses"][:2]
    assert monitor.seen[0][1] == pytest.approx(short["generalization"]["eval_loss"], abs=1e-4)
    assert monitor.seen[0][1] != monitor.seen[1][1]
    logged = {r["step"]: r.get("dev_loss") for r in read_step_log(tmp_path / "watched")}
    assert logged == {1: None, 2: monitor.seen[0][1], 3: None, 4: monitor.seen[1][1], 5: None, 6: None}


def test_a_monitor_that_says_stop_ends_the_run_without_evaluating(tmp_path):
    monitor = Recorder(every=1, stop_at=2)
    out = tmp_path / "stopped"
    summary = _run(out, monitor, steps=6)
    assert summary == {"stopped": {"step": 2, "dev_loss": monitor.seen[-1][1]}}
    assert json.loads((out / STOPPED_FILE).read_text()) == summary["stopped"]
    assert not (out / "result.json").exists() and not (out / "adapter").exists() and not (out / "checkpoint").exists()
    assert [r["step"] for r in read_step_log(out)] == [1, 2]
