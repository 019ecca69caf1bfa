"""`tunelab serve`: many task adapters over one frozen base model behind an OpenAI-compatible API."""

from __future__ import annotations

import os
import signal
from typing import Annotated

import typer


def serve_command(
    adapters: Annotated[str, typer.Option(help="directory with one subdirectory per adapter (a `tunelab run --out` "
                                               "directory, or its adapter/)")],
    model: Annotated[str, typer.Option(help="base model every adapter was trained on")] = "smollm2-135m",
    host: Annotated[str, typer.Option(help="address to bind; keep 127.0.0.1 unless behind a proxy")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="TUNELAB_API_KEY", show_envvar=True,
                                                help="require `Authorization: Bearer KEY`")] = None,
    max_loaded: Annotated[int, typer.Option(help="adapters kept in memory (least recently used evicted)")] = 64,
    max_weight_adapters: Annotated[int, typer.Option(help="LoRA / full-weight adapters kept (each holds a "
                                                          "copy of the model)")] = 2,
    max_batch: Annotated[int, typer.Option(help="rows per forward pass")] = 32,
    scheduler: Annotated[str, typer.Option(help="continuous: rows join and leave the running batch at every "
                                                "decode step; static: collect for --window-ms, run to the end")
                         ] = "continuous",
    window_ms: Annotated[float, typer.Option(help="how long the static batcher collects requests")] = 5.0,
    grace_s: Annotated[float, typer.Option(help="on SIGTERM/SIGINT: stop admitting, let running rows finish "
                                                "for this long, then cancel the rest and exit 0")] = 10.0,
    max_prompt_tokens: Annotated[int, typer.Option()] = 2048,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask for")] = 512,
    max_body_bytes: Annotated[int, typer.Option()] = 1_000_000,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
) -> None:
    """Serve every adapter in --adapters over one base model: /v1/completions, /v1/chat/completions, /v1/models."""
    import torch
    import uvicorn

    from tunelab.models import load_model
    from tunelab.serve.app import ServeLimits, create_app
    from tunelab.serve.registry import AdapterRegistry

    DrainingServer = _draining_server_class()  # noqa: N806 (a class built lazily: uvicorn imports slowly)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    base, tokenizer = load_model(model)
    registry = AdapterRegistry(adapters, base, tokenizer, model, max_loaded, max_weight_adapters)
    limits = ServeLimits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_body_bytes=max_body_bytes)
    app = create_app(registry, limits, api_key or None, window_ms=window_ms, max_batch=max_batch,
                     scheduler=scheduler, grace_s=grace_s)
    typer.echo(f"serving {model} + {len(registry.names())} adapters from {registry.root} on http://{host}:{port}"
               + f" ({scheduler} batching" + (", API key required)" if api_key else ")"))
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=int(grace_s) + 5))
    server.engine, server.grace_s = app.state.scheduler, grace_s
    server.run()
    typer.echo(f"stopped: {server.drained_by or 'shutdown'}")


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but a SIGTERM/SIGINT first tells the scheduler to stop admitting and start its grace period,
        and the process then exits 0 instead of re-raising the signal (uvicorn >= 0.29 re-raises it)."""

        drained_by: str | None = None
        engine = None  # the app's Scheduler (None under --scheduler static)
        grace_s = 10.0

        def handle_exit(self, sig, frame) -> None:
            if self.engine is not None and self.drained_by is None:
                self.engine.drain(self.grace_s)
            self.drained_by = signal.Signals(sig).name
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()  # a drained shutdown is a normal exit

    return DrainingServer
