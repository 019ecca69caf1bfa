"""Which runs `eval.engine=vllm` takes, decided from declared capabilities before any model loads (torch-free),
and a compare cell's key telling the engines apart."""

from __future__ import annotations

import sys

import pytest

from tunelab.config import build_config
from tunelab.errors import ConfigError
from tunelab.inference.vllm_support import refusal
from tunelab.methods import METHODS, get_method


@pytest.mark.parametrize("method, refused", [
    ("icl", False), ("discrete_prompt", False), ("prompt_tuning", False), ("p_tuning", False), ("ipt", False),
    ("lora", False), ("prefix_tuning", True), ("full_finetune", True),
])
def test_refusal_follows_capabilities(method, refused):
    m = get_method(method)
    why = refusal(method, m.capabilities_for(m.Config()), "smollm2-135m")
    assert (why is not None) is refused
    if refused:
        assert method in why and "engine tunelab" in why


def test_every_registered_method_gets_an_answer():
    for name, m in METHODS.items():
        why = refusal(name, m.capabilities_for(m.Config()), "smollm2-135m")
        assert why is None or name in why


def test_random_weight_model_is_refused():
    why = refusal("lora", get_method("lora").capabilities, "tiny")
    assert why is not None and "random-weight" in why


def test_prepare_refuses_prefix_with_vllm_before_torch():
    from tunelab.prepare import prepare

    before = set(sys.modules)
    cfg = build_config(None, ["method.name=prefix_tuning", "eval.engine=vllm", "model.name=smollm2-135m"])
    with pytest.raises(ConfigError, match="eval.engine=vllm: method prefix_tuning"):
        prepare(cfg)
    assert "torch" in before or "torch" not in set(sys.modules) - before


def test_cell_key_includes_the_engine():
    from tunelab.compare.grid import cell_key

    plain = build_config(None, ["method.name=lora"])
    same = build_config(None, ["method.name=lora", "eval.engine=tunelab"])
    vllm = build_config(None, ["method.name=lora", "eval.engine=vllm"])
    assert cell_key(plain) == cell_key(same) != cell_key(vllm)
