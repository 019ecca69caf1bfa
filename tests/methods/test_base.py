"""What the methods share (methods/base.py)."""

from __future__ import annotations

import warnings

import pytest

from tunelab.methods import METHODS


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "prefix_tuning", "lora"])
def test_peft_methods_build_without_the_transformers_future_warning(name, fresh_tiny):
    """peft's constructor reads a deprecated transformers property; that warning is not the user's to fix."""
    model, tok = fresh_tiny
    method = METHODS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method.build(model, tok, method.Config(), [], 0)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
