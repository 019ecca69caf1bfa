"""The adapter directory behind `tunelab serve`: names -> loaded adapters, lazily, with an LRU cap.

Every subdirectory of ``root`` that is a run directory (``X`` of `tunelab run --out X`, holding
``adapter/`` and ``result.json``) or an adapter directory (a copy of ``X/adapter``, holding
``tunelab_adapter.json``) is an adapter named after the subdirectory. A name becomes a
path only through ``paths.safe_child`` (no ``..``, separators, absolute paths, or symlinks leading out
of ``root``) and an adapter loads only through ``methods.io.load_adapter`` (safetensors + JSON, no
pickle; demonstrations rebuilt from the run's own prepared training pool).

Adapters whose method leaves the base weights untouched (``Capabilities.changes_weights`` false:
prompt tuning, IPT, P-tuning, prefix tuning, ICL, discrete prompts) share the one frozen base model
and cost only their own tensors. LoRA adapters (a method declaring ``Capabilities.low_rank_delta`` whose
saved weights are one, no folded ``init_from``: LoRA, instruction tuning with LoRA weights) are read as
plain factors (``methods.io.load_low_rank_delta``) and run as rows of the shared batch through the slots of
``serve.lora_rows`` (``max_lora_adapters`` of them stacked at once). Other weight-changing adapters (full
fine-tuning, full-weight instruction tuning, anything trained on a folded ``init_from``) get a private copy
of the base model, so they can never leak into other rows; they are capped separately
(``max_weight_adapters``) because each copy costs a whole model.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.formatting import PromptLayout
from tunelab.methods.base import ADAPTER_META, LowRankDelta, MethodConfig, freeze, read_meta
from tunelab.methods.icl import FrozenAdapter
from tunelab.methods.io import load_adapter, load_low_rank_delta, read_checked_meta
from tunelab.paths import safe_child
from tunelab.serve.lora_rows import LoraSlots


class AdapterNotFound(TunelabError):
    """No adapter of that name in the served directory (HTTP 404)."""


@dataclass
class Served:
    """One servable model: an adapter (or the bare base model) and how its prompts are laid out."""

    name: str
    adapter: Any  # tunelab.methods.base.Adapter
    method: str
    layout: PromptLayout  # template resolved; demonstrations (ICL, IPT) drawn from the run's own pool
    shares_base: bool = True
    soft: torch.Tensor | None = None  # (n, C) soft prompt of prompt tuning / IPT / P-tuning, kept alone
    lora: LowRankDelta | None = None  # a LoRA row's factors (serve.lora_rows); adapter is then the bare base


class AdapterRegistry:
    """Adapters under ``root`` loaded on first use over one frozen base model; least recently used evicted."""

    def __init__(self, root: str | Path, model, tokenizer, model_name: str, max_loaded: int = 64,
                 max_weight_adapters: int = 2, max_lora_adapters: int = 32) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise TunelabError(f"--adapters {root} is not a directory; pass the folder holding one "
                               "subdirectory per adapter (each a RUN/adapter written by `tunelab run`)")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_loaded, self.max_weight_adapters = max(1, max_loaded), max(1, max_weight_adapters)
        freeze(model)
        model.eval()
        self.lora = LoraSlots(model, max_lora_adapters)  # hooks on the shared model; slots filled by the scheduler
        self.base = Served(model_name, FrozenAdapter(model, "base", MethodConfig()).eval(), "base",
                           PromptLayout().resolved(tokenizer))
        self._loaded: OrderedDict[str, Served] = OrderedDict()
        self._lock = threading.RLock()  # one load at a time; lookups of loaded adapters are cheap
        self.loads = 0  # adapters loaded from disk since start (for /health and tests)

    def names(self) -> list[str]:
        """Adapter names available under the root."""
        found = []
        for child in sorted(self.root.iterdir()):
            try:
                self._path(child.name)
            except TunelabError:  # not an adapter, or a symlink leading outside the root: not served
                continue
            found.append(child.name)
        return found

    def methods(self) -> dict[str, str]:
        """Adapter name -> the method that wrote it (unreadable metadata: left out)."""
        out = {}
        for name in self.names():
            try:
                out[name] = str(read_meta(self._path(name)).get("method"))
            except TunelabError:
                continue
        return out

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def get(self, name: str) -> Served:
        """The served model called ``name`` (the base model's name, or an adapter), loading it if needed."""
        if name == self.model_name:
            return self.base
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            served = self._load(self._path(name), name)
            self._loaded[name] = served
            self._evict()
            return served

    def _path(self, name: str) -> Path:
        try:
            path = safe_child(self.root, name)
        except TunelabError:
            raise AdapterNotFound(f"no adapter named {name!r}") from None
        if (path / "adapter" / ADAPTER_META).is_file():  # a run directory
            return path / "adapter"
        if not (path / ADAPTER_META).is_file():
            raise AdapterNotFound(f"no adapter named {name!r} in {self.root}; GET /v1/models lists them")
        return path

    def _load(self, path: Path, name: str) -> Served:
        method, _config, meta = read_checked_meta(path)
        delta = load_low_rank_delta(path, self.tokenizer, base_model=self.model_name)
        if delta is not None:  # a LoRA row on the shared base model
            self.loads += 1
            return Served(name, self.base.adapter, delta.method.name, delta.layout, lora=delta.delta)
        shares = not method.capabilities.changes_weights and not meta.get("folded_from")
        # weight-changing adapters are patched into a private copy, never into the shared base model
        model = self.model if shares else copy.deepcopy(self.model)
        loaded = load_adapter(path, model, self.tokenizer, base_model=self.model_name)
        adapter = loaded.adapter.eval()
        freeze(adapter)
        served = Served(name, adapter, method.name, loaded.layout, shares)
        if shares and method.capabilities.soft_prompt and not method.capabilities.prefix:
            with torch.no_grad():
                soft = adapter.soft_prompt(1)  # (1, n, C)
            # keep only the (n, C) tensor: the peft wrapper is dropped, so an adapter costs n*C floats
            served.soft, served.adapter = soft[0].detach().clone(), self.base.adapter
        self.loads += 1
        return served

    def _evict(self) -> None:
        while len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)
        while sum(not s.shares_base for s in self._loaded.values()) > self.max_weight_adapters:
            oldest = next(n for n, s in self._loaded.items() if not s.shares_base)
            del self._loaded[oldest]
