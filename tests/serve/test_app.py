"""`tunelab serve` over real HTTP on 127.0.0.1: equality with offline generation, load, streaming, errors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tunelab.data.example import Example
from tunelab.formatting import build_prompt, encode_prompt
from tunelab.generate import GenerationConfig, generate
from tunelab.protocols import load_for_eval

INPUTS = ["2024-03-05", "the cat sat on the mat", "name[Blue Spice], food[Chinese]", "What is 17 plus 25?"]


def offline(adapter_dir, instruction: str, text: str, max_new_tokens: int) -> str:
    """What `tunelab eval --adapter` would generate for this example (greedy)."""
    loaded = load_for_eval("tiny", str(adapter_dir))
    example = Example(id="x", task="t", instruction=instruction, input=text)
    prompt = build_prompt(loaded.tokenizer, loaded.layout, example)
    ids = encode_prompt(loaded.tokenizer, prompt, loaded.layout.max_length)
    return generate(loaded.adapter, loaded.tokenizer, [ids], GenerationConfig(max_new_tokens=max_new_tokens))[0]


def complete(client: httpx.Client, model: str, text: str, **extra) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": 12, "temperature": 0,
                                                "instruction": "Rewrite the input.", **extra})


def test_completions_equal_offline_generation_while_mixed_in_one_batch(live):
    """20 concurrent requests for 20 adapters share forward passes, and each equals offline generation."""
    with httpx.Client(base_url=live.url, timeout=60) as client, ThreadPoolExecutor(20) as pool:
        before = client.get("/health").json()["batching"]
        jobs = [(name, INPUTS[i % len(INPUTS)]) for i, name in enumerate(live.names)]
        served = list(pool.map(lambda job: complete(client, *job), jobs))
        after = client.get("/health").json()["batching"]
    assert all(r.status_code == 200 for r in served)
    assert after["max_running"] > 1  # rows of different adapters did share the running batch
    assert after["mixed_steps"] > before["mixed_steps"]  # ... and decode steps (one forward for several adapters)
    texts = [r.json()["choices"][0]["text"] for r in served]
    assert len(set(texts)) > 1  # the adapters really differ
    for (name, text), got in list(zip(jobs, texts, strict=True))[:6]:
        assert got == offline(live.root / name, "Rewrite the input.", text, 12), name


def test_chat_equals_offline_generation(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "task03", "max_tokens": 10, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == offline(live.root / "task03", "Name a colour.", "", 10)
    assert body["usage"]["prompt_tokens"] > 0


def test_base_model_is_served_under_its_own_name(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        r = complete(client, "tiny", "hello", raw=True)
    assert models[0] == "tiny" and sorted(models[1:]) == sorted(live.names)
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_500_requests_across_20_adapters_give_no_server_error(live):
    def one(i: int) -> int:
        name = live.names[i % len(live.names)]
        if i % 3 == 0:
            r = client.post("/v1/chat/completions", json={"model": name, "max_tokens": 3, "temperature": 0,
                                                          "messages": [{"role": "user", "content": f"q{i}"}]})
        else:
            r = client.post("/v1/completions", json={"model": name, "prompt": f"input {i}", "max_tokens": 3,
                                                     "temperature": 0.7 if i % 5 == 0 else 0,
                                                     "stream": i % 7 == 0})
        return r.status_code

    with httpx.Client(base_url=live.url, timeout=120, limits=httpx.Limits(max_connections=32)) as client, \
            ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(500)))
    assert codes.count(200) == 500, {c: codes.count(c) for c in set(codes)}


def events(response: httpx.Response) -> list:
    lines = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_completion_concatenates_to_the_plain_one(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        plain = complete(client, "task05", "stream me").json()["choices"][0]["text"]
        streamed = complete(client, "task05", "stream me", stream=True)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = events(streamed)
    assert len(chunks) > 2 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


def test_streamed_chat_sends_role_then_content_deltas(live):
    body = {"model": "task06", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=live.url, timeout=60) as client:
        plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        chunks = events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain


@pytest.mark.parametrize("body, status", [
    ({"max_tokens": 33}, 400),  # over the server's max_tokens (32)
    ({"prompt": "word " * 400}, 400),  # over max_prompt_tokens (256)
    ({"prompt": ""}, 200),  # the template still gives a non-empty prompt
    ({"prompt": "", "raw": True}, 400),  # nothing to condition on
    ({"prompt": ["a"] * 17}, 400),  # too many prompts
    ({"temperature": 3}, 400),
    ({"n": 2}, 400),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"model": None}, 400),
])
def test_limits_and_validation_answer_400(live, body, status):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": "task00", "prompt": "x", "max_tokens": 2, **body})
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["error"]["message"]


def test_malformed_json_is_400_and_oversized_bodies_are_413(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        assert client.post("/v1/completions", content=b"{not json",
                           headers={"content-type": "application/json"}).status_code == 400
        big = json.dumps({"model": "task00", "prompt": "x" * 30_000}).encode()
        assert client.post("/v1/completions", content=big, headers={"content-type": "application/json"}).status_code == 413
        chunked = client.post("/v1/completions", content=iter([big[:10_000], big[10_000:]]),
                              headers={"content-type": "application/json"})  # no content-length: counted as read
        assert chunked.status_code == 413
        assert client.get("/health").status_code == 200  # still serving
