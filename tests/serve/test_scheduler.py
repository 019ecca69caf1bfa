"""The continuous scheduler: rows join and leave the running batch between decode steps, and a row's greedy
output equals offline `tunelab eval` generation for every method whatever it is batched with."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from tests.serve.conftest import running
from tests.serve.test_app import offline

from tunelab.config import build_config
from tunelab.errors import ConfigError
from tunelab.formatting import PromptLayout
from tunelab.generate import GenerationConfig, generate_rows
from tunelab.inference.engine import BatchState, decode_step, prefill
from tunelab.methods.base import MethodConfig
from tunelab.methods.icl import FrozenAdapter
from tunelab.modeling import cache_tensors, merge_rows, select_rows
from tunelab.models import load_model
from tunelab.run import run
from tunelab.serve.app import create_app
from tunelab.serve.examples import write_prompt_adapters
from tunelab.serve.registry import AdapterRegistry, Served
from tunelab.serve.scheduler import Request, Scheduler, _safe_prefix

# one method per serving path (a run costs ~10 s here): soft prompt + demonstrations (IPT), demonstrations
# only (ICL), prefix key/values, private weights (LoRA), rewritten input (discrete prompt); plain soft prompts
# are the noise adapters. P-tuning serves like prompt tuning, full fine-tuning like LoRA; instruction tuning
# needs a task mixture. Set TUNELAB_SERVE_ALL_METHODS=1 to run all of them.
METHODS = {"ipt": ["method.selection=random", "method.num_virtual_tokens=4"], "icl": ["method.k=2"],
           "prefix_tuning": ["method.num_virtual_tokens=4"], "lora": ["train.lr=0.05"], "discrete_prompt": []}
if os.environ.get("TUNELAB_SERVE_ALL_METHODS"):
    METHODS |= {"p_tuning": ["method.num_virtual_tokens=4"], "full_finetune": ["train.lr=0.01"]}
INSTRUCTION = "Rewrite the date in ISO format."


def test_merge_and_select_rows_keep_each_rows_keys_values(tiny):
    model, tokenizer = tiny
    base = FrozenAdapter(model, "base", MethodConfig()).eval()
    short = prefill([(base, [5, 6])], tokenizer.pad_token_id)
    long = prefill([(base, [7, 8, 9, 10, 11]), (base, [12, 13, 14])], tokenizer.pad_token_id)
    cache, mask = merge_rows(model, [(cache_tensors(short.cache), short.mask), (cache_tensors(long.cache), long.mask)])
    assert mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    merged = cache_tensors(cache)
    assert torch.equal(merged.keys[0][0, :, 3:], cache_tensors(short.cache).keys[0][0])
    assert torch.equal(merged.keys[0][0, :, :3], torch.zeros_like(merged.keys[0][0, :, :3]))
    kept, kept_mask = select_rows(model, cache, mask, torch.tensor([0, 2]))  # no kept row attends columns 0-1
    assert kept_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert torch.equal(cache_tensors(kept).values[-1][1], cache_tensors(long.cache).values[-1][1, :, 2:])
    # one decode step of the merged rows gives each row's own next-token logits
    tokens = torch.tensor([1, 2, 3])
    state = BatchState(cache, mask, torch.cat([short.next_pos, long.next_pos]), torch.cat([short.logits, long.logits]))
    both = decode_step(model, tokens, state)
    alone = decode_step(model, tokens[:1], short)
    assert torch.allclose(both.logits[0], alone.logits[0], atol=1e-5)


def test_streaming_text_is_held_back_at_a_possible_stop_string_or_half_character():
    assert _safe_prefix("the answer is 4\nEN", ("\nEND",)) == "the answer is 4"
    assert _safe_prefix("caf\ufffd", ()) == "caf"
    assert _safe_prefix("plain", ("###",)) == "plain"


def test_rows_join_a_running_batch_and_equal_generating_alone(tiny, tmp_path):
    """Requests arrive while others decode (different adapters, budgets, a stop string); each row's text
    equals ``generate_rows`` alone, its streamed pieces concatenate to it, and joins happened mid-decode."""
    model, tokenizer = tiny
    write_prompt_adapters(model, tokenizer, "tiny", tmp_path, 4, num_virtual_tokens=4)
    registry = AdapterRegistry(tmp_path, model, tokenizer, "tiny")
    scheduler = Scheduler(tokenizer, max_batch=6)
    try:
        jobs = []
        for i in range(10):
            served = registry.get(f"task{i % 4:02d}") if i % 5 else registry.base
            ids = tokenizer(f"request {i} " * (1 + i % 3), add_special_tokens=False)["input_ids"]
            pieces: list[str] = []
            cfg = GenerationConfig(max_new_tokens=4 + 3 * i, stop=(" pellet",) if i == 3 else ())
            jobs.append((Request(served, ids, cfg, on_text=pieces.append), pieces))
            scheduler.submit(jobs[-1][0])
            time.sleep(0.002)
        results = [job.future.result(timeout=120) for job, _ in jobs]
    finally:
        scheduler.close()
    assert scheduler.stats.mixed_steps > 0 and scheduler.stats.max_running > 1
    assert scheduler.stats.admitted == 10 and scheduler.stats.steps < sum(r.completion_tokens for r in results)
    for (job, pieces), result in zip(jobs, results, strict=True):
        adapter = scheduler.hot.row(job.served) if job.served.soft is not None else job.served.adapter
        assert result.text == generate_rows([(adapter, job.prompt_ids)], tokenizer, job.cfg)[0]
        assert "".join(pieces) == result.text
        assert result.finish_reason in {"stop", "length"}


def test_a_cancelled_row_leaves_the_batch_and_the_others_go_on(tiny):
    model, tokenizer = tiny
    base = FrozenAdapter(model, "base", MethodConfig()).eval()
    served = Served("tiny", base, "base", PromptLayout().resolved(tokenizer))
    scheduler = Scheduler(tokenizer)
    started = threading.Event()
    try:
        doomed = Request(served, [5, 6, 7], GenerationConfig(max_new_tokens=400), on_text=lambda _: started.set())
        other = Request(served, [8, 9], GenerationConfig(max_new_tokens=30))
        scheduler.submit(doomed)
        assert started.wait(60)
        scheduler.submit(other)
        doomed.cancel()
        cancelled, finished = doomed.future.result(60), other.future.result(60)
    finally:
        scheduler.close()
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 400
    assert finished.text == generate_rows([(base, [8, 9])], tokenizer, GenerationConfig(max_new_tokens=30))[0]
    assert scheduler.stats.cancelled == 1 and scheduler.running() == 0


@pytest.fixture(scope="module")
def method_root(tmp_path_factory):
    """One tiny `tunelab run` per method, plus 8 random soft-prompt adapters whose requests fill the batch."""
    root = tmp_path_factory.mktemp("methods")
    common = ["data.task=date_format", "model.name=tiny", "train.steps=1", "train.batch_size=2",
              "data.max_train=8", "data.max_eval=1"]
    for name, extra in METHODS.items():
        run(build_config(None, [*common, f"method.name={name}", *extra, f"out={root / name}"]), progress=False)
    model, tokenizer = load_model("tiny", seed=0)
    write_prompt_adapters(model, tokenizer, "tiny", root, 8, num_virtual_tokens=4, prefix="noise")
    return root


def test_every_method_served_greedy_equals_offline_while_other_adapters_share_the_batch(method_root):
    noise = [f"noise{i:02d}" for i in range(8)]

    def ask(client: httpx.Client, model: str, text: str, tokens: int) -> httpx.Response:
        return client.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": tokens,
                                                    "instruction": INSTRUCTION, "temperature": 0})

    with running(method_root) as live, httpx.Client(base_url=live.url, timeout=120) as client, \
            ThreadPoolExecutor(12) as pool:
        for name in METHODS:
            live.registry.get(name)  # loaded before timing matters
        before = client.get("/health").json()["batching"]["mixed_steps"]
        # long noise rows keep the batch busy; the method rows arrive while they decode
        background = [pool.submit(ask, client, n, f"noise {i}", 24) for i, n in enumerate(noise)]
        time.sleep(0.05)
        answers = {name: pool.submit(ask, client, name, "March 5, 2024", 10) for name in METHODS}
        got = {name: f.result() for name, f in answers.items()}
        assert all(f.result().status_code == 200 for f in background)
        after = client.get("/health").json()["batching"]["mixed_steps"]
    assert after > before
    for name, response in got.items():
        assert response.status_code == 200, (name, response.text)
        want = offline(method_root / name / "adapter", INSTRUCTION, "March 5, 2024", 10)
        assert response.json()["choices"][0]["text"] == want, name


def test_the_static_batcher_stays_selectable(adapter_root):
    with running(adapter_root, app_options={"scheduler": "static"}) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        health = client.get("/health").json()
        r = client.post("/v1/completions", json={"model": "task01", "prompt": "hi", "max_tokens": 4, "stream": True})
    assert health["scheduler"] == "static" and "calls" in health["batching"]
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_an_unknown_scheduler_is_a_config_error(tiny, adapter_root):
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match="continuous, static"):
        create_app(AdapterRegistry(adapter_root, model, tokenizer, "tiny"), scheduler="fifo")
