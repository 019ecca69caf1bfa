"""Shared fixtures: the tiny model (seconds), the real model (a few marked tests), shared data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason when it is absent (a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data beside the checkout; present in CI)")
    return path


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the ~0.8M-parameter test model; tests must not modify it in place."""
    from tunelab.models import load_model

    return load_model("tiny")


@pytest.fixture
def fresh_tiny():
    """A new tiny model per test (for methods that patch or train the model)."""
    from tunelab.models import load_model

    return load_model("tiny", seed=0)


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory) -> Path:
    """A second base model on disk: the tiny architecture, 32 wide instead of 16 (no adapter fits both; the claims
    preset's "larger model", as gemma3-270m is beside smollm2-135m there)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_model, tiny_config

    _, tok = load_model("tiny", seed=0)
    config = tiny_config(len(tok))
    config.hidden_size, config.head_dim = 32, 8
    directory = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory), safe_serialization=True)
    tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def real_model():
    from tunelab.models import load_model

    return load_model("smollm2-135m")


def base_and_soft_prompt(model_tok, virtual: int = 4):
    """(model, tokenizer, [the frozen base model's adapter, a random prompt-tuning adapter on it])."""
    from tunelab.methods import METHODS
    from tunelab.methods.base import MethodConfig, freeze
    from tunelab.methods.icl import FrozenAdapter

    model, tok = model_tok
    freeze(model)
    pt = METHODS["prompt_tuning"]
    soft = pt.build(model, tok, pt.Config(num_virtual_tokens=virtual, init="random"), [], 0)
    return model, tok, [FrozenAdapter(model, "base", MethodConfig()), soft]


def decode_steps(model, state, mode: str, steps: int = 5) -> list:
    """Logits of ``steps`` decode steps of the engine (``inference.engine.decode_step`` from a ``BatchState``
    ``state``) with the step table starting at ``mode`` (``inference.steps.prefer``), feeding greedy tokens."""
    from tunelab.inference import engine
    from tunelab.inference import steps as step_table

    out = []
    with step_table.prefer(mode):
        for _ in range(steps):
            state = engine.decode_step(model, state.logits.argmax(-1), state)
            out.append(state.logits)
    return out


def lora_with_deltas(model, tok, r: int = 4):
    """A LoRA adapter (peft layers patched into ``model``, unmerged) whose B factors are random, not peft's
    zeros, so that its deltas change the logits."""
    import torch

    from tunelab.methods import METHODS

    adapter = METHODS["lora"].build(model, tok, METHODS["lora"].Config(r=r, dropout=0.0), [], 0)
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return adapter
