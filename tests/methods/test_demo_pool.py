"""Demonstrations at evaluation and serving time come from exactly the pool the run prepared.

A run with ``data.max_train=8`` shows demonstrations drawn from its first 8 training rows; `tunelab
eval` and `tunelab serve` rebuild the selector from the run config saved with the adapter, through the
run's own data preparation, so they draw from those 8 rows too (not from the whole training split).
"""

from __future__ import annotations

import json
import shutil

import pytest

from tunelab.config import build_config
from tunelab.data import load_task
from tunelab.methods import get_method
from tunelab.methods.io import load_adapter
from tunelab.models import load_model
from tunelab.protocols import EvalRequest, load_for_eval, run_eval
from tunelab.run import prepare, run
from tunelab.serve.registry import AdapterRegistry

MAX_TRAIN = 8


@pytest.fixture(scope="module")
def icl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    cfg = build_config(None, ["model.name=tiny", "data.task=date_format", f"data.max_train={MAX_TRAIN}",
                              "data.max_eval=4", "method.name=icl", "method.k=2", "method.selection=random",
                              "eval.max_new_tokens=4", f"out={root / 'icl'}"])
    run(cfg, progress=False)
    return root, cfg


def _ids(examples) -> list[str]:
    return [e.id for e in examples]


def test_the_run_pool_is_smaller_than_the_training_split(icl_run):
    _, cfg = icl_run
    assert len(load_task("date_format").train) > MAX_TRAIN  # else the test could not tell the pools apart
    assert len(prepare(cfg).task.train) == MAX_TRAIN


def test_eval_and_serve_draw_demonstrations_from_the_runs_pool(icl_run):
    root, cfg = icl_run
    pool = _ids(prepare(cfg).task.train)
    model, tokenizer = load_model("tiny")
    loaded = load_adapter(root / "icl" / "adapter", model, tokenizer)
    assert _ids(loaded.layout.demos.pool) == pool
    assert _ids(load_for_eval("tiny", str(root / "icl" / "adapter")).layout.demos.pool) == pool
    served = AdapterRegistry(root, *load_model("tiny"), "tiny").get("icl")
    assert _ids(served.layout.demos.pool) == pool
    for example in load_task("date_format").eval[:4]:
        assert set(_ids(served.layout.demos(example))) <= set(pool)


def test_a_copied_adapter_keeps_its_pool_and_reproduces_the_run(icl_run, tmp_path):
    root, cfg = icl_run
    copy = tmp_path / "copied"
    shutil.copytree(root / "icl" / "adapter", copy)  # no result.json beside it: the metadata carries the run
    loaded = load_adapter(copy, *load_model("tiny"))
    assert _ids(loaded.layout.demos.pool) == _ids(prepare(cfg).task.train)
    report = run_eval(EvalRequest(data="date_format", adapter=str(copy), max_eval=4,
                                  eval=cfg.eval))
    run_rows = [json.loads(line) for line in (root / "icl" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in report.predictions] == [r["prediction"] for r in run_rows]


def test_demonstrations_need_the_run_config(icl_run, tmp_path):
    from tunelab.errors import TunelabError

    root, _ = icl_run
    copy = tmp_path / "bare"
    shutil.copytree(root / "icl" / "adapter", copy)
    meta = json.loads((copy / "tunelab_adapter.json").read_text())
    meta.pop("run_config")
    (copy / "tunelab_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(TunelabError, match="demonstrations drawn from its run's training data"):
        load_adapter(copy, *load_model("tiny"))
    assert get_method("icl").capabilities.demonstrations
