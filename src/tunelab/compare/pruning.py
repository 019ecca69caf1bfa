"""Pruning of tuning trials on their dev loss (Optuna's ``MedianPruner``), decided inside each trial's process.

A trial is a cell run in its own process (``compare/runner.py``). With ``tune.pruner: median`` that
process measures the teacher-forced mean loss on the trial's dev rows every ``tune.prune_every``
optimizer steps before the last (``tunelab.run``'s ``DevMonitor`` hook: scoring only, no generation;
a trial that trains to the end is always scored on its dev metric), reports it to
its trial in the study file beside the store, and asks the pruner whether to stop. The study
maximises the dev score, so the loss is reported negated (higher is better for the pruner too). The
grid process then tells Optuna the trial was pruned and stores it once, with its last dev loss.

Resumable: every measurement is also a ``dev_loss`` in the trial's ``train_log.jsonl``. A trial
killed and asked again (a new Optuna trial) resumes from its checkpoint if it has one; it first
reports the losses measured up to that checkpoint, so the pruner sees the history an uninterrupted
trial would have and stops it (or not) at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.checkpoint import STEP_PREFIX, latest_checkpoint
from tunelab.choices import PRUNERS  # noqa: F401  (the pruners this module implements)
from tunelab.steplog import read_step_log


def make_pruner(kind: str, startup_trials: int, warmup_steps: int) -> Any:
    """The Optuna pruner ``tune.pruner`` names (``NopPruner`` for none)."""
    import optuna

    if kind == "median":  # every report is a decision point: reports come every tune.prune_every steps already
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps,
                                           interval_steps=1)
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class PruneProbe:
    """What a trial's process needs to report to its trial and ask the pruner (picklable: it crosses a fork)."""

    storage: str  # the study's RDB URL (sqlite:///...optuna.sqlite)
    study: str
    number: int  # the trial's number in the study
    every: int  # tune.prune_every
    startup_trials: int  # tune.prune_startup_trials
    warmup_steps: int  # tune.prune_warmup_steps

    def __call__(self, out: Path) -> TrialPruner:
        """The monitor of the trial whose run writes to ``out`` (``runner.MonitorFactory``)."""
        return TrialPruner(self, out)


class TrialPruner:
    """A ``tunelab.run.DevMonitor``: reports each dev loss to the trial, stops when the pruner says so."""

    def __init__(self, probe: PruneProbe, out: Path) -> None:
        import optuna

        self.every = probe.every
        self._storage = optuna.storages.RDBStorage(probe.storage, engine_kwargs={"connect_args": {"timeout": 60}})
        pruner = make_pruner("median", probe.startup_trials, probe.warmup_steps)
        self._study = optuna.load_study(study_name=probe.study, storage=self._storage, pruner=pruner)
        study_id = self._storage.get_study_id_from_name(probe.study)
        self._trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, probe.number)
        for step, loss in measured_before_resume(out):
            self._report(step, loss)

    def _report(self, step: int, dev_loss: float) -> None:
        self._storage.set_trial_intermediate_value(self._trial_id, step, -dev_loss)

    def __call__(self, step: int, dev_loss: float) -> bool:
        self._report(step, dev_loss)
        return bool(self._study.pruner.prune(self._study, self._storage.get_trial(self._trial_id)))


def measured_before_resume(out: Path) -> list[tuple[int, float]]:
    """(step, dev loss) logged up to the checkpoint the run in ``out`` will resume from; [] without one."""
    checkpoint = latest_checkpoint(Path(out) / "checkpoint")
    if checkpoint is None:
        return []
    resumed_at = int(checkpoint.name[len(STEP_PREFIX):])
    return [(r["step"], r["dev_loss"]) for r in read_step_log(out) if "dev_loss" in r and r["step"] <= resumed_at]


def dev_losses(out: Path) -> list[tuple[int, float]]:
    """Every (step, dev loss) a finished or stopped trial logged, in step order."""
    return [(r["step"], r["dev_loss"]) for r in read_step_log(out) if "dev_loss" in r]
