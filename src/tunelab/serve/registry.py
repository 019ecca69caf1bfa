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

Each adapter is checked when it is first seen (``methods.io.check_adapter``: pickles, metadata, options, the
base model it names, readable weight files, weight sizes against the served model), at start-up for those
present then. One that fails is left out of ``names()`` (so of ``/v1/models``) and answers 404, and the
reason is logged once, as one line (a changed directory is checked again). Messages that reach clients
name the adapter, never a server path.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.formatting import PromptLayout
from tunelab.methods.base import ADAPTER_META, LowRankDelta, MethodConfig, freeze
from tunelab.methods.icl import FrozenAdapter
from tunelab.methods.io import TaskPrompt, check_adapter, load_adapter, load_low_rank_delta, read_checked_meta
from tunelab.paths import safe_child
from tunelab.precision import weights_lock
from tunelab.serve.lora_rows import LoraSlots

log = logging.getLogger(__name__)


class AdapterNotFound(TunelabError):
    """No adapter of that name in the served directory, or one that failed its checks (HTTP 404)."""


class AdapterUnsupported(AdapterNotFound):
    """An adapter the server's engine cannot run (``--engine vllm``: prefix tuning, full weights); its message
    says why and names no server path (HTTP 400)."""


@dataclass(frozen=True)
class Checked:
    """The outcome of ``check_adapter`` for one adapter directory in one state (``stamp``)."""

    stamp: tuple[int, int]  # mtimes of the directory and its metadata: a change means check again
    method: str | None  # None: refused
    reason: str = ""  # why it was refused (for the server log: may name server paths)
    unsupported: bool = False  # refused by the engine, not broken: ``reason`` names no path and goes to clients


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
    task: TaskPrompt | None = None  # the instruction (and options) of its task; None: not recorded
    path: Path | None = None  # a LoRA row's adapter directory (PEFT files: what vLLM loads, serve.vllm_scheduler)


class AdapterRegistry:
    """Adapters under ``root`` loaded on first use over one frozen base model; least recently used evicted."""

    def __init__(self, root: str | Path, model, tokenizer, model_name: str, max_loaded: int = 64,
                 max_weight_adapters: int = 2, max_lora_adapters: int = 32, engine: str = "tunelab") -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise TunelabError(f"--adapters {root} is not a directory; pass the folder holding one "
                               "subdirectory per adapter (each a RUN/adapter written by `tunelab run`)")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.engine = engine  # tunelab | vllm (choices.ENGINES): adapters vLLM cannot run are left out
        self.max_loaded, self.max_weight_adapters = max(1, max_loaded), max(1, max_weight_adapters)
        freeze(model)
        model.eval()
        self.lora = LoraSlots(model, max_lora_adapters)  # hooks on the shared model; slots filled by the scheduler
        self.base = Served(model_name, FrozenAdapter(model, "base", MethodConfig()).eval(), "base",
                           PromptLayout().resolved(tokenizer))
        self._loaded: OrderedDict[str, Served] = OrderedDict()
        self._checked: dict[str, Checked] = {}
        self._lock = threading.RLock()  # one load at a time; lookups of loaded adapters are cheap
        self.loads = 0  # adapters loaded from disk since start (for /health and tests)

    def names(self) -> list[str]:
        """Adapter names served from the root (those that passed their checks)."""
        return list(self.methods())

    def methods(self) -> dict[str, str]:
        """Adapter name -> the method that wrote it, for every adapter under the root that passed its checks."""
        out = {}
        for child in sorted(self.root.iterdir()):
            try:
                out[child.name] = self._check(child.name)
            except TunelabError:  # not an adapter, a symlink leading outside the root, or refused
                continue
        return out

    def refused(self) -> dict[str, str]:
        """Adapter name -> why it is not served (for the server log and tests)."""
        with self._lock:
            return {name: c.reason for name, c in self._checked.items() if c.method is None}

    def unbatched(self) -> list[str]:
        """Adapters that run on a private model copy, in batches of their own: they change weights and are not a
        low-rank delta the shared batch applies per row (by their capabilities; `tunelab serve` says so at start)."""
        out = []
        for name in self.names():
            try:
                method, config, meta = read_checked_meta(self._path(name))
            except TunelabError:
                continue
            caps = method.capabilities_for(config)
            if caps.changes_weights and (not caps.low_rank_delta or meta.get("folded_from")):
                out.append(name)
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
            self._check(name)
            try:
                served = self._load(self._path(name), name)
            except TunelabError as exc:  # broken in a way the checks could not see: not served from now on
                self._refuse(name, self._checked[name].stamp, str(exc))
                raise AdapterNotFound(self._not_served(name)) from None
            self._loaded[name] = served
            self._evict()
            return served

    def _path(self, name: str) -> Path:
        missing = AdapterNotFound(f"no model named {name!r}; GET /v1/models lists them")
        try:
            path = safe_child(self.root, name)
            if (path / "adapter" / ADAPTER_META).is_file():  # a run directory
                return path / "adapter"
            if (path / ADAPTER_META).is_file():
                return path
        except (TunelabError, OSError, ValueError):  # escapes the root, too long a name, a NUL byte
            raise missing from None
        raise missing

    def _check(self, name: str) -> str:
        """The method of adapter ``name`` once it passed ``check_adapter`` (checked once per state of its
        directory); AdapterNotFound when there is none, or it failed (the reason logged the first time)."""
        path = self._path(name)
        try:
            stamp = (path.stat().st_mtime_ns, (path / ADAPTER_META).stat().st_mtime_ns)
        except OSError:
            raise AdapterNotFound(f"no model named {name!r}; GET /v1/models lists them") from None
        with self._lock:
            known = self._checked.get(name)
            if known is None or known.stamp != stamp:
                try:
                    method, config, meta = check_adapter(path, self.model, self.model_name)
                    why = self._engine_refusal(path, method, config, meta)
                    known = self._refuse(name, stamp, why, unsupported=True) if why else \
                        Checked(stamp, method.name)
                    self._checked[name] = known
                except TunelabError as exc:
                    known = self._refuse(name, stamp, str(exc))
            if known.unsupported:
                raise AdapterUnsupported(f"model {name!r} is not served with engine {self.engine}: {known.reason}")
            if known.method is None:
                raise AdapterNotFound(self._not_served(name))
            return known.method

    def _engine_refusal(self, path: Path, method, config: MethodConfig, meta: dict) -> str | None:
        """Why this server's engine cannot run the adapter (``inference.vllm_support``), or None."""
        if self.engine != "vllm":
            return None
        from tunelab.inference.vllm_support import adapter_refusal

        return adapter_refusal(path, method, config, meta)

    def lora_deltas(self) -> Iterator[tuple[str, LowRankDelta]]:
        """(name, factors) of each LoRA adapter served as rows of the shared batch, read from its files one at a
        time (vLLM sizes its LoRA slots by their ranks and modules)."""
        for name in self.names():
            path = self._path(name)
            method, config, meta = read_checked_meta(path)
            if method.capabilities_for(config).low_rank_delta and not meta.get("folded_from"):
                delta = method.low_rank_delta(path, config)
                if delta is not None:
                    yield name, delta

    def _refuse(self, name: str, stamp: tuple[int, int], reason: str, unsupported: bool = False) -> Checked:
        log.warning("not serving adapter %r%s: %s", name, f" (engine {self.engine})" if unsupported else "", reason)
        self._checked[name] = Checked(stamp, None, reason, unsupported)
        self._loaded.pop(name, None)
        return self._checked[name]

    @staticmethod
    def _not_served(name: str) -> str:
        return f"model {name!r} is not served: its adapter failed the server's checks (the server log says why)"

    def _load(self, path: Path, name: str) -> Served:
        method, config, meta = read_checked_meta(path)  # load_* below run every check
        caps = method.capabilities_for(config)  # the generic peft method's depend on its peft_type
        delta = load_low_rank_delta(path, self.tokenizer, base_model=self.model_name)
        if delta is not None:  # a LoRA row on the shared base model
            self.loads += 1
            return Served(name, self.base.adapter, delta.method.name, delta.layout, lora=delta.delta,
                          task=delta.task, path=path)
        shares = not caps.changes_weights and not meta.get("folded_from")
        # weight-changing adapters are patched into a private copy, never into the shared base model
        if shares:
            model = self.model
        else:  # not while the scheduler runs the base model on its swapped bf16 copy (engine.Batch per phase)
            with weights_lock(self.model):
                model = copy.deepcopy(self.model)
        loaded = load_adapter(path, model, self.tokenizer, base_model=self.model_name)
        adapter = loaded.adapter.eval()
        freeze(adapter)
        served = Served(name, adapter, method.name, loaded.layout, shares, task=loaded.task)
        if shares and caps.soft_prompt and not caps.prefix:
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
