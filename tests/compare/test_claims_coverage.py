"""`--preset claims` measures every claim of the table: its grid, shrunk to the tiny model, leaves none unmeasured."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.conftest import shared_path

from tunelab.compare.claims import CLAIMS
from tunelab.compare.grid import preset_path

pytestmark = pytest.mark.shared_data


def tiny_claims_grid(wide: Path) -> dict:
    """The claims preset with the same methods, tasks and cells-from-cells, on the tiny model (the second model:
    ``wide``), 2 steps, a handful of rows and one seed."""
    raw = yaml.safe_load(preset_path("claims").read_text())
    preset_model = raw["model"]["name"]
    raw["model"] = {"name": "tiny"}
    raw["data"] = {**raw["data"], "max_train": 16, "max_eval": 6, "max_length": 128}
    raw["train"] = {"steps": 2, "batch_size": 4}
    raw["eval"] = {"batch_size": 8, "max_new_tokens": 4}
    raw["tune"] = {**raw["tune"], "trials": 1, "dev_rows": 4}
    raw["seeds"] = [0]
    for method in raw["methods"]:
        method.pop("seeds", None)
        if "model" in method:  # the other model of the scale claim
            assert method["model"]["name"] != preset_model
            method["model"] = {"name": str(wide)}
        if method.get("data", {}).get("max_train"):  # the smaller training set of the size sweep
            method["data"] = {"max_train": 8}
        if "max_per_task" in method:
            method["max_per_task"] = 2
        if "train" in method:
            method["train"] = {k: v for k, v in method["train"].items() if k == "steps"}  # steps: 0 stays
    for task in raw["tasks"]:
        if task.get("eval_per_task"):
            task["eval_per_task"] = 1
        if task.get("max_eval"):
            task["max_eval"] = 6
    return raw


def test_the_preset_as_shipped_has_the_cells_the_claims_need(tmp_path, monkeypatch):
    """The preset itself (expanded and validated, no training): SmolLM2 plus Gemma for the scale claim only, and
    the training-size sweep for PT and LoRA."""
    from tunelab.compare import plan

    shared_path("super_ni")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    grid, cells = plan(preset_path("claims"), out=tmp_path)
    assert {c.config.model.name for c in cells} == {"smollm2-135m", "gemma3-270m"}
    assert {c.method_name for c in cells if c.config.model.name == "gemma3-270m"} == {"icl", "instruction_tuning"}
    assert {c.train_size for c in cells if c.method_name in ("prompt_tuning", "lora") and c.task == "e2e"} == {32, 320}
    assert len(cells) == 40


def test_no_claim_is_left_unmeasured_on_the_tiny_model(wide_model, tmp_path, monkeypatch):
    from rich.console import Console

    from tunelab.compare import compare

    shared_path("super_ni")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the preset says ../shared/data: relative to a checkout
    grid = tmp_path / "claims.yaml"
    grid.write_text(yaml.safe_dump(tiny_claims_grid(wide_model), sort_keys=False))
    outcome = compare(grid, tmp_path / "out", progress=False, console=Console(quiet=True))
    assert outcome.summary.failed == 0
    report = outcome.report_md.read_text()
    verdicts = {}
    for claim in CLAIMS:
        start = f"| {claim.source} | {claim.test} | "
        (line,) = [x for x in report.splitlines() if x.startswith(start)]
        verdicts[claim.id] = line[len(start):].rstrip(" |")
    unmeasured = {cid: v for cid, v in verdicts.items() if v.startswith("not measured")}
    assert not unmeasured, unmeasured
    scale = next(x for x in report.splitlines() if x.startswith("| (instruction-tuned − base model)")
                 and " on " in x and " vs " in x)
    assert "sni_unseen" in scale and str(wide_model) in scale  # the larger model's gain minus the smaller's
