"""Device and dtype choices for CUDA, checked without a GPU: torch.cuda mocked, or tensors on the meta device
(a device other than the CPU, so code that builds CPU tensors beside a model's tensors fails as on CUDA)."""

from __future__ import annotations

import pytest
import torch

from tunelab import distributed, precision, rowattention
from tunelab.errors import TunelabError
from tunelab.inference import steps, torch_step


@pytest.fixture
def cuda(monkeypatch):
    """A machine whose torch reports CUDA with bf16 (an A100 / H100); ``calls`` records the memory caps set."""
    calls: list[tuple[float, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d)))
    monkeypatch.delenv(distributed.MEMORY_FRACTION_ENV, raising=False)
    precision._resolve.cache_clear()
    yield calls
    precision._resolve.cache_clear()


def test_auto_on_cuda_is_bf16_for_training_and_inference_from_one_decision(cuda, monkeypatch):
    gpu = torch.device("cuda", 0)
    assert distributed.resolve_precision("auto", gpu) == "bf16"  # autocast in training
    assert precision.resolve("auto", gpu) == precision.PhasePrecision("bf16", "bf16")  # bf16 weights in inference
    assert distributed.resolve_precision("fp32", gpu) == "fp32"  # an explicit choice stands
    # a card without bf16 (pre-Ampere): both fall back together, since both ask distributed.fast_bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    precision._resolve.cache_clear()
    assert distributed.resolve_precision("auto", gpu) == "fp32"
    assert precision.resolve("auto", gpu) == precision.PhasePrecision("fp32", "fp32")


def test_auto_device_is_this_processes_gpu_and_the_cpu_stays_as_it_was(cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # process 1 of an accelerate launch
    assert distributed.resolve_device("auto") == torch.device("cuda", 1)
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.default_device().type in ("cpu", "mps")
    assert not cuda  # no share set: no cap


def test_a_cell_sharing_a_card_caps_its_memory_when_it_resolves_the_device(cuda, monkeypatch):
    monkeypatch.setenv(distributed.MEMORY_FRACTION_ENV, "0.25")
    device = distributed.resolve_device("cuda:0")
    assert cuda == [(0.25, device)]
    assert distributed.resolve_device("cpu") == torch.device("cpu") and len(cuda) == 1  # the CPU is never capped
    monkeypatch.setenv(distributed.MEMORY_FRACTION_ENV, "4")
    with pytest.raises(TunelabError, match="TUNELAB_GPU_MEMORY_FRACTION='4'.*in \\(0, 1\\]"):
        distributed.resolve_device("cuda:0")


def test_describe_names_what_auto_picks_on_the_device(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    info = distributed.describe(torch.device("cuda", 0))
    assert info["name"] == "NVIDIA H100 80GB HBM3"
    assert info["train_precision_auto"] == info["inference_precision_auto"] == "bf16"
    assert info["attention"].startswith("sdpa")
    assert distributed.describe(torch.device("cpu"))["attention"].startswith("tunelab_rows")


def test_the_step_chooser_never_picks_the_native_step_off_the_cpu(fresh_tiny, monkeypatch):
    """The native C step reads CPU memory: a model on another device gets the PyTorch step, without even
    compiling or asking the native library."""
    from tunelab import native
    from tunelab.kvcache import PreallocatedLayer

    def refuse():
        raise AssertionError("the native library was consulted for a model off the CPU")

    monkeypatch.setattr(native, "library", refuse)
    model, _ = fresh_tiny
    model.to("meta")
    cfg = model.config
    shape = (2, cfg.num_key_value_heads, 4, cfg.head_dim)
    cache = type("Cache", (), {})()
    cache.layers = [PreallocatedLayer(torch.empty(shape, device="meta"), torch.empty(shape, device="meta"), 8)
                    for _ in range(cfg.num_hidden_layers)]
    with steps.prefer("native"):
        assert steps.choose(model, cache)[0] == "torch"  # the torch step, built from the meta weights


def test_wide_projections_are_split_for_onednn_on_the_cpu_only():
    weight = torch.zeros(8, 1536)  # wider than MAX_K: two chunks on the CPU (batch invariance of oneDNN)
    assert len(torch_step._prepare(weight, None, pack=False).chunks) == 2
    assert len(torch_step._prepare(weight.to("meta"), None, pack=False).chunks) == 1  # a GPU: one matmul


def test_per_row_attention_is_for_the_cpu_only(monkeypatch):
    """On CUDA the prefill keeps transformers' SDPA (flash / memory-efficient kernels), not a per-row loop."""
    seen = []
    monkeypatch.setattr(rowattention, "sdpa_attention_forward", lambda *a, **k: seen.append(a[1].device) or ("sdpa", None))
    q = torch.empty(2, 4, 3, 8, device="meta")
    kv = torch.empty(2, 2, 3, 8, device="meta")
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool, device="meta")
    with torch.no_grad(), rowattention.exact_rows():
        assert rowattention.attention(None, q, kv, kv, mask)[0] == "sdpa"
    assert seen == [torch.device("meta")]


def test_discrete_prompt_scoring_feeds_the_model_on_its_own_device(fresh_tiny, monkeypatch):
    from types import SimpleNamespace

    from tunelab import modeling
    from tunelab.data.example import Example
    from tunelab.methods.discrete_prompt import loglik_score

    model, tok = fresh_tiny
    model.to("meta")
    devices = []

    def logprobs(adapter, ids, mask, labels, prefix=None):  # the forward itself cannot run on meta
        devices.append({ids.device, mask.device, labels.device})
        return torch.full((2,), -1.0), torch.zeros(2, dtype=torch.long)

    monkeypatch.setattr(modeling, "token_logprobs", logprobs)
    dev = [Example(id="0", task="t", instruction="Say hi", output="hi")]
    loglik_score(SimpleNamespace(model=model), tok, dev, "plain", 64, 4)  # only its model's device is read
    assert devices == [{torch.device("meta")}]
