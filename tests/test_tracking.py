"""report.to: each tracker's own API reads back what `tunelab run` logged (tiny model, a few steps)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tunelab.config import build_config
from tunelab.errors import ConfigError

STEPS = 4


def _run(tmp: Path, trackers: str, extra: list[str] | None = None) -> tuple[dict, Path]:
    from tunelab.run import run

    out = tmp / "run"
    cfg = build_config(None, ["model.name=tiny", "method.name=prompt_tuning", "method.num_virtual_tokens=4",
                              f"train.steps={STEPS}", "train.batch_size=2", "train.warmup_steps=2",
                              "data.max_train=8", "data.max_eval=3", "eval.max_new_tokens=4", f"out={out}",
                              f"report.to=[{trackers}]", f"report.mlflow_uri=sqlite:///{tmp}/mlflow.db",
                              f"report.dir={tmp}/tracking", *(extra or [])])
    return run(cfg, progress=False), tmp


@pytest.fixture(scope="module")
def mlflow_tb_run(tmp_path_factory):
    pytest.importorskip("mlflow", reason="report.to=mlflow needs the mlflow extra (in dev)")
    pytest.importorskip("tensorboard", reason="report.to=tensorboard needs the tensorboard extra (in dev)")
    return _run(tmp_path_factory.mktemp("track"), "mlflow,tensorboard")


def test_mlflow_client_returns_loss_history_params_and_metrics(mlflow_tb_run):
    from mlflow.tracking import MlflowClient

    result, tmp = mlflow_tb_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("tunelab")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.info.run_name == "prompt_tuning-date_format-seed0-n8"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(result["train"]["losses"])
    lrs = [m.value for m in client.get_metric_history(found.info.run_id, "train/learning_rate")]
    assert lrs[0] == pytest.approx(3e-2 / 2) and lrs[1] == pytest.approx(3e-2)  # warmup over 2 steps
    metrics = found.data.metrics
    for name, value in result["metrics"].items():
        assert metrics[f"eval/{name}"] == pytest.approx(value)
    assert metrics["train/trainable_params"] == result["trainable_params"]
    assert metrics["eval/loss"] == pytest.approx(result["generalization"]["eval_loss"])
    assert found.data.params["method.num_virtual_tokens"] == "4"
    assert found.data.params["train.steps"] == str(STEPS)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts


def test_tensorboard_events_hold_the_same_loss_curve(mlflow_tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, tmp = mlflow_tb_run
    (log_dir,) = (tmp / "tracking" / "tensorboard").iterdir()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert [e.value for e in loss] == pytest.approx(result["train"]["losses"], rel=1e-6)  # stored as float32
    assert events.Scalars("eval/exact_match")[0].value == pytest.approx(result["metrics"]["exact_match"])


def _wandb_records(path: Path) -> list[bytes]:
    """Records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records
    carry a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data, pos, records, pending = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4: pos + 7])
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def test_wandb_offline_run_holds_the_history(tmp_path):
    pytest.importorskip("wandb", reason="report.to=wandb needs the wandb extra")
    from wandb.proto import wandb_internal_pb2 as pb

    result, tmp = _run(tmp_path, "wandb", ["report.run_name=wb"])
    (run_file,) = (tmp / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    losses = []
    for raw in _wandb_records(run_file):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train/loss" in row:
                losses.append((record.history.step.num, row["train/loss"]))
    assert losses == [(i + 1, pytest.approx(v)) for i, v in enumerate(result["train"]["losses"])]


def test_trackio_store_holds_the_history(tmp_path, monkeypatch):
    import importlib.util
    import sys

    if importlib.util.find_spec("trackio") is None:  # importorskip would import it before TRACKIO_DIR is set
        pytest.skip("report.to=trackio needs the trackio extra")
    if "trackio" in sys.modules:
        pytest.skip("trackio was imported earlier in this process with another TRACKIO_DIR")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    result, _ = _run(tmp_path, "trackio", ["report.run_name=tk"])
    from trackio.sqlite_storage import SQLiteStorage

    logs = [row for row in SQLiteStorage.get_logs("tunelab", "tk") if "train/loss" in row]
    assert [row["train/loss"] for row in logs] == pytest.approx(result["train"]["losses"])


def test_unknown_tracker_is_a_config_error_listing_the_names():
    with pytest.raises(ConfigError, match="report.to: unknown tracker 'comet'.*mlflow, tensorboard, wandb, trackio"):
        build_config(None, ["report.to=[mlflow,comet]"])


def test_no_trackers_imports_nothing(monkeypatch):
    import sys

    from tunelab.config import ReportConfig
    from tunelab.tracking import open_trackers

    monkeypatch.setitem(sys.modules, "mlflow", None)  # an import would now fail
    with open_trackers(ReportConfig(), "x", None, {"a": 1}) as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=1)
    assert tracker.trackers == {}


def test_missing_backend_names_the_extra(monkeypatch, tmp_path):
    import sys

    from tunelab.config import ReportConfig
    from tunelab.tracking import open_trackers

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'tunelab\[wandb\]'"), \
            open_trackers(ReportConfig(to=["wandb"], dir=str(tmp_path)), "x", None, {}):
        pass


def test_compare_cells_pass_report_through_without_changing_their_key():
    from tunelab.compare.grid import expand, parse_grid

    raw = {"methods": [{"name": "icl", "k": 0}], "tasks": ["date_format"], "seeds": [0]}
    (plain,) = expand(parse_grid(raw))
    (tracked,) = expand(parse_grid({**raw, "report": {"to": ["mlflow"]}}))
    assert tracked.config.report.to == ["mlflow"]
    assert tracked.config.report.run_name == "grid/icl(k=0)-date_format-seed0"  # the label the report uses
    assert tracked.key == plain.key  # tracking is not part of a cell's identity
    with pytest.raises(ConfigError, match="report.to"):
        parse_grid({**raw, "report": {"to": ["nope"]}})
