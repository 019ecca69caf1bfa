"""What `tunelab run` leaves for live and per-example readers: the step log and the demonstrations shown."""

from __future__ import annotations

import json

from tunelab.config import build_config
from tunelab.run import run
from tunelab.steplog import read_step_log


def _run(out, *overrides):
    cfg = build_config(None, ["model.name=tiny", "data.task=date_format", "data.max_train=8", "data.max_eval=3",
                              "eval.max_new_tokens=3", "eval.loss=false", f"out={out}", *overrides])
    return run(cfg, progress=False)


def test_the_step_log_is_the_loss_curve_of_the_result(tmp_path):
    result = _run(tmp_path / "pt", "method.name=prompt_tuning", "method.num_virtual_tokens=2", "train.steps=3",
                  "train.batch_size=4")
    logged = read_step_log(tmp_path / "pt")
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert [r["loss"] for r in logged] == result["train"]["losses"]


def test_predictions_carry_the_demonstrations_shown(tmp_path):
    _run(tmp_path / "icl", "method.name=icl", "method.k=1", "method.selection=random")
    rows = [json.loads(line) for line in (tmp_path / "icl" / "predictions.jsonl").read_text().splitlines()]
    train_ids = {f"date_format-train-{i:04d}" for i in range(8)}
    for row in rows:
        [demo] = row["demonstrations"]
        assert demo["id"] in train_ids and demo["id"] != row["id"]  # drawn from the (capped) train split
        assert demo["input"] and demo["output"] and "demo_similarity" in row
    assert not (tmp_path / "icl" / "train_log.jsonl").exists()  # nothing trained, nothing logged


def test_result_json_names_the_decode_step_that_ran(tmp_path):
    """Which step backend decoded (inference.steps) is part of the result, so a compare cell records it."""
    from tunelab.inference.steps import BACKENDS

    _run(tmp_path / "zs", "method.name=icl", "method.k=0")
    step = json.loads((tmp_path / "zs" / "result.json").read_text())["eval"]["decode_step"]
    assert step and set(step.split("+")) <= set(BACKENDS)
