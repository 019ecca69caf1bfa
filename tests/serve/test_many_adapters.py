"""1,000 requests over 100 adapters of mixed kinds (LoRA rows included) from concurrent clients: no 5xx."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from tests.serve.conftest import running

from tunelab.models import load_model
from tunelab.serve.app import ServeLimits
from tunelab.serve.examples import write_lora_adapters, write_prefix_adapters, write_prompt_adapters


def test_a_thousand_requests_over_a_hundred_adapters_give_no_server_error(tmp_path):
    model, tokenizer = load_model("tiny", seed=0)
    names = write_prompt_adapters(model, tokenizer, "tiny", tmp_path, 40, num_virtual_tokens=4)
    names += write_prefix_adapters(model, tokenizer, "tiny", tmp_path, 30, num_virtual_tokens=4)
    names += write_lora_adapters(model, tokenizer, "tiny", tmp_path, 30, std=0.5)
    assert len(names) == 100

    def ask(client: httpx.Client, i: int) -> int:
        body = {"model": names[(i * 37) % 100], "prompt": f"request {i}", "max_tokens": 2 + i % 3,
                "temperature": 0, "stream": i % 5 == 0}
        return client.post("/v1/completions", json=body).status_code

    # fewer LoRA slots than LoRA adapters: slots are evicted and requests wait for one under load
    with running(tmp_path, ServeLimits(max_tokens=8), max_loaded=100, max_lora_adapters=8) as live, \
            httpx.Client(base_url=live.url, timeout=120, limits=httpx.Limits(max_connections=16)) as client, \
            ThreadPoolExecutor(16) as pool:
        codes = Counter(pool.map(lambda i: ask(client, i), range(1000)))
        health = client.get("/health").json()
    assert codes == Counter({200: 1000})
    assert health["batching"]["finished"] == 1000 and health["batching"]["mixed_steps"] > 0
    assert health["lora_slots"]["evictions"] > 0


def test_example_adapters_are_the_same_files_in_every_process(tmp_path):
    """The benchmark's random adapters come from their seeds only (peft's prefix init draws from the global
    generator, which the writer seeds per adapter), whatever was drawn before."""
    import torch

    model, tokenizer = load_model("tiny", seed=0)
    written = []
    for run in ("a", "b"):
        torch.manual_seed(len(run) * 7 if run == "a" else 12345)  # a different global state before each write
        torch.rand(3)
        names = write_prefix_adapters(model, tokenizer, "tiny", tmp_path / run, 2, num_virtual_tokens=4)
        written.append([sorted((p.relative_to(tmp_path / run), p.read_bytes()) for p in (tmp_path / run / n).rglob(
            "*.safetensors")) for n in names])
    assert written[0] == written[1] and written[0][0]


def test_the_serve_config_default_keeps_every_hot_prompt_the_scheduler_keeps():
    """`tunelab serve`'s --hot-prompts default is the scheduler's own (a cap below the adapters in use makes
    random traffic recompute virtual tokens at every request), and a negative cap is refused."""
    import pytest

    from tunelab.config import ServeConfig, build
    from tunelab.errors import ConfigError
    from tunelab.serve.batcher import HOT_PROMPTS

    assert build(ServeConfig, None, ["adapters=x"]).hot_prompts == HOT_PROMPTS >= 100
    with pytest.raises(ConfigError, match="hot_prompts"):
        build(ServeConfig, None, ["adapters=x", "hot_prompts=-1"])
