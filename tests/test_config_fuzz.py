"""Arbitrary values for every field of every config: a valid config, or one line naming the field. Never a traceback."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.config import EvalCommandConfig, MethodConfig, RunConfig, ServeConfig, from_dict, to_dict
from tunelab.errors import ConfigError
from tunelab.methods import METHODS

EDGES = ["", "auto", "0", "-1", "1e-3", "nan", "inf", "true", "def+pos2", "cuda:1", "a,b", "icl", "linear", "fp32",
         "plain", "standard", "exact_match", "\n"]
VALUES = st.one_of(
    st.integers(), st.integers(min_value=-2, max_value=3), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(EDGES), st.none(), st.booleans(),
    st.lists(st.one_of(st.integers(), st.text(max_size=6), st.sampled_from(EDGES), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _cases() -> list[tuple[str, str, Callable[[Any], Any]]]:
    """(test id, dotted path, build one config with only that field set to a value) for every field."""
    cases: list[tuple[str, str, Callable[[Any], Any]]] = []
    for f in dataclasses.fields(RunConfig):
        cases.append((f"run:{f.name}", f.name, lambda v, k=f.name: from_dict(RunConfig, {k: v})))
        default = getattr(RunConfig(), f.name)
        if dataclasses.is_dataclass(default) and not isinstance(default, MethodConfig):
            for g in dataclasses.fields(default):
                cases.append((f"run:{f.name}.{g.name}", f"{f.name}.{g.name}",
                              lambda v, s=f.name, k=g.name: from_dict(RunConfig, {s: {k: v}})))
    cases.append(("run:method.name", "method.name", lambda v: from_dict(RunConfig, {"method": {"name": v}})))
    for name, method in METHODS.items():
        for g in dataclasses.fields(method.Config):
            cases.append((f"{name}:method.{g.name}", f"method.{g.name}",
                          lambda v, n=name, k=g.name: from_dict(RunConfig, {"method": {"name": n, k: v}})))
    for label, cls, required in (("eval", EvalCommandConfig, {"data": "x.jsonl"}),
                                 ("serve", ServeConfig, {"adapters": "runs"})):
        for f in dataclasses.fields(cls):
            cases.append((f"{label}:{f.name}", f.name,
                          lambda v, c=cls, r=required, k=f.name: from_dict(c, {**r, k: v})))
    for g in dataclasses.fields(EvalCommandConfig(data="x").eval):  # `tunelab eval`'s nested section
        cases.append((f"eval:eval.{g.name}", f"eval.{g.name}",
                      lambda v, k=g.name: from_dict(EvalCommandConfig, {"data": "x", "eval": {k: v}})))
    return cases


CASES = _cases()


def test_every_field_is_covered():
    ids = {i for i, _, _ in CASES}
    assert {"run:train.batch_size", "run:data.template", "icl:method.k", "lora:method.r", "eval:eval.top_p",
            "serve:port", "eval:protocol", "run:method.name"} <= ids
    assert len(CASES) > 100


@pytest.mark.parametrize(("path", "make"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
def test_value_gives_a_config_or_one_line_naming_the_field(path, make, value):
    try:
        cfg = make(value)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message, message
        # the generic peft method's options are addressed by their own names (method.r), like flat overrides
        assert message.startswith("method." if path == "method.options" else path), message
        return
    json.dumps(to_dict(cfg))  # a valid config is also one result.json / metrics.json can hold
