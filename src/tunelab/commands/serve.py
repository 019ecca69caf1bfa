"""`tunelab serve`: many task adapters over one frozen base model behind an OpenAI-compatible API."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from tunelab.config import ServeConfig


Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. port=8001 max_batch=16")]


def serve_command(
    adapters: Annotated[str | None, typer.Option(help="directory with one subdirectory per adapter (a `tunelab run "
                                                      "--out` directory, or its adapter/)")] = None,
    model: Annotated[str | None, typer.Option(help="base model every adapter was trained on (default: smollm2-135m)")] = None,
    host: Annotated[str | None, typer.Option(help="address to bind; keep 127.0.0.1 unless behind a proxy "
                                                  "(default: 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="(default: 8000)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TUNELAB_API_KEY", show_envvar=True,
                                                help="require `Authorization: Bearer KEY`")] = None,
    max_loaded: Annotated[int | None, typer.Option(help="adapters kept in memory (least recently used evicted) "
                                                        "(default: 64)")] = None,
    max_weight_adapters: Annotated[int | None, typer.Option(help="full-weight adapters kept (each holds a copy of "
                                                                 "the model) (default: 2)")] = None,
    max_lora_adapters: Annotated[int | None, typer.Option(help="LoRA adapters kept as slots of the shared batch "
                                                               "(least recently used idle slot evicted) "
                                                               "(default: 32)")] = None,
    max_batch: Annotated[int | None, typer.Option(help="rows per forward pass (default: 32)")] = None,
    hot_prompts: Annotated[int | None, typer.Option(help="soft-prompt adapters whose virtual-token key/values stay "
                                                         "cached, least recently used evicted (~0.9 MB each on "
                                                         "SmolLM2-135M) (default: 256)")] = None,
    scheduler: Annotated[str | None, typer.Option(help="continuous: rows join and leave the running batch at every "
                                                       "decode step; static: collect for --window-ms, run to the end "
                                                       "(default: continuous)")] = None,
    window_ms: Annotated[float | None, typer.Option(help="how long the static batcher collects requests "
                                                         "(default: 5.0)")] = None,
    grace_s: Annotated[float | None, typer.Option(help="on SIGTERM/SIGINT: stop admitting, let running rows finish "
                                                       "for this long, then cancel the rest and exit 0 "
                                                       "(default: 10.0)")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="(default: 2048)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="largest max_tokens a request may ask for (default: 512)")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="(default: 1000000)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16 | auto: prefill and decode each in bf16 where the "
                                                      "device is fast at it (docs/performance.md) (default: fp32)")] = None,
    engine: Annotated[str | None, typer.Option(help="tunelab: tunelab's scheduler (every method, soft prompts, "
                                                    "prefixes and LoRA in one batch); vllm: vLLM's engine in this "
                                                    "process (LoRA, soft prompts, ICL; prefix and full-weight "
                                                    "adapters left out) (default: tunelab)")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with ServeConfig keys")] = None,
    overrides: Overrides = None,
) -> None:
    """Serve every adapter in --adapters over one base model: /v1/completions, /v1/chat/completions, /v1/models.

    Settings come from defaults < --config YAML < dotted overrides (``port=8001``) < flags; every
    value is checked before the model loads.
    """
    from tunelab.config import ServeConfig, build

    flags = {"adapters": adapters, "model": model, "host": host, "port": port, "api_key": api_key or None,
             "max_loaded": max_loaded, "max_weight_adapters": max_weight_adapters,
             "max_lora_adapters": max_lora_adapters, "max_batch": max_batch, "hot_prompts": hot_prompts,
             "scheduler": scheduler, "window_ms": window_ms, "grace_s": grace_s,
             "max_prompt_tokens": max_prompt_tokens, "max_tokens": max_tokens,
             "max_body_bytes": max_body_bytes, "threads": threads, "precision": precision, "engine": engine}
    serve(build(ServeConfig, config, overrides, flags))


def serve(cfg: ServeConfig) -> None:
    """Load the base model, index the adapters and run the server until interrupted."""
    import torch
    import uvicorn

    from tunelab.models import load_model
    from tunelab.precision import cast_parameters
    from tunelab.precision import resolve as resolve_precision
    from tunelab.serve.app import ServeLimits, create_app
    from tunelab.serve.registry import AdapterRegistry

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.engine == "vllm":
        _check_vllm(cfg.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base, tokenizer = load_model(cfg.model)
    phases = resolve_precision(cfg.precision, base.get_input_embeddings().weight.device, "precision")
    if phases.prefill == phases.decode:
        # cast once: no per-batch weight swap (precision.weights_in) that a concurrent adapter load
        # (registry: a deep copy of the base model for full weights) could observe half-done
        cast_parameters(base, phases.prefill_dtype)
    registry = AdapterRegistry(cfg.adapters, base, tokenizer, cfg.model, cfg.max_loaded, cfg.max_weight_adapters,
                               cfg.max_lora_adapters, engine=cfg.engine)
    limits = ServeLimits(max_prompt_tokens=cfg.max_prompt_tokens, max_tokens=cfg.max_tokens,
                         max_body_bytes=cfg.max_body_bytes)
    app = create_app(registry, limits, cfg.api_key or None, window_ms=cfg.window_ms, max_batch=cfg.max_batch,
                     hot_prompts=cfg.hot_prompts, precision=cfg.precision, scheduler=cfg.scheduler, grace_s=cfg.grace_s)
    batching = "vLLM's engine" if cfg.engine == "vllm" else f"{cfg.scheduler} batching"
    typer.echo(f"serving {cfg.model} + {len(registry.names())} adapters from {registry.root} on "
               f"http://{cfg.host}:{cfg.port} ({batching}" + (", API key required)" if cfg.api_key else ")"))
    if cfg.engine == "tunelab" and (unbatched := registry.unbatched()):
        typer.echo(f"not batched with other adapters (weights changed, not a low-rank delta; a private model copy "
                   f"each): {', '.join(unbatched)}")
    server = _draining_server_class()(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                                     timeout_graceful_shutdown=int(cfg.grace_s) + 5))
    server.engine, server.grace_s = app.state.scheduler, cfg.grace_s
    server.run()
    typer.echo(f"stopped: {server.drained_by or 'shutdown'}")


def _check_vllm(model: str) -> None:
    """Before any weights load: vLLM is installed and can load ``model`` (a directory, not a built-in random one)."""
    from tunelab.errors import ConfigError
    from tunelab.inference.vllm_engine import import_vllm
    from tunelab.inference.vllm_support import refusal
    from tunelab.methods.base import BASE_CAPABILITIES

    if why := refusal("base", BASE_CAPABILITIES, model):
        raise ConfigError(f"--engine vllm: {why}")
    import_vllm()


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
