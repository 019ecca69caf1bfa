"""Forgetting: the general-text loss with the adapter minus the base model's, recorded per trained run and
compared by the claim `ft_forgets`."""

from __future__ import annotations

import json

import pytest

from tunelab import forgetting
from tunelab.compare.claims import CLAIMS, _cost
from tunelab.config import build_config
from tunelab.errors import DataError
from tunelab.run import run

COMMON = ["model.name=tiny", "data.task=date_format", "train.steps=3", "train.batch_size=2", "data.max_train=8",
          "data.max_eval=2", "eval.max_new_tokens=3", "eval.loss=false"]


def test_probe_texts_from_a_file_else_the_fallback(tmp_path, monkeypatch):
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"output": "General text."}) + "\n" + json.dumps({"text": "More text."}) + "\n")
    assert forgetting.probe_texts(str(probe)) == (["General text.", "More text."], str(probe))
    monkeypatch.setattr(forgetting, "SHARED_PROBE", tmp_path / "absent.jsonl")
    assert forgetting.probe_texts(None) == (list(forgetting.FALLBACK), "built-in")
    with pytest.raises(DataError, match="eval.forgetting_probe"):
        forgetting.probe_texts(str(tmp_path / "missing.jsonl"))


def test_a_trained_run_records_forgetting_against_a_fresh_base_model(tmp_path):
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"output": t}) + "\n" for t in forgetting.FALLBACK))
    lora = run(build_config(None, [*COMMON, "method.name=full_finetune", "train.lr=1e-2",
                                   f"eval.forgetting_probe={probe}", f"out={tmp_path / 'ft'}"]), progress=False)
    record = lora["forgetting"]
    assert record["probe"] == str(probe) and record["texts"] == len(forgetting.FALLBACK)
    assert record["delta"] == pytest.approx(record["adapter_nll"] - record["base_nll"], abs=1e-4)
    assert record["delta"] != 0  # every weight moved: the base model's loss is not the adapter's
    assert json.loads((tmp_path / "ft" / "result.json").read_text())["forgetting"] == record
    icl = run(build_config(None, [*COMMON, "method.name=icl", f"out={tmp_path / 'icl'}"]), progress=False)
    assert "forgetting" not in icl  # nothing trained, nothing forgotten


def test_the_claim_compares_forgetting_as_a_difference():
    claim = next(c for c in CLAIMS if c.id == "ft_forgets")
    rows = lambda *values: [{"forgetting": v, "method": "m"} for v in values]  # noqa: E731
    assert _cost(claim, "t", rows(0.30, 0.20), rows(0.01, -0.01), 0).verdict == "supported"
    assert _cost(claim, "t", rows(0.0), rows(0.2), 0).verdict == "contradicted"
    assert _cost(claim, "t", rows(0.003), rows(0.0), 0).verdict == "inconclusive"


def test_the_base_models_probe_loss_is_measured_once_per_model_and_probe(tmp_path, monkeypatch):
    """A grid's cells share the base: the second cell reads its NLL from the cache instead of loading a model."""
    import tunelab.models
    import tunelab.paths

    monkeypatch.setattr(tunelab.paths, "cache_dir", lambda: tmp_path / "cache")  # the models' cache stays
    cfg = build_config(None, [*COMMON, "method.name=prompt_tuning"])
    model, tokenizer = tunelab.models.load_model("tiny")
    texts = list(forgetting.FALLBACK[:3])
    first = forgetting.base_nll(cfg, tokenizer, texts, model.device)

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded again")

    monkeypatch.setattr(tunelab.models, "load_model", no_load)
    assert forgetting.base_nll(cfg, tokenizer, texts, model.device) == first
    with pytest.raises(AssertionError, match="loaded again"):  # another probe is another measurement
        forgetting.base_nll(cfg, tokenizer, texts[:2], model.device)
