"""Forgetting as a cost: how much worse the adapted model predicts general text than its base model did.

The probe is a fixed set of general-purpose texts, scored teacher-forced with nothing before them (no template,
no demonstrations; a soft prompt or prefix, where the method has one, stays in front as it always is): the mean
negative log-likelihood per token with the adapter active, minus the base model's on the same tokens. Positive =
the adaptation made general text less likely (forgetting); about 0 for a method that leaves the model alone.

Texts, first found: ``eval.forgetting_probe`` (a JSONL file: each row's ``output``, or ``text``), the responses of
``../shared/data/alpaca/eval.jsonl`` beside the checkout, else ``FALLBACK`` (so tests never need ``shared/``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.config import RunConfig

SHARED_PROBE = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca" / "eval.jsonl"
MAX_TEXTS = 32  # probe rows scored (the first ones): enough for a stable mean, cheap next to evaluation
MAX_TOKENS = 128  # per text
FALLBACK = (  # short general-domain sentences, used when no probe file exists
    "The library opens at nine in the morning and closes at six in the evening.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She packed a sandwich, an apple and a bottle of water for the long walk.",
    "The committee will meet again next Tuesday to discuss the budget.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "He read the instructions twice before assembling the bookshelf.",
    "Trains to the city leave every fifteen minutes during the rush hour.",
    "A healthy breakfast can include whole grains, fruit and some protein.",
)


def probe_texts(path: str | None = None) -> tuple[list[str], str]:
    """(texts, where they came from): ``path``, the shared Alpaca responses, or the built-in fallback."""
    source = Path(path).expanduser() if path else SHARED_PROBE
    if path and not source.is_file():
        raise DataError(f"eval.forgetting_probe={path!r}: no such file; pass a JSONL file whose rows have "
                        "'output' or 'text', or leave it unset")
    if not source.is_file():
        return list(FALLBACK), "built-in"
    texts = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{number}: invalid JSON ({exc.msg})") from None
        text = row.get("output") or row.get("text") if isinstance(row, dict) else None
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
        if len(texts) == MAX_TEXTS:
            break
    if not texts:
        raise DataError(f"{source}: no row has a non-empty 'output' or 'text' to use as forgetting probe")
    return texts, str(source)


def mean_nll(adapter: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> float:
    """Mean negative log-likelihood per token of ``texts``, teacher-forced, nothing before them."""
    from tunelab.formatting import encode
    from tunelab.modeling import score_sequences

    adapter.eval()
    encoded = [encode(tokenizer, "", text, MAX_TOKENS) for text in texts]
    logprobs = score_sequences(adapter, encoded, tokenizer.pad_token_id, batch_size)
    tokens = sum(sum(label != -100 for label in e.labels[1:]) for e in encoded)
    return -sum(logprobs) / max(tokens, 1)


def _base_key(cfg: RunConfig, texts: list[str]) -> str | None:
    """What the base model's probe NLL depends on, as a cache key; None where the weights behind the name can
    change unseen (a local directory: keyed by its files' sizes and times, which a rewrite changes)."""
    from tunelab.models import MODELS, random_weights

    name = cfg.model.name
    parts: list[Any] = [name, cfg.model.dtype, MAX_TOKENS, texts]
    if random_weights(name):
        parts.append(cfg.train.seed)
    if name not in MODELS:
        path = Path(name).expanduser()
        if not path.exists():
            return None  # a hub id: the cache of the hub may move on; measure it
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        parts.append([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def base_nll(cfg: RunConfig, tokenizer: Any, texts: list[str], device: Any) -> float:
    """The base model's mean probe NLL: a fresh copy of the base (a weight-changing method has overwritten the
    run's), computed once per model and probe and then read from ``~/.cache/tunelab/forgetting`` (a grid's cells
    share the base: loading and scoring it again in every cell would cost a model load each)."""
    from tunelab.methods.base import MethodConfig
    from tunelab.methods.icl import FrozenAdapter
    from tunelab.models import load_model
    from tunelab.paths import atomic_write_json, cache_dir

    key = _base_key(cfg, texts)
    cached = cache_dir() / "forgetting" / f"{key}.json" if key else None
    if cached is not None and cached.is_file():
        try:
            return float(json.loads(cached.read_text())["base_nll"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged entry: measure again and overwrite it
    base_model, _ = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code, cfg.train.seed,
                               allow_pickle=cfg.model.allow_pickle)
    base_model.to(device)
    value = mean_nll(FrozenAdapter(base_model, "base", MethodConfig()), tokenizer, texts, cfg.eval.batch_size)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cached, {"model": cfg.model.name, "base_nll": value})
    return value


def measure(adapter: Any, tokenizer: Any, cfg: RunConfig) -> dict[str, Any]:
    """The forgetting record of a run's trained adapter (``result.json``'s ``forgetting``): the adapter's mean
    probe NLL, the base model's (``base_nll``), and the delta."""
    texts, source = probe_texts(cfg.eval.forgetting_probe)
    adapted = mean_nll(adapter, tokenizer, texts, cfg.eval.batch_size)
    base = base_nll(cfg, tokenizer, texts, adapter.model.device)
    return {"probe": source, "texts": len(texts), "adapter_nll": round(adapted, 5), "base_nll": round(base, 5),
            "delta": round(adapted - base, 5)}
