"""Playground data: one prompt to several adapters (and the base model) through the serving path.

An ``AdapterRegistry`` over the chosen directory loads adapters as `tunelab serve` does; each
prompt is laid out with ``serve.prompts.completion_prompt`` (the adapter's template, system prompt,
rewrite and demonstrations) and all rows go to ``serve.batcher.run_group`` with the registry's LoRA
slots, i.e. one ``generate.generate_rows`` call (LoRA rows per adapter, in its slot), so the board shows
exactly what the server would answer. The folder, every adapter in it and a base model given as a local
path must lie under the runs folder (``board.confine``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from tunelab.board import confine
from tunelab.board.stores import BOARD_DIR
from tunelab.errors import TunelabError
from tunelab.methods.base import ADAPTER_META

BASE = "(base model)"
_LOCK = threading.Lock()  # one generation at a time: the registry's models are shared


@dataclass(frozen=True)
class Candidate:
    name: str  # subdirectory name under the adapters folder
    label: str  # name · method · task · seed, for the picker


def adapter_dirs(runs: str | Path) -> list[str]:
    """Folders under ``runs`` holding at least one servable adapter (e.g. a grid's ``cells/``), relative."""
    root = Path(runs)
    if not root.is_dir():
        return []
    found = set()
    for meta in root.rglob(ADAPTER_META):
        if not meta.resolve().is_relative_to(root.resolve()):  # through a symlink leading out: not listed
            continue
        adapter = meta.parent  # RUN/adapter/ or a copied adapter folder
        home = adapter.parent if adapter.name == "adapter" else adapter
        if home != root and BOARD_DIR not in home.relative_to(root).parts:
            found.add(home.parent)
    return sorted(str(p.relative_to(root)) if p != root else "." for p in found)


def folder_of(runs: str | Path, name: str) -> Path:
    """The adapters folder ``name`` (relative to ``runs``, as ``adapter_dirs`` lists it); refused outside ``runs``."""
    path = confine.inside(runs, Path(runs) / name, "adapters folder")
    if not path.is_dir():
        raise TunelabError(f"adapters folder {name!r} is not a folder under {runs}; pick one from the list")
    return path


def candidates(folder: str | Path) -> list[Candidate]:
    """The adapters in ``folder`` as the server names them, labelled with their method, task and seed
    (a symlink leading out of ``folder`` is skipped, as the server skips it)."""
    out = []
    for child in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        try:
            confine.child(folder, child.name, "adapter")
        except TunelabError:
            continue
        meta_path = child / "adapter" / ADAPTER_META if (child / "adapter").is_dir() else child / ADAPTER_META
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        label = [child.name, str(meta.get("method", "?"))]
        result = child / "result.json"
        if result.is_file():
            cfg = json.loads(result.read_text()).get("config", {})
            label += [str(cfg.get("data", {}).get("task", "")), f"seed {cfg.get('train', {}).get('seed', 0)}"]
        out.append(Candidate(child.name, " · ".join(label)))
    return out


def base_model_of(folder: str | Path) -> str | None:
    """The base model the adapters in ``folder`` were trained on (from the first one's metadata)."""
    for c in candidates(folder):
        child = Path(folder) / c.name
        meta = child / "adapter" / ADAPTER_META if (child / "adapter").is_dir() else child / ADAPTER_META
        return json.loads(meta.read_text()).get("base_model")
    return None


class Playground:
    """Registries per (folder, base model), each over one loaded base model, kept for the board's lifetime;
    folders and local base models only under ``runs``."""

    def __init__(self, runs: str | Path) -> None:
        self.runs = Path(runs)
        self._models: dict[str, tuple[object, object]] = {}
        self._registries: dict[tuple[str, str], object] = {}

    def registry(self, folder: str | Path, model_name: str):
        from tunelab.models import load_model
        from tunelab.serve.registry import AdapterRegistry

        key = (str(Path(folder).resolve()), model_name)
        if key not in self._registries:
            if model_name not in self._models:
                self._models[model_name] = load_model(model_name)
            model, tokenizer = self._models[model_name]
            self._registries[key] = AdapterRegistry(folder, model, tokenizer, model_name)
        return self._registries[key]

    def complete(self, folder: str | Path, model_name: str, names: list[str], text: str, instruction: str = "",
                 max_tokens: int = 32) -> list[tuple[str, str, str]]:
        """(name, method, completion) for each chosen adapter (``BASE`` = the bare base model), greedy."""
        from tunelab.generate import GenerationConfig
        from tunelab.serve.batcher import HotPrompts, Job, run_group
        from tunelab.serve.prompts import completion_prompt

        if not names:
            raise TunelabError("choose at least one adapter (or the base model)")
        if not text.strip() and not instruction.strip():
            raise TunelabError("type a prompt (an input, an instruction, or both)")
        folder = confine.inside(self.runs, folder, "adapters folder")
        model_name = confine.model_source(self.runs, model_name, "base model")
        with _LOCK:
            registry = self.registry(folder, model_name)
            tokenizer = registry.tokenizer
            cfg = GenerationConfig(max_new_tokens=int(max_tokens))
            jobs = []
            for name in names:
                served = registry.get(model_name if name == BASE else name)
                prompt = completion_prompt(served, tokenizer, text, instruction or None, raw=False)
                jobs.append(Job(served, tokenizer(prompt, add_special_tokens=False)["input_ids"], cfg))
            texts = run_group(jobs, tokenizer, HotPrompts(0), registry.lora)  # LoRA rows take the registry's slots
        return [(name, job.served.method, out) for name, job, out in zip(names, jobs, texts, strict=True)]
