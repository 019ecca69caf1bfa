"""Adding a method touches its module and one registry line: everything else asks its capabilities.

The toy method (tests/methods/toy_method.py) is registered the way a contributor would add one line to
``tunelab.methods.METHODS``; nothing else in the tree knows its name. It is trained, saved, loaded by the
one loader, evaluated by `tunelab eval`, served over HTTP (its soft prompt and its demonstrations in the
shared batches) and compared in a grid.
"""

from __future__ import annotations

import json

import httpx
import pytest
from rich.console import Console
from tests.compare.conftest import write_grid
from tests.methods.toy_method import Toy
from tests.serve.conftest import running

from tunelab.compare import compare
from tunelab.compare.store import Store
from tunelab.config import EvalConfig, build_config
from tunelab.data import load_task
from tunelab.methods import METHODS
from tunelab.protocols import EvalRequest, run_eval
from tunelab.run import run

COMMON = ["model.name=tiny", "data.task=date_format", "train.steps=3", "train.batch_size=2", "data.max_train=8",
          "data.max_eval=3", "eval.max_new_tokens=6", "eval.loss=false"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Toy())  # the one registry line a contributor adds


def test_a_method_in_one_module_is_trained_saved_loaded_evaluated_served_and_compared(toy, tmp_path, monkeypatch):
    root = tmp_path / "adapters"
    result = run(build_config(None, [*COMMON, "method.name=toy", f"out={root / 'toy'}"]), progress=False)
    assert result["method"] == "toy" and result["trainable_params"] == 3 * 16  # n x hidden size of the tiny model
    assert result["train"]["steps"] == 3 and result["adapter_bytes"] > 0
    predictions = [json.loads(line) for line in (root / "toy" / "predictions.jsonl").read_text().splitlines()]

    # loaded by the one loader and evaluated by `tunelab eval`: the same predictions as the run's
    report = run_eval(EvalRequest(data="date_format", adapter=str(root / "toy" / "adapter"), max_eval=3,
                                  eval=EvalConfig(max_new_tokens=6)))
    assert report.info["method"] == "toy"
    assert [p["prediction"] for p in report.predictions] == [p["prediction"] for p in predictions]

    # served over HTTP next to the bare model: its soft prompt and its demonstrations, as offline
    with running(root) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        served = live.registry.get("toy")
        assert served.shares_base and served.soft is not None and served.layout.demos is not None
        for example, expected in zip(load_task("date_format").eval[:3], predictions, strict=True):
            body = {"model": "toy", "prompt": example.input, "instruction": example.instruction, "max_tokens": 6,
                    "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"].strip() == expected["prediction"]

    # compared in a grid next to prompt tuning; cells run in this process, which holds the registry line
    # (a forkserver child would import tunelab.methods afresh, where a real registry line would be too)
    monkeypatch.setattr("tunelab.compare.runner._can_fork_server", lambda: False)
    grid = write_grid(tmp_path, methods=[{"name": "toy", "label": "toy"},
                                         {"name": "prompt_tuning", "num_virtual_tokens": 3, "label": "pt"}],
                      seeds=[0])
    outcome = compare(grid, tmp_path / "grid", progress=False, console=Console(quiet=True))
    with Store(outcome.store) as db:
        assert {r.method_name for r in db.rows(status="done")} == {"toy", "prompt_tuning"}
    assert "toy" in outcome.report_md.read_text()
