"""A live `tunelab serve` on 127.0.0.1 (random free port, uvicorn in a thread) over the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunelab.models import load_model
from tunelab.serve.app import ServeLimits, create_app
from tunelab.serve.examples import write_prompt_adapters
from tunelab.serve.local import serve_in_thread
from tunelab.serve.registry import AdapterRegistry

N_ADAPTERS = 20


@dataclass
class Live:
    """A running server: its base URL, adapter directory and in-process objects (for white-box checks)."""

    url: str
    root: Path
    names: list[str]
    registry: AdapterRegistry
    app: object


@contextmanager
def running(root: Path, limits: ServeLimits | None = None, api_key: str | None = None, model_name: str = "tiny",
            app_options: dict | None = None, **registry_options) -> Iterator[Live]:
    """Start the server over ``root`` on a free loopback port; stop it on exit. ``app_options`` go to
    ``create_app`` (e.g. ``scheduler="static"``)."""
    model, tokenizer = load_model(model_name, seed=0)
    registry = AdapterRegistry(root, model, tokenizer, model_name, **registry_options)
    app = create_app(registry, limits, api_key, **(app_options or {}))
    with serve_in_thread(app) as url:
        yield Live(url, root, registry.names(), registry, app)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    """20 random soft-prompt adapters (4 virtual tokens each) for the tiny model."""
    root = tmp_path_factory.mktemp("adapters")
    model, tokenizer = load_model("tiny", seed=0)
    write_prompt_adapters(model, tokenizer, "tiny", root, N_ADAPTERS, num_virtual_tokens=4)
    return root


@pytest.fixture(scope="module")
def live(adapter_root) -> Iterator[Live]:
    with running(adapter_root, ServeLimits(max_prompt_tokens=256, max_tokens=32, max_body_bytes=20_000)) as server:
        yield server
