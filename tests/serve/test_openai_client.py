"""The official `openai` client against a live `tunelab serve` (continuous scheduler) on loopback:
completions, chat, token streaming, errors, client disconnects, and /metrics."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from tests.serve.conftest import running

from tunelab.generate import GenerationConfig
from tunelab.serve.app import ServeLimits
from tunelab.serve.scheduler import Request

openai = pytest.importorskip("openai", reason="the official client: pip install openai (in the dev extra)")

LONG = 300  # tokens: long enough that a row is still decoding when its first piece reaches the client


@pytest.fixture(scope="module")
def server(adapter_root):
    with running(adapter_root, ServeLimits(max_prompt_tokens=256, max_tokens=LONG)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_completions_and_chat_through_the_official_client(client, server):
    done = client.completions.create(model="task01", prompt="hello there", max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in {"stop", "length"}
    assert done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model="task02", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "Name a colour."}])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    models = {m.id for m in client.models.list()}
    assert {"tiny", "task01"} <= models


def test_streaming_sends_the_first_piece_while_the_row_is_still_decoding(client, server):
    metrics = server.app.state.metrics
    plain = client.completions.create(model="task03", prompt="count", max_tokens=LONG, temperature=0)
    stream = client.completions.create(model="task03", prompt="count", max_tokens=LONG, temperature=0, stream=True)
    pieces, tokens_at_first = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and tokens_at_first is None:
            tokens_at_first = metrics.tokens.value()
        pieces.append(chunk.choices[0].text if chunk.choices else "")
    tokens_at_end = metrics.tokens.value()
    assert "".join(pieces) == plain.choices[0].text  # same text, streamed
    assert len([p for p in pieces if p]) > LONG // 4  # piece by piece, not one blob
    # when the first piece arrived most of the row's tokens were still to be generated
    assert tokens_at_first is not None and tokens_at_end - tokens_at_first > plain.usage.completion_tokens // 2


def test_streamed_chat_with_the_official_client(client):
    kwargs = dict(model="task04", max_tokens=12, temperature=0, messages=[{"role": "user", "content": "hi"}])
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}


def test_errors_come_back_as_the_clients_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="task99", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="task01", prompt="x", max_tokens=LONG + 1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="task01", messages=[], max_tokens=2)


class Stall:
    """A white-box row that can stop the scheduler loop (its streaming callback waits while the gate is shut),
    so a test can disconnect a client while that client's row is certainly still in the batch."""

    def __init__(self, server) -> None:
        self.engine, self.gate = server.app.state.scheduler, threading.Event()
        self.gate.set()
        self.row = Request(server.registry.base, [5, 6, 7], GenerationConfig(max_new_tokens=LONG),
                           on_text=lambda _piece: self.gate.wait(30))
        self.engine.submit(self.row)

    def rows_of(self, name: str) -> list:
        return [r for lane in list(self.engine._lanes.values()) for r in lane.rows if r.request.served.name == name]

    def close(self) -> None:
        self.row.cancel()
        self.gate.set()


def test_a_disconnected_streaming_client_cancels_its_row(server):
    engine, stall = server.app.state.scheduler, Stall(server)
    cancelled = engine.stats.cancelled
    body = {"model": "task05", "prompt": "go on", "max_tokens": LONG, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http, \
                http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # decoding has started
            assert _wait_until(lambda: len(stall.rows_of("task05")) == 1)
            stall.gate.clear()  # the loop stops at its next step, with the row in the batch
        # the connection is closed: the server marks the row cancelled ...
        assert _wait_until(lambda: all(r.request.cancelled for r in stall.rows_of("task05")))
        stall.gate.set()
        # ... and it leaves the batch at the next step without generating its remaining tokens
        assert _wait_until(lambda: engine.stats.cancelled > cancelled and not stall.rows_of("task05"))
    finally:
        stall.close()
    assert _wait_until(lambda: engine.running() == 0)


def test_a_non_streaming_client_that_gives_up_cancels_its_row(server):
    engine, stall = server.app.state.scheduler, Stall(server)
    cancelled = engine.stats.cancelled
    body = {"model": "task06", "prompt": "go on", "max_tokens": LONG, "temperature": 0}
    gave_up = threading.Event()

    def impatient() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
        gave_up.set()

    try:
        client = threading.Thread(target=impatient)
        client.start()
        assert _wait_until(lambda: len(stall.rows_of("task06")) == 1)
        stall.gate.clear()  # the row cannot finish before its client gives up
        assert gave_up.wait(30)
        assert _wait_until(lambda: all(r.request.cancelled for r in stall.rows_of("task06")))
        stall.gate.set()
        assert _wait_until(lambda: engine.stats.cancelled > cancelled and not stall.rows_of("task06"))
        client.join()
    finally:
        stall.close()
    assert _wait_until(lambda: engine.running() == 0)


def test_metrics_are_in_the_prometheus_text_format(client, server):
    client.completions.create(model="task07", prompt="m", max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['tunelab_requests_total{route="/v1/completions",code="200"}'] >= 1
    assert samples["tunelab_generated_tokens_total"] >= 1
    assert samples["tunelab_time_to_first_token_seconds_count"] >= 1
    assert samples['tunelab_time_per_output_token_seconds_bucket{le="+Inf"}'] >= 1
    assert samples["tunelab_queue_length"] == 0 and "tunelab_running_rows" in samples
    assert samples["tunelab_batch_occupancy_count"] >= 1
    assert "# TYPE tunelab_time_to_first_token_seconds histogram" in text
