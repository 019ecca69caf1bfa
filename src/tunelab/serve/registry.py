"""The adapter directory behind `tunelab serve`: names -> loaded adapters, lazily, with an LRU cap.

Every subdirectory of ``root`` that is a run directory (``X`` of `tunelab run --out X`, holding
``adapter/`` and ``result.json``) or an adapter directory (a copy of ``X/adapter``, holding
``tunelab_adapter.json``) is an adapter named after the subdirectory. A name becomes a
path only through ``paths.safe_child`` (no ``..``, separators, absolute paths, or symlinks leading out
of ``root``) and an adapter loads only through ``safety.load_adapter`` (safetensors + JSON, no pickle).

Prompt-learning adapters (prompt tuning, IPT, P-tuning, prefix tuning) and prompt-only ones (ICL,
discrete prompt) leave the base weights untouched, so they all share the one frozen base model and
cost only their own tensors. Methods that change weights (LoRA, full fine-tuning, instruction tuning,
or any adapter trained on a folded ``init_from``) get a private copy of the base model, so they can
never leak into other rows; they are capped separately (``max_weight_adapters``) because each copy
costs a whole model.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.methods.base import ADAPTER_META, MethodConfig, freeze, read_meta
from tunelab.methods.icl import FrozenAdapter
from tunelab.paths import safe_child

# Methods whose adapters only add inputs (soft prompt, prefix key/values, demonstrations, an instruction).
SHARES_BASE = frozenset({"prompt_tuning", "ipt", "p_tuning", "prefix_tuning", "icl", "discrete_prompt"})
DEMO_METHODS = frozenset({"icl", "ipt"})  # methods that show retrieved demonstrations with each input


class AdapterNotFound(TunelabError):
    """No adapter of that name in the served directory (HTTP 404)."""


@dataclass
class Served:
    """One servable model: an adapter (or the bare base model) and how its prompts are laid out."""

    name: str
    adapter: Any  # tunelab.methods.base.Adapter
    method: str
    template: str  # resolved: chat | alpaca | plain
    system_prompt: str | None
    demos: Any = None  # DemoSelector for ICL / IPT, drawn from the run's training split as in `tunelab eval`
    shares_base: bool = True
    soft: torch.Tensor | None = None  # (n, C) soft prompt of prompt tuning / IPT / P-tuning, kept alone


class AdapterRegistry:
    """Adapters under ``root`` loaded on first use over one frozen base model; least recently used evicted."""

    def __init__(self, root: str | Path, model, tokenizer, model_name: str, max_loaded: int = 64,
                 max_weight_adapters: int = 2) -> None:
        from tunelab.formatting import resolve_template

        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise TunelabError(f"--adapters {root} is not a directory; pass the folder holding one "
                               "subdirectory per adapter (each a RUN/adapter written by `tunelab run`)")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_loaded, self.max_weight_adapters = max(1, max_loaded), max(1, max_weight_adapters)
        freeze(model)
        model.eval()
        self.base = Served(model_name, FrozenAdapter(model, "base", MethodConfig()).eval(), "base",
                           resolve_template("auto", tokenizer), None)
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
        from tunelab.formatting import resolve_template
        from tunelab.safety import load_adapter

        meta = read_meta(path)
        shares = meta.get("method") in SHARES_BASE and not meta.get("folded_from")
        # weight-changing adapters are patched into a private copy, never into the shared base model
        model = self.model if shares else copy.deepcopy(self.model)
        adapter = load_adapter(path, model, base_model=self.model_name).eval()
        freeze(adapter)
        served = Served(name, adapter, str(meta["method"]),
                        resolve_template(meta.get("template") or "auto", self.tokenizer), meta.get("system_prompt"),
                        run_demonstrations(safe_child(self.root, name), meta), shares)
        if shares:
            with torch.no_grad():
                soft, prefix = adapter.soft_prompt(1), adapter.prefix_cache(1)  # (1, n, C), cache
            if soft is not None and prefix is None:
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


def run_demonstrations(home: Path, meta: dict[str, Any]):
    """The demonstration selector of an ICL / IPT adapter, rebuilt from its run as `tunelab eval` does
    (``protocols.load_for_eval``): the train split and seed recorded in the run's result.json, which
    is ``home/result.json`` both for a run directory and for a copied adapter."""
    from tunelab.data import load_task
    from tunelab.methods import method_config

    method, cfg = method_config({"name": meta["method"], **meta.get("config", {})})
    if meta["method"] not in DEMO_METHODS:
        return None
    result = home / "result.json"  # NAME/result.json in both layouts
    if not result.is_file():
        raise TunelabError(f"{home}: a {meta['method']} adapter shows demonstrations drawn from its run's training "
                           "data, recorded in the run's result.json; serve the whole run directory "
                           "(`tunelab run --out X` -> ADAPTERS/NAME = X) or copy X/result.json into it")
    run_cfg = json.loads(result.read_text()).get("config", {})
    data = run_cfg.get("data", {})
    train = load_task(data.get("task"), data.get("train"), data.get("eval")).train
    return method.demonstrations(cfg, train, run_cfg.get("train", {}).get("seed", 0))
