"""`tunelab serve`: many task adapters over one frozen base model behind an OpenAI-compatible API."""

from __future__ import annotations

import os
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
    window_ms: Annotated[float, typer.Option(help="how long the batcher collects requests")] = 5.0,
    max_prompt_tokens: Annotated[int, typer.Option()] = 2048,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask for")] = 512,
    max_body_bytes: Annotated[int, typer.Option()] = 1_000_000,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | auto: prefill and decode each in bf16 where the "
                                               "device is fast at it (docs/performance.md)")] = "auto",
) -> None:
    """Serve every adapter in --adapters over one base model: /v1/completions, /v1/chat/completions, /v1/models."""
    import torch
    import uvicorn

    from tunelab.errors import ConfigError
    from tunelab.models import load_model
    from tunelab.precision import PRECISIONS, cast_parameters
    from tunelab.precision import resolve as resolve_precision
    from tunelab.serve.app import ServeLimits, create_app
    from tunelab.serve.registry import AdapterRegistry

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    base, tokenizer = load_model(model)
    phases = resolve_precision(precision, base.get_input_embeddings().weight.device, "--precision")
    if phases.prefill == phases.decode:
        # cast once: no per-batch weight swap (precision.weights_in) that a concurrent adapter load
        # (registry: a deep copy of the base model for LoRA / full weights) could observe half-done
        cast_parameters(base, phases.prefill_dtype)
    registry = AdapterRegistry(adapters, base, tokenizer, model, max_loaded, max_weight_adapters)
    limits = ServeLimits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_body_bytes=max_body_bytes)
    app = create_app(registry, limits, api_key or None, window_ms=window_ms, max_batch=max_batch,
                     precision=precision)
    typer.echo(f"serving {model} + {len(registry.names())} adapters from {registry.root} on http://{host}:{port}"
               + (" (API key required)" if api_key else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning")
