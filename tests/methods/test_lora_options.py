"""LoRA's peft options: DoRA, rsLoRA and the named initialisations, each trained, saved and reloaded onto the
unchanged base model with the same outputs (PiSSA / OLoRA rewrite the base weights at init, so they are saved
converted to a plain LoRA); initialisations that need data are one-line errors."""

from __future__ import annotations

import copy

import pytest

from tunelab.config import TrainConfig
from tunelab.data import load_task
from tunelab.errors import ConfigError
from tunelab.evaluate import reference_nll
from tunelab.formatting import PromptLayout, encode_example
from tunelab.methods import method_config
from tunelab.methods.io import load_adapter, load_low_rank_delta, save_adapter
from tunelab.models import load_model
from tunelab.train import train

TASK = load_task("date_format")


@pytest.fixture(scope="module")
def pristine():
    return load_model("tiny", seed=0)


@pytest.mark.parametrize("options", [{"use_dora": True}, {"use_rslora": True}, {"init_lora_weights": False},
                                     {"init_lora_weights": "gaussian"}, {"init_lora_weights": "pissa"},
                                     {"init_lora_weights": "olora"}], ids=lambda o: "-".join(map(str, o.values())))
def test_lora_option_trains_and_reloads_on_the_unchanged_base(options, pristine, tmp_path):
    model, tok = pristine
    method, config = method_config({"name": "lora", "r": 2, "target_modules": "q_proj,v_proj", **options})
    adapter = method.build(copy.deepcopy(model), tok, config, TASK.train[:8], 0)
    layout = PromptLayout().resolved(tok)
    train(adapter, [encode_example(tok, layout, e) for e in TASK.train[:8]],
          TrainConfig(steps=2, batch_size=4, precision="fp32"), lr=1e-2, pad_id=tok.pad_token_id)
    trained = [t for t, _ in reference_nll(adapter, tok, layout, TASK.eval[:3])]
    save_adapter(adapter, tmp_path, "tiny", layout)
    loaded = load_adapter(tmp_path, copy.deepcopy(model), tok, base_model="tiny")
    assert [t for t, _ in reference_nll(loaded.adapter, tok, layout, TASK.eval[:3])] == pytest.approx(trained, rel=1e-4)
    delta = load_low_rank_delta(tmp_path, tok, base_model="tiny")
    assert (delta is None) == bool(options.get("use_dora"))  # DoRA is not x A^T B^T: served on a private copy


@pytest.mark.parametrize(("value", "message"), [
    ("pisa", "method.init_lora_weights: got 'pisa', expected true, false or one of gaussian"),
    ("eva", "method.init_lora_weights=eva: peft computes it from calibration data"),
])
def test_lora_init_is_checked_against_peft(value, message):
    with pytest.raises(ConfigError) as err:
        method_config({"name": "lora", "init_lora_weights": value})
    assert message in str(err.value) and "\n" not in str(err.value)
