"""`tunelab serve --engine vllm`: the same app over vLLM's engine answers as `--engine tunelab` does (greedy, fp32)
for the base model, a LoRA and a prompt-tuning adapter -- alone, streamed, with stop strings, in chat, and all at
once with a second LoRA of another rank in flight -- and leaves out the prefix-tuning adapter vLLM cannot run."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
SERVED = [MODEL, "lora", "pt", "lora16"]  # lora16: a random rank-16 LoRA beside the trained rank-8 one
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def root(trained, tmp_path_factory):
    """A served folder: the trained LoRA, prompt-tuning and prefix-tuning adapters, and a random rank-16 LoRA."""
    from tunelab.models import load_model
    from tunelab.serve.examples import write_lora_adapters

    root = tmp_path_factory.mktemp("served")
    for name, method in (("lora", "lora"), ("pt", "prompt_tuning"), ("prefix", "prefix_tuning")):
        shutil.copytree(trained[method], root / name)
    model, tokenizer = load_model(MODEL)
    write_lora_adapters(model, tokenizer, MODEL, root, 1, r=16, prefix="lora16-")
    (root / "lora16-00").rename(root / "lora16")
    return root


@pytest.fixture(scope="module")
def inputs(e2e):
    from tunelab.data import load_task

    return [e.input for e in load_task(str(e2e)).eval[:3]]


@contextmanager
def serving(root, engine: str):
    from tunelab.models import load_model
    from tunelab.serve.app import create_app
    from tunelab.serve.local import serve_in_thread
    from tunelab.serve.registry import AdapterRegistry

    model, tokenizer = load_model(MODEL)
    registry = AdapterRegistry(root, model, tokenizer, MODEL, engine=engine)
    with serve_in_thread(create_app(registry), startup_timeout=120) as url:
        yield url, registry


def complete(url: str, model: str, prompt: str, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def chat(url: str, model: str, text: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def streamed(url: str, model: str, prompt: str) -> tuple[str, str | None]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    pieces, finish = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
    return "".join(pieces), finish


def stop_word(text: str) -> str:
    """A stop string from the middle of ``text`` (so the cut happens inside the completion)."""
    words = text.split()
    return words[len(words) // 2] if len(words) > 2 else text[len(text) // 2:]


@pytest.fixture(scope="module")
def expected(root, inputs):
    """What `--engine tunelab` answers: (model, input) -> text; plus stop-string and chat answers."""
    with serving(root, "tunelab") as (url, _):
        plain = {(m, i): complete(url, m, inputs[i])["text"] for m in SERVED for i in range(len(inputs))}
        stops = {m: stop_word(plain[m, 0]) for m in SERVED}
        cut = {m: complete(url, m, inputs[0], stop=[stops[m]]) for m in SERVED}
        chats = {m: chat(url, m, inputs[1]) for m in ("lora", "pt")}
    return plain, stops, cut, chats


@pytest.fixture(scope="module")
def live(root, expected):
    with serving(root, "vllm") as server:
        yield server


def test_adapters_change_the_answer(expected, inputs):
    """The agreement below is not the base model's text four times: each adapter answers differently."""
    plain = expected[0]
    for name in ("lora", "pt", "lora16"):
        assert [plain[name, i] for i in range(len(inputs))] != [plain[MODEL, i] for i in range(len(inputs))], name


def test_models_list_lora_and_soft_prompts_not_prefix(live):
    url, registry = live
    ids = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert ids == set(SERVED)
    assert "prefix" in registry.refused()["prefix"] and "engine tunelab" in registry.refused()["prefix"]


@pytest.mark.parametrize("model", SERVED)
def test_greedy_text_equals_the_tunelab_engine(live, expected, inputs, model):
    url, _ = live
    got = [complete(url, model, inputs[i])["text"] for i in range(len(inputs))]
    assert got == [expected[0][model, i] for i in range(len(inputs))]


def test_stop_strings_and_chat_equal_the_tunelab_engine(live, expected, inputs):
    url, _ = live
    _, stops, cut, chats = expected
    for model in SERVED:
        got = complete(url, model, inputs[0], stop=[stops[model]])
        assert (got["text"], got["finish_reason"]) == (cut[model]["text"], cut[model]["finish_reason"]), model
        assert stops[model] not in got["text"]
    for model, text in chats.items():
        assert chat(url, model, inputs[1]) == text, model


def test_streamed_text_is_the_same(live, expected, inputs):
    url, _ = live
    for model in ("lora", "pt"):
        text, finish = streamed(url, model, inputs[2])
        assert text == expected[0][model, 2] and finish in ("stop", "length"), model


def test_every_adapter_at_once(live, expected, inputs):
    """Both LoRAs, the soft prompt and the base model in flight together: each row still gets its own answer."""
    url, _ = live
    jobs = [(m, i) for m in SERVED for i in range(len(inputs))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = dict(zip(jobs, pool.map(lambda job: complete(url, job[0], inputs[job[1]])["text"], jobs), strict=True))
    assert got == {job: expected[0][job] for job in jobs}


def test_prefix_adapter_is_refused_with_the_reason(live, inputs):
    url, _ = live
    r = httpx.post(f"{url}/v1/completions", json={"model": "prefix", "prompt": inputs[0], "max_tokens": 4})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "engine vllm" in message and "prefix" in message and "engine tunelab" in message


def test_health_and_metrics_name_the_engine(live):
    url, _ = live
    health = httpx.get(f"{url}/health").json()
    assert health["engine"] == "vllm"
    assert health["lora_slots"] == {"capacity": 2, "max_rank": 16, "modules": ["q_proj", "v_proj"]}
    assert health["batching"]["step"] == "vllm" and health["batching"]["finished"] > 0
    metrics = httpx.get(f"{url}/metrics").text
    steps = [line for line in metrics.splitlines() if line.startswith('tunelab_decode_steps_total{step="vllm"}')]
    assert steps and float(steps[0].split()[-1]) > 0


def test_seeded_sampling_repeats(live, inputs):
    url, _ = live
    a, b, c = (complete(url, "pt", inputs[0], temperature=1.0, seed=seed)["text"] for seed in (7, 7, 8))
    assert a == b and a != c


def test_lora_of_a_higher_rank_than_at_start_is_a_400(live, root, inputs):
    from tunelab.models import load_model
    from tunelab.serve.examples import write_lora_adapters

    url, _ = live
    model, tokenizer = load_model(MODEL)
    write_lora_adapters(model, tokenizer, MODEL, root, 1, r=32, prefix="late")
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": "late00", "prompt": inputs[0], "max_tokens": 4})
        assert r.status_code == 400 and "rank 32" in r.json()["error"]["message"], r.text
    finally:
        shutil.rmtree(root / "late00")
