"""Experiment tracking (``report.to``): MLflow, TensorBoard, W&B (offline) and Trackio, all local.

Each backend is optional and imported only when named, so tunelab runs without any of them. Key
names follow Hugging Face Trainer's: ``train/loss`` and ``train/learning_rate`` per optimizer step,
``eval/<metric>`` at the end, ``train/train_runtime``-style costs; parameters are the resolved config
flattened to dotted keys (``train.lr``). Nothing here talks to a network: MLflow writes a sqlite
store (``report.mlflow_uri``; its file store is deprecated), W&B runs in offline mode, TensorBoard
and Trackio write files under ``report.dir``.

>>> with open_trackers(ReportConfig(to=[]), "run", None, {}) as tracker:   # no trackers: a no-op
...     tracker.log_metrics({"train/loss": 1.0}, step=1)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from tunelab.errors import ConfigError
from tunelab.sections import TRACKERS, ReportConfig

log = logging.getLogger(__name__)

EXTRAS = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class Tracker(Protocol):
    """What a run reports; every backend implements these four."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, directory: Path, name: str) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (lists and None stay values)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def tracking_dir(cfg: ReportConfig, out: Path | None) -> Path:
    """Where file-based trackers write: ``report.dir``, else OUT/tracking, else runs/tracking."""
    if cfg.dir:
        return Path(cfg.dir)
    return (out / "tracking") if out is not None else Path("runs") / "tracking"


class MlflowTracker:
    """One MLflow run through ``MlflowClient`` (no global fluent state: several runs per process work)."""

    def __init__(self, cfg: ReportConfig, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_uri
        artifacts = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///"):])
            db.parent.mkdir(parents=True, exist_ok=True)
            # beside the store, not ./mlruns of whatever the working directory is
            artifacts = (db.resolve().parent / "mlartifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(cfg.experiment, artifact_location=artifacts))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start: start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_artifact(self, directory: Path, name: str) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path=name)

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TensorBoardTracker:
    """Scalars in TensorBoard event files under ``DIR/tensorboard/RUN``; the config as a text summary."""

    def __init__(self, cfg: ReportConfig, run_name: str, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.log_dir = directory / "tensorboard" / run_name
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step)

    def log_artifact(self, directory: Path, name: str) -> None:
        self.writer.add_text(name, str(directory))  # TensorBoard stores no files: record where it is

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in offline mode (``DIR/wandb/offline-run-*``; ``wandb sync`` uploads it later)."""

    def __init__(self, cfg: ReportConfig, run_name: str, directory: Path) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.experiment, name=run_name, dir=str(directory), mode="offline",
                              reinit="finish_previous", settings=wandb.Settings(silent=True, console="off"))
        self.directory = Path(self.run.dir).parent  # the offline-run-* folder

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, directory: Path, name: str) -> None:
        artifact = self.wandb.Artifact(name=f"{self.run.name or 'run'}-{name}".replace("/", "-"), type="model")
        artifact.add_dir(str(directory))
        self.run.log_artifact(artifact)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioTracker:
    """A Trackio run in its local sqlite store (``DIR/trackio`` unless TRACKIO_DIR is set)."""

    def __init__(self, cfg: ReportConfig, run_name: str, directory: Path) -> None:
        # Trackio reads TRACKIO_DIR once, when first imported
        os.environ.setdefault("TRACKIO_DIR", str((directory / "trackio").resolve()))
        import trackio

        self.trackio, self.project, self.name = trackio, cfg.experiment, run_name
        self.run: Any = None

    def log_params(self, params: dict[str, Any]) -> None:
        # Trackio takes the config only when the run starts, so the run starts here
        with contextlib.redirect_stdout(io.StringIO()):  # it prints dashboard hints on every init
            self.run = self.trackio.init(project=self.project, name=self.name, config=flatten(params),
                                         embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, directory: Path, name: str) -> None:
        self.trackio.log_artifact(directory, name=name, type="model")

    def finish(self, failed: bool = False) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()


class Trackers:
    """Fans every call out to the trackers of one run; a tracker that fails is reported, not fatal."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self.trackers = trackers

    def _each(self, what: str, *args: Any, **kwargs: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, what)(*args, **kwargs)
            except Exception as exc:  # a tracking hiccup must not lose hours of training
                log.warning("report.to %s: %s failed (%s); it logs nothing more for this run", name, what, exc)
                self.trackers.pop(name)

    def log_params(self, params: dict[str, Any]) -> None:
        self._each("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if metrics:
            self._each("log_metrics", metrics, step=step)

    def log_artifact(self, directory: Path, name: str = "adapter") -> None:
        self._each("log_artifact", directory, name)

    def finish(self, failed: bool = False) -> None:
        self._each("finish", failed=failed)


def _start(name: str, cfg: ReportConfig, run_name: str, directory: Path) -> Tracker:
    try:
        if name == "mlflow":
            return MlflowTracker(cfg, run_name)
        if name == "tensorboard":
            return TensorBoardTracker(cfg, run_name, directory)
        if name == "wandb":
            return WandbTracker(cfg, run_name, directory)
        return TrackioTracker(cfg, run_name, directory)
    except ImportError as exc:
        raise ConfigError(f"report.to={name} needs {EXTRAS[name]!r}: pip install 'tunelab[{name}]' "
                          f"(or drop {name} from report.to) [{exc}]") from None


@contextlib.contextmanager
def open_trackers(cfg: ReportConfig, run_name: str, out: Path | None,
                  params: dict[str, Any]) -> Iterator[Trackers]:
    """Start every tracker in ``cfg.to`` (logging ``params``), yield them, and finish them: as FAILED
    when the body raises. With ``cfg.to`` empty nothing is imported."""
    unknown = [t for t in cfg.to if t not in TRACKERS]
    if unknown:
        raise ConfigError(f"report.to: unknown tracker {unknown[0]!r}; choose any of {', '.join(TRACKERS)}")
    directory = tracking_dir(cfg, out)
    trackers = Trackers({})
    try:
        for name in dict.fromkeys(cfg.to):
            trackers.trackers[name] = _start(name, cfg, run_name, directory)
        trackers.log_params(params)
    except BaseException:
        trackers.finish(failed=True)
        raise
    try:
        yield trackers
    except BaseException:
        trackers.finish(failed=True)
        raise
    trackers.finish()
