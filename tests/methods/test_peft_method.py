"""The generic peft method: every peft type of the installed peft, on the tiny model, through tunelab's one path.

The types come from peft's own registry (``PEFT_TYPE_TO_CONFIG_MAPPING``), so a new peft release is covered
without editing this file. A type peft itself refuses on the tiny model with default options (it needs an option
only a user can give, or does not apply to a causal LM) is an expected failure carrying peft's error, found by
trying: every type that builds must train, save, reload to the same outputs and evaluate.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tunelab.config import EvalConfig, TrainConfig, build_config
from tunelab.data import load_task
from tunelab.errors import ConfigError
from tunelab.evaluate import evaluate, reference_nll
from tunelab.formatting import PromptLayout, encode_example
from tunelab.methods import METHODS, method_config
from tunelab.methods.icl import FrozenAdapter
from tunelab.methods.io import load_adapter, save_adapter
from tunelab.methods.peft_method import peft_types
from tunelab.models import load_model
from tunelab.train import train

TASK = load_task("date_format")
TRAIN, EVAL = TASK.train[:8], TASK.eval[:3]


@pytest.fixture(scope="module")
def pristine():
    """(tiny model, tokenizer, the base model's reference NLL on EVAL); tests deep-copy the model (peft patches it)."""
    model, tok = load_model("tiny", seed=0)
    layout = PromptLayout().resolved(tok)
    return model, tok, nll(FrozenAdapter(copy.deepcopy(model), "base", METHODS["peft"].Config()), tok, layout)


def built(peft_type: str, model, tok):
    """The adapter for ``peft_type`` with default options, or an expected failure carrying peft's reason."""
    try:
        method, config = method_config({"name": "peft", "peft_type": peft_type})
        return method.build(model, tok, config, TRAIN, 0)
    except ConfigError as exc:  # peft refuses this type on the tiny model with default options: its error
        assert "\n" not in str(exc)
        pytest.xfail(f"{peft_type}: {exc}")


def nll(adapter, tok, layout) -> list[float]:
    return [total for total, _ in reference_nll(adapter, tok, layout, EVAL)]


@pytest.mark.parametrize("peft_type", peft_types())
def test_every_peft_type_trains_saves_reloads_and_evaluates(peft_type, pristine, tmp_path):
    model, tok, base_nll = pristine
    adapter = built(peft_type, copy.deepcopy(model), tok)
    layout = PromptLayout().resolved(tok)
    trainable = {n: p.detach().clone() for n, p in adapter.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in adapter.named_parameters() if not p.requires_grad}
    assert trainable, f"{peft_type}: nothing to train"

    stats = train(adapter, [encode_example(tok, layout, e) for e in TRAIN],
                  TrainConfig(steps=2, batch_size=4, precision="fp32"), lr=1e-2, pad_id=tok.pad_token_id)
    assert stats.final_loss is not None and math.isfinite(stats.final_loss)
    params = dict(adapter.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trainable.items()), "no trainable weight moved"
    assert all(torch.equal(params[n], before) for n, before in frozen.items()), "a frozen weight moved"

    trained_nll = nll(adapter, tok, layout)
    assert trained_nll != pytest.approx(base_nll, rel=1e-6), "the adapter does not reach the forward pass"
    save_adapter(adapter, tmp_path, "tiny", layout)
    loaded = load_adapter(tmp_path, copy.deepcopy(model), tok, base_model="tiny")
    assert nll(loaded.adapter, tok, layout) == pytest.approx(trained_nll, rel=1e-4, abs=1e-4)
    result = evaluate(loaded.adapter, tok, layout, EVAL[:2], ["exact_match"], EvalConfig(max_new_tokens=3),
                      n_resamples=10)
    assert len(result.predictions) == 2 and "exact_match" in result.metrics


def test_capabilities_come_from_peft_config():
    method = METHODS["peft"]
    caps = {t: method.capabilities_for(method_config({"name": "peft", "peft_type": t})[1])
            for t in ("PROMPT_TUNING", "PREFIX_TUNING", "IA3", "LORA")}
    assert caps["PROMPT_TUNING"].soft_prompt and not caps["PROMPT_TUNING"].changes_weights
    assert caps["PREFIX_TUNING"].prefix and not caps["PREFIX_TUNING"].soft_prompt
    assert caps["IA3"].changes_weights and not caps["IA3"].low_rank_delta
    assert caps["LORA"].changes_weights and caps["LORA"].low_rank_delta


@pytest.mark.parametrize(("options", "message"), [
    ({"peft_type": "ia4"}, "method.peft_type: unknown peft type 'ia4' (did you mean 'IA3'?)"),
    ({"peft_type": "IA3", "targt_modules": ["q_proj"]},
     "method.targt_modules: not an option of peft's IA3Config (did you mean 'target_modules'?); valid: "),
    ({"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]},
     "peft's IA3Config refuses these options: "),
    ({"peft_type": "MULTITASK_PROMPT_TUNING", "prompt_tuning_init_state_dict_path": "soft.bin"},
     "only a .safetensors file is read"),  # peft would torch.load it
    ({"peft_type": "PROMPT_TUNING", "tokenizer_kwargs": {"trust_remote_code": True}},
     "set model.trust_remote_code=true"),
])
def test_options_are_checked_against_peft_config_class(options, message):
    with pytest.raises(ConfigError, match=None) as err:
        method_config({"name": "peft", **options})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_flat_overrides_reach_peft_and_round_trip_through_the_saved_config():
    cfg = build_config(None, ["method=peft", "method.peft_type=ia3", "method.target_modules=q_proj,v_proj",
                              "method.feedforward_modules=v_proj"])
    assert cfg.method.peft_type == "IA3"
    assert cfg.method.options == {"target_modules": ["q_proj", "v_proj"], "feedforward_modules": "v_proj"}
    from dataclasses import asdict

    _, again = method_config({**asdict(cfg.method), "name": "peft"})  # as load_adapter reads tunelab_adapter.json
    assert again.options == cfg.method.options and again.peft_type == "IA3"


COMMON = ["model.name=tiny", "data.task=date_format", "train.steps=3", "train.batch_size=2", "data.max_train=8",
          "data.max_eval=2", "eval.max_new_tokens=4", "eval.loss=false", "method.name=peft"]


def test_peft_runs_are_served_by_capabilities_with_offline_predictions(tmp_path):
    """IA3 (weights, not low-rank: a private copy, unbatched), LoRA through peft (a row of the shared batch) and
    prompt tuning through peft (a soft prompt on the shared model), each answering as `tunelab run` predicted."""
    import httpx
    from tests.serve.conftest import running

    from tunelab.run import run

    root = tmp_path / "adapters"
    expected = {}
    for peft_type in ("IA3", "LORA", "PROMPT_TUNING"):
        out = root / peft_type.lower()
        result = run(build_config(None, [*COMMON, f"method.peft_type={peft_type}", f"out={out}"]), progress=False)
        assert result["method"] == "peft" and result["trainable_params"] > 0
        expected[out.name] = [json.loads(x)["prediction"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    with running(root) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert live.registry.unbatched() == ["ia3"]
        for name, predictions in expected.items():
            for example, prediction in zip(TASK.eval[:2], predictions, strict=True):
                body = {"model": name, "prompt": example.input, "instruction": example.instruction, "max_tokens": 4,
                        "temperature": 0}
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"].strip() == prediction, name
        served = {name: live.registry.get(name) for name in expected}
    assert not served["ia3"].shares_base and served["lora"].lora is not None
    assert served["prompt_tuning"].shares_base and served["prompt_tuning"].soft is not None
