"""The decode-step table: every backend that can run one decode step, in order of preference, and ``choose``.

A step is ``(tokens (B,), mask (B, L + 1), positions (B,), cache) -> logits (B, V)``, the cache extended in place.

    native        ``native.llama.step``: the whole Llama step in one compiled C call (CPU, fp32/bf16 weights)
    torch         ``inference.torch_step.step``: the families ``inference.arch`` declares (Llama, Gemma 3 text) in
                  PyTorch ops (any device)
    transformers  the model's own forward: every architecture, every cache, every wrapped layer

``choose(model, cache)`` returns the first backend, starting at the preferred one (``prefer``; default
``native``), that covers the model and the cache, with its name; the engine records that name (``result.json``'s
eval block, ``bench_*`` output, serve's ``/metrics``). Each fallback logs one line saying why, once per reason.
torch.compile of the torch step was tried and not kept (docs/performance.md): inductor cannot lower oneDNN's packed
linear, and with plain weights a dynamic-shape compile ran > 4 minutes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator

import torch

from tunelab.inference import arch, llama, rows, torch_step
from tunelab.kvcache import PreallocatedLayer

log = logging.getLogger(__name__)

BACKENDS = ("native", "torch", "transformers")
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]
_PREFER = contextvars.ContextVar("tunelab_decode_step", default="native")
_LOGGED: set[tuple[str, str]] = set()


@contextlib.contextmanager
def prefer(name: str) -> Iterator[None]:
    """Start the table at ``name`` inside the block: ``torch`` skips the native step, ``transformers`` runs the
    model's own forward (the reference the fast steps are tested against, and benchmarks' baseline)."""
    if name not in BACKENDS:
        raise ValueError(f"decode step {name!r}; choose one of {', '.join(BACKENDS)}")
    token = _PREFER.set(name)
    try:
        yield
    finally:
        _PREFER.reset(token)


def _fallback(wanted: str, reason: str) -> None:
    if (wanted, reason) not in _LOGGED:
        _LOGGED.add((wanted, reason))
        log.info("decode step: not %s (%s)", wanted, reason)


def transformers_step(model) -> Step:
    """The model's own forward as a step (the cache, a transformers ``Cache``, extended in place)."""
    from tunelab.modeling import cache_kwargs

    def run(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        out = model(input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=positions.unsqueeze(-1),
                    **cache_kwargs(model, cache), use_cache=True)
        return out.logits[:, -1]

    return run


def _deltas(lora: dict[str, llama.Delta], provider, slots) -> torch_step.Deltas | None:
    """The per-row deltas of one step: the declared layers' (``llama.deltas_of``: peft LoRA layers, offline eval)
    and serve's LoRA rows' (``slots``)."""
    if slots is None and not lora:
        return None

    def deltas(name: str, x: torch.Tensor) -> torch.Tensor | None:  # x (B, in)
        d = lora[name](x) if name in lora else None
        if slots is not None and provider is not None:
            r = provider.delta(name, x.unsqueeze(1), slots)  # the hooks see (B, 1, in)
            if r is not None:
                d = r.squeeze(1) if d is None else d + r.squeeze(1)
        return d

    return deltas


def _uncovered(model, cache) -> str | None:
    """Why neither fast step can run ``model`` over ``cache`` (None: they can)."""
    if rows.current_row_slots() is not None and rows.row_deltas(model) is None:
        return "per-row weight deltas live only in module hooks (no inference.rows.register_row_deltas)"
    reason = llama.uncovered(model)
    if reason is not None:
        return reason
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not PreallocatedLayer for layer in layers):
        return "the cache is not pre-allocated (kvcache.preallocate: full-attention and sliding-window layers)"
    spec = arch.of(model.config)
    assert isinstance(spec, arch.Arch)  # llama.uncovered(model) is None
    if len(layers) != len(spec.windows) or any(
            layer.window is not None and (window is None or layer.window < window)
            for layer, window in zip(layers, spec.windows, strict=False)):
        return "a cache layer holds fewer past keys than its model layer's attention window"
    return None


def choose(model, cache, dtype: torch.dtype | None = None) -> tuple[str, Step]:
    """``(name, step)`` of the first backend from the preferred one that covers ``model`` (its weights in
    ``dtype``, default: as they are now) and ``cache``. Checks the modules and the weights once: call it once
    per decode loop, or per step where weights may change between steps (serve)."""
    wanted = _PREFER.get()
    if dtype is not None and dtype != model.get_input_embeddings().weight.dtype:
        raise ValueError(f"choose() for {dtype} with the weights in {model.get_input_embeddings().weight.dtype}: "
                         "call it inside precision.weights_in")
    if wanted == "transformers":
        return "transformers", transformers_step(model)
    reason = _uncovered(model, cache)
    if reason is not None:
        _fallback(wanted, reason)
        return "transformers", transformers_step(model)
    provider = rows.row_deltas(model)

    def slots_now():
        slots = rows.current_row_slots()
        if slots is not None and provider is None:
            raise RuntimeError("per-row weight deltas became active after steps.choose picked a step for a model "
                               "without inference.rows.row_deltas; call choose inside rows.row_slots")
        return slots

    key = llama.weights_key(model)  # one walk over the weights per call
    device = model.get_input_embeddings().weight.device
    if wanted == "native":
        from tunelab import native
        from tunelab.native import llama as native_llama

        spec = arch.of(model.config)
        if not isinstance(spec, arch.Arch) or not spec.native:
            _fallback("native", f"the native kernel computes Llama layers; {type(model).__name__} runs in PyTorch ops")
        elif device.type != "cpu":
            _fallback("native", f"the native kernel reads CPU memory; the model is on {device.type}")
        elif native.library() is None:
            _fallback("native", native.reason())
        elif (nw := native_llama.weights(model, key)) is None:
            _fallback("native", "the weights do not fit the kernel (one fp32/bf16 dtype, contiguous, no biases)")
        else:
            w_torch: list[torch_step.Weights] = []

            def run_native(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
                deltas = _deltas(nw.lora, provider, slots_now())
                out = native_llama.step(model, nw, tokens, mask, positions, cache, deltas)
                if out is None:  # a cache the kernel does not read (another dtype): the torch step
                    _fallback("native", "the cache is in another dtype than the weights")
                    if not w_torch:
                        w_torch.append(torch_step.weights(model, key))
                    return torch_step.step(model, w_torch[0], tokens, mask, positions, cache, deltas)
                return out

            return "native", run_native
    w = torch_step.weights(model, key)

    def run(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        return torch_step.step(model, w, tokens, mask, positions, cache, _deltas(w.lora, provider, slots_now()))

    return "torch", run
