"""The tiny model on a CUDA GPU (``pytest -m gpu``; benchmarks/gpu_check.sh runs these): every method trains,
saves, reloads and generates; batched generation equals one-by-one; serve equals offline with mixed adapters.

Skipped without CUDA. Greedy equality is asserted in fp32 (``eval.precision`` default), as on the CPU.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False here); benchmarks/gpu_check.sh runs these on one")]

# every method, with options that keep the tiny model's runs to seconds (tests/methods/test_certificate.py)
OPTIONS = {
    "icl": ["method.k=1"],
    "discrete_prompt": ["method.n_dev=4", "method.template=plain"],
    "prompt_tuning": ["method.num_virtual_tokens=4", "method.init=random"],
    "ipt": ["method.num_virtual_tokens=4", "method.init=random", "method.selection=random"],
    "prefix_tuning": ["method.num_virtual_tokens=4"],
    "p_tuning": ["method.num_virtual_tokens=4"],
    "lora": ["method.r=4", "train.lr=0.05"],
    "full_finetune": ["train.lr=0.01"],
}
SERVED = ("ipt", "icl", "prefix_tuning", "lora", "prompt_tuning")
INSTRUCTION = "Rewrite the date in ISO format."


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One `tunelab run` per method on the GPU (model.device=cuda), each with its adapter and predictions."""
    from tunelab.config import build_config
    from tunelab.run import run

    root = tmp_path_factory.mktemp("gpu-runs")
    common = ["model.name=tiny", "model.device=cuda", "data.task=date_format", "data.max_train=16",
              "data.max_eval=4", "train.steps=3", "train.batch_size=4", "eval.max_new_tokens=6", "eval.loss=false"]
    for name, extra in OPTIONS.items():
        run(build_config(None, [*common, f"method.name={name}", *extra, f"out={root / name}"]), progress=False)
    return root


def _on_gpu(adapter_dir: Path):
    """The run's adapter loaded onto a fresh tiny model on the GPU."""
    from tunelab.methods.io import load_adapter
    from tunelab.models import load_model

    model, tok = load_model("tiny", seed=0)
    loaded = load_adapter(adapter_dir, model.to("cuda"), tok)
    loaded.adapter.to("cuda").eval()
    return loaded, tok


def _prompts(loaded, tok, texts):
    from tunelab.data.example import Example
    from tunelab.formatting import build_prompt, encode_prompt

    examples = [Example(id=str(i), task="t", instruction=INSTRUCTION, input=t) for i, t in enumerate(texts)]
    return [encode_prompt(tok, build_prompt(tok, loaded.layout, e), loaded.layout.max_length) for e in examples]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_method_trains_saves_reloads_and_generates_on_the_gpu(runs, name):
    from tunelab import generate as gen

    result = json.loads((runs / name / "result.json").read_text())
    assert result["train"]["precision"] in ("bf16", "fp32") and result["quality_meaningful"] is False
    if name not in ("icl", "discrete_prompt"):  # the methods that train
        assert result["train"]["steps"] == 3 and len(result["train"]["losses"]) == 3
    loaded, tok = _on_gpu(runs / name / "adapter")
    assert all(p.device.type == "cuda" for p in loaded.adapter.parameters())
    prompts = _prompts(loaded, tok, ["March 5, 2024", "1 Jan 1999"])
    out = gen.generate(loaded.adapter, tok, prompts, gen.GenerationConfig(max_new_tokens=6))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    sampled = gen.generate(loaded.adapter, tok, prompts, gen.GenerationConfig(max_new_tokens=4, do_sample=True))
    assert len(sampled) == 2  # a seeded CPU generator draws for a model on the GPU


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning", "lora", "full_finetune"])
def test_batched_generation_equals_one_by_one_on_the_gpu(runs, name):
    from tunelab import generate as gen

    loaded, tok = _on_gpu(runs / name / "adapter")
    prompts = _prompts(loaded, tok, ["March 5, 2024", "x", "the fifth of March, twenty twenty-four, please"])
    assert len({len(p) for p in prompts}) > 1  # left padding really happens
    cfg = gen.GenerationConfig(max_new_tokens=8)
    batched = gen.generate(loaded.adapter, tok, prompts, cfg, batch_size=len(prompts))
    assert batched == [gen.generate(loaded.adapter, tok, [p], cfg, batch_size=1)[0] for p in prompts]


def test_serve_equals_offline_with_mixed_adapters_on_the_gpu(runs, tmp_path):
    import httpx

    from tunelab import generate as gen
    from tunelab.models import load_model
    from tunelab.serve.app import create_app
    from tunelab.serve.examples import write_prompt_adapters
    from tunelab.serve.local import serve_in_thread
    from tunelab.serve.registry import AdapterRegistry

    root = tmp_path / "adapters"
    root.mkdir()
    for name in SERVED:
        (root / name).symlink_to(runs / name / "adapter", target_is_directory=True)
    model, tok = load_model("tiny", seed=0)
    write_prompt_adapters(model, tok, "tiny", root, 8, num_virtual_tokens=4, prefix="noise")
    registry = AdapterRegistry(root, model.to("cuda"), tok, "tiny")
    want = {}
    for name in SERVED:
        loaded, _ = _on_gpu(runs / name / "adapter")
        want[name] = gen.generate(loaded.adapter, tok, _prompts(loaded, tok, ["March 5, 2024"]),
                                  gen.GenerationConfig(max_new_tokens=8))[0]

    def ask(client, model_name: str, text: str, tokens: int):
        return client.post("/v1/completions", json={"model": model_name, "prompt": text, "max_tokens": tokens,
                                                    "instruction": INSTRUCTION, "temperature": 0})

    with serve_in_thread(create_app(registry)) as url, httpx.Client(base_url=url, timeout=120) as client, \
            ThreadPoolExecutor(16) as pool:
        noise = [pool.submit(ask, client, f"noise{i:02d}", f"noise {i}", 16) for i in range(8)]
        got = {name: pool.submit(ask, client, name, "March 5, 2024", 8) for name in SERVED}
        assert all(f.result().status_code == 200 for f in noise)
        for name, future in got.items():
            response = future.result()
            assert response.status_code == 200, (name, response.text)
            assert response.json()["choices"][0]["text"] == want[name], name
