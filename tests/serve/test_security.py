"""API key, unknown adapters and adapter names that try to leave the served directory."""

from __future__ import annotations

import os
import pickle
import shutil

import httpx
import pytest
from tests.serve.conftest import running

from tunelab.models import load_model
from tunelab.serve.examples import write_prompt_adapters


def test_api_key_is_required_on_every_v1_route(adapter_root):
    with running(adapter_root, api_key="s3cret") as live, httpx.Client(base_url=live.url, timeout=60) as client:
        body = {"model": "task00", "prompt": "x", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 401
        assert client.post("/v1/completions", json=body,
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models").status_code == 401
        chat = {"model": "task00", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=chat).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.get("/health").status_code == 200  # liveness probes need no key
        assert live.registry.loads == 1  # refused requests loaded nothing


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A valid adapter outside the served directory, which no request may reach."""
    root = tmp_path_factory.mktemp("outside")
    model, tokenizer = load_model("tiny", seed=0)
    write_prompt_adapters(model, tokenizer, "tiny", root, 1, num_virtual_tokens=4, prefix="secret")
    return root / "secret00"


@pytest.fixture(scope="module")
def hostile_root(adapter_root, outside, tmp_path_factory):
    """A served directory holding good adapters, a symlink leading outside it, and a pickle-bearing adapter."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(adapter_root / "task00", root / "good")
    os.symlink(outside, root / "link_out")
    os.symlink(root / "good", root / "link_in")  # stays inside: allowed
    shutil.copytree(adapter_root / "task01", root / "pickled")
    (root / "pickled" / "extra.bin").write_bytes(pickle.dumps({"x": 1}))
    return root


NAMES = ["..", "../outside", "%2e%2e", "%2e%2e%2fsecret00", "..%2fsecret00", "/etc/passwd", "/tmp", "a/b",
         "good/../../x", "link_out", "nope", "", ".", "a\\b", "good\x00"]


def test_unknown_and_escaping_names_are_404_and_load_nothing(hostile_root, outside):
    with running(hostile_root) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        for name in [*NAMES, str(outside), str(outside.parent)]:
            r = client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 404, (name, r.status_code, r.text)
            assert r.json()["error"]["type"] == "not_found_error"
        assert live.registry.loads == 0
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert "link_out" not in listed and {"good", "link_in"} <= listed
        assert client.post("/v1/completions", json={"model": "link_in", "prompt": "x",
                                                    "max_tokens": 2}).status_code == 200


def test_pickle_bearing_adapter_is_refused_not_loaded(hostile_root):
    with running(hostile_root) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert "pickled" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
        r = client.post("/v1/completions", json={"model": "pickled", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404 and "not served" in r.json()["error"]["message"]
        assert "pickle" in live.registry.refused()["pickled"]  # the reason is in the server log
        assert live.registry.loaded() == []
        assert client.post("/v1/completions", json={"model": "good", "prompt": "x",
                                                    "max_tokens": 2}).status_code == 200
