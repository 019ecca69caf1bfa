"""Hand-made hostile requests and broken adapters: every answer is in the declared error schema, none is a 5xx
unless the server itself failed, a keep-alive connection survives every error, and an adapter the server
cannot serve is left out of /v1/models with one start-up log line."""

from __future__ import annotations

import http.client
import json
import logging
import shutil
from urllib.parse import urlparse

import httpx
import pytest
from tests.serve.conftest import running

from tunelab.serve.app import ServeLimits
from tunelab.serve.schemas import ErrorResponse

LIMITS = ServeLimits(max_prompt_tokens=256, max_tokens=8, max_body_bytes=300_000)
BROKEN = {"other_base", "wider", "trunc", "badconf", "noconf", "badopts", "pickled"}


def _meta(directory, **changes) -> None:
    path = directory / "tunelab_adapter.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def root(adapter_root, tmp_path_factory):
    """One good adapter and one of each kind of broken adapter."""
    root = tmp_path_factory.mktemp("hardening")
    shutil.copytree(adapter_root / "task00", root / "good")
    for name in BROKEN:
        shutil.copytree(adapter_root / "task01", root / name)
    _meta(root / "other_base", base_model="smollm2-135m")  # trained on another base model
    config = root / "wider" / "adapter_config.json"  # weights as wide as another model's
    config.write_text(json.dumps({**json.loads(config.read_text()), "token_dim": 32}))
    weights = root / "trunc" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (root / "badconf" / "adapter_config.json").write_text("{not json")
    (root / "noconf" / "adapter_config.json").unlink()
    _meta(root / "badopts", config={"num_virtual_tokens": "many"})
    (root / "pickled" / "extra.bin").write_bytes(b"\x80\x04K\x01.")
    return root


@pytest.fixture(scope="module")
def server(root):
    with running(root, LIMITS) as live:
        yield live


def _is_error(response: httpx.Response | http.client.HTTPResponse, status: int, body: bytes | None = None) -> dict:
    """The answer has ``status`` and a body in the declared error schema; returns its error object."""
    got = response.status_code if isinstance(response, httpx.Response) else response.status
    raw = response.content if isinstance(response, httpx.Response) else body
    assert got == status, (got, raw)
    assert response.headers["content-type"].startswith("application/json")
    error = ErrorResponse.model_validate_json(raw or b"").error
    assert error.code == str(status)
    return error.model_dump()


def _post(client: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def test_overlong_model_names_are_404_without_server_paths(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name in ["a" * 255, "a" * 300, "a" * 5000, "x/" * 200]:
            r = client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
            error = _is_error(r, 404)
            assert error["type"] == "not_found_error" and str(server.root) not in error["message"]


def test_lone_surrogates_are_400_and_the_connection_stays_open(server):
    bodies = {
        "/v1/completions": ['{"model": "good", "prompt": "\\ud800", "max_tokens": 2}',
                            '{"model": "good", "prompt": ["ok", "\\udfff x"], "max_tokens": 2}',
                            '{"model": "good", "prompt": "x", "instruction": "\\ud800", "max_tokens": 2}',
                            '{"model": "good", "prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}',
                            '{"model": "\\ud800", "prompt": "x"}'],
        "/v1/chat/completions": ['{"model": "good", "messages": [{"role": "user", "content": "\\ud800"}]}'],
    }
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.connect()
    sock = connection.sock
    for path, raws in bodies.items():
        for raw in raws:
            connection.request("POST", path, body=raw.encode(), headers={"content-type": "application/json"})
            response = connection.getresponse()
            error = _is_error(response, 400, response.read())
            assert "Unicode" in error["message"], error
    connection.request("POST", "/v1/completions", body=b'{"model": "good", "prompt": "x", "max_tokens": 2}',
                       headers={"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    response.read()
    assert connection.sock is sock  # the same keep-alive connection served every request
    connection.close()


def test_an_unexpected_exception_is_a_500_in_the_schema_on_a_living_connection(server, monkeypatch, caplog):
    def broken() -> dict[str, str]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.registry, "methods", broken)
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    with caplog.at_level(logging.ERROR, logger="tunelab.serve.app"):
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        error = _is_error(response, 500, response.read())
    sock = connection.sock
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert any("a bug" in (r.exc_text or "") for r in caplog.records)  # the traceback is in the server log
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    assert connection.sock is sock
    connection.close()


def test_undecodable_and_too_deep_bodies_are_400_in_the_schema(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        error = _is_error(_post(client, "/v1/completions", b'{"model": "good", "prompt": "\xff\xfe"}'), 400)
        assert "UTF-8" in error["message"]
        deep = b"[" * 100_000 + b"]" * 100_000
        error = _is_error(_post(client, "/v1/completions", deep), 400)
        assert "nested" in error["message"]
        _is_error(_post(client, "/v1/chat/completions", b"{not json"), 400)
        _is_error(client.get("/no/such/route"), 404)
        _is_error(client.get("/v1/completions"), 405)


def test_schema_and_server_agree_on_prompts_seeds_and_types(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        schema = client.get("/openapi.json").json()
        fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
        assert {"type": "array", "items": {"type": "string"}, "minItems": 1} in fields["prompt"]["anyOf"]
        seed = next(s for s in fields["seed"]["anyOf"] if s.get("type") == "integer")
        assert seed["minimum"] == 0 and seed["exclusiveMaximum"] == 2**63 and isinstance(seed["exclusiveMaximum"], int)
        assert not any("422" in op.get("responses", {}) for ops in schema["paths"].values() for op in ops.values())
        assert "security" not in json.dumps(schema["paths"])  # no API key configured: none declared

        def send(**fields) -> httpx.Response:
            return client.post("/v1/completions", json={"model": "good", "prompt": "x", "max_tokens": 2, **fields})

        _is_error(send(prompt=[]), 400)
        for seed_value in (2**63, 2**64, -1):
            _is_error(send(seed=seed_value), 400)
        assert send(seed=2**63 - 1, temperature=1.0).status_code == 200
        for wrong_type in ({"seed": False}, {"max_tokens": "2"}, {"stream": "yes"}, {"prompt": 5}):
            _is_error(send(**wrong_type), 400)
        # a top_p below float32's least positive number used to leave no token to sample (500)
        assert send(temperature=1.0, top_p=1e-45).status_code == 200
        error = _is_error(send(model="nope"), 404)
        assert str(server.root) not in error["message"] and "nope" in error["message"]


def test_broken_adapters_are_left_out_with_one_startup_line_each(root, caplog):
    with caplog.at_level(logging.WARNING, logger="tunelab.serve.registry"), running(root, LIMITS) as live, \
            httpx.Client(base_url=live.url, timeout=60) as client:
        at_start = [r.getMessage() for r in caplog.records if r.name == "tunelab.serve.registry"]
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert listed == {"tiny", "good"}
        assert set(live.registry.refused()) == BROKEN
        for name in sorted(BROKEN):
            error = _is_error(client.post("/v1/completions", json={"model": name, "prompt": "x"}), 404)
            assert "not served" in error["message"] and str(root) not in error["message"]
        assert client.post("/v1/completions", json={"model": "good", "prompt": "x",
                                                    "max_tokens": 2}).status_code == 200
        assert live.registry.loads == 1  # nothing broken was loaded
        again = [r.getMessage() for r in caplog.records if r.name == "tunelab.serve.registry"]
    assert len(at_start) == len(BROKEN) and again == at_start  # once each, at start-up
    reasons = {name: next(m for m in at_start if f"'{name}'" in m) for name in BROKEN}
    assert "smollm2-135m" in reasons["other_base"] and "token_dim=32" in reasons["wider"]
    assert "safetensors" in reasons["trunc"] and "adapter_config.json" in reasons["badconf"]
    assert "adapter_config.json" in reasons["noconf"] and "pickle" in reasons["pickled"]
    assert all("\n" not in m for m in at_start)
