"""Saving and loading adapters: the one place that reads or writes an adapter directory.

An adapter directory holds the method's weights (safetensors, the PEFT format where peft implements
the method) and ``tunelab_adapter.json``: the method and its options, the base model, the prompt
layout (``formatting.PromptLayout.to_meta``) and the resolved config of the run that trained it.

``load_adapter`` is used by `tunelab eval`, `tunelab serve`, ``method.init_from`` and transfer. It
refuses pickles before any library parses the directory (``safety``), validates the saved options
against the method's own config, and for a method that shows demonstrations rebuilds its selector
from the saved run config through the same data preparation the run used (``run.prepare_task``:
``data.max_train``, ``skip_bad``, ``task_cap``, mixtures, the method's ``prepare_data``), so evaluation
and serving draw demonstrations from exactly the run's pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.errors import ConfigError, TunelabError
from tunelab.formatting import DemoSelector, PromptLayout
from tunelab.methods.base import (
    ADAPTER_META,
    Adapter,
    LowRankDelta,
    Method,
    MethodConfig,
    freeze,
    read_meta,
    write_meta,
)

RUN_CONFIG_KEY = "run_config"  # the resolved RunConfig of the run that trained the adapter


@dataclass
class Loaded:
    """An adapter on its base model, with the method that made it and the prompt layout it was trained with."""

    adapter: Adapter
    method: Method | None  # None: the bare base model
    config: MethodConfig
    layout: PromptLayout  # template resolved for the tokenizer, demonstrations rebuilt from the run
    meta: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None

    @property
    def method_name(self) -> str:
        return self.method.name if self.method is not None else "base"


def adapter_dir(path: str | Path, what: str = "method.init_from") -> Path:
    """Accept a run directory (holding adapter/) or the adapter directory itself; absolute, so that it can
    be recorded (``folded_from``) independently of the working directory."""
    path = Path(path).expanduser().resolve()
    if (path / "adapter" / ADAPTER_META).is_file():
        return path / "adapter"
    if (path / ADAPTER_META).is_file():
        return path
    raise ConfigError(f"{what}={str(path)!r} is not a tunelab run or adapter directory "
                      f"(no {ADAPTER_META}); pass the --out DIR of an earlier `tunelab run`")


def save_adapter(adapter: Adapter, directory: Path, base_model: str, layout: PromptLayout,
                 run_config: dict[str, Any] | None = None) -> None:
    """Write ``adapter``'s weights and metadata into ``directory`` (which the caller makes atomic)."""
    from tunelab import envinfo

    adapter.save_weights(directory)
    extra: dict[str, Any] = {"base_model": base_model, **layout.to_meta(),
                             "tunelab_version": envinfo.versions()["tunelab"]}
    if run_config is not None:
        extra[RUN_CONFIG_KEY] = run_config
    write_meta(directory, adapter, extra)


def read_checked_meta(directory: Path) -> tuple[Method, MethodConfig, dict[str, Any]]:
    """Refuse pickles, read the metadata and validate the method options (nothing parsed before the check)."""
    from tunelab.methods import method_config
    from tunelab.safety import check_adapter_dir

    check_adapter_dir(directory, needs_weights=False)
    meta = read_meta(directory)
    if not isinstance(meta.get("method"), str) or not isinstance(meta.get("config", {}), dict):
        raise TunelabError(f"{directory / ADAPTER_META}: needs a 'method' name and a 'config' mapping")
    method, config = method_config({**meta.get("config", {}), "name": meta["method"]})
    if method.trains:
        check_adapter_dir(directory)  # a trained method must bring safetensors weights
    return method, config, meta


def load_adapter(directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 base_model: str | None = None) -> Loaded:
    """Load a tunelab adapter directory onto ``model``.

    With ``base_model``, refuse an adapter trained on another base model. With ``tokenizer``, resolve the
    saved layout and rebuild the demonstrations of a method that shows them; without it (``init_from``),
    only the weights are loaded.
    """
    directory = Path(directory)
    method, config, meta = read_checked_meta(directory)
    check_base_model(directory, meta, base_model)
    adapter = method.load(directory, model, config)
    layout = PromptLayout.from_meta(meta)
    if tokenizer is not None:
        layout = saved_layout(directory, method, config, meta, tokenizer)
    return Loaded(adapter, method, config, layout, meta, directory)


@dataclass
class LoadedDelta:
    """A low-rank adapter read as plain tensors (no model patched), with its method and prompt layout."""

    delta: LowRankDelta
    method: Method
    layout: PromptLayout


def load_low_rank_delta(directory: str | Path, tokenizer: PreTrainedTokenizerBase,
                        base_model: str | None = None) -> LoadedDelta | None:
    """The adapter in ``directory`` as a ``LowRankDelta`` when its method declares
    ``Capabilities.low_rank_delta`` and it was not trained on a folded ``init_from`` (whose folded weights
    are not a low-rank delta of the base model); None otherwise. The same checks as ``load_adapter``."""
    directory = Path(directory)
    method, config, meta = read_checked_meta(directory)
    if not method.capabilities.low_rank_delta or meta.get("folded_from"):
        return None
    check_base_model(directory, meta, base_model)
    delta = method.low_rank_delta(directory, config)
    if delta is None:
        return None
    return LoadedDelta(delta, method, saved_layout(directory, method, config, meta, tokenizer))


def check_base_model(directory: Path, meta: dict[str, Any], base_model: str | None) -> None:
    """Refuse an adapter trained on another base model than ``base_model`` (None: no check)."""
    from tunelab.models import portable_name, resolve_base_model

    saved_base = resolve_base_model(meta.get("base_model"))  # the adapter's portable name -> this machine's copy
    if base_model is not None and saved_base is not None and saved_base != portable_name(base_model):
        raise TunelabError(f"adapter {directory} was trained on {saved_base!r}, not {base_model!r}; "
                           f"load it with --model {saved_base}")


def saved_layout(directory: Path, method: Method, config: MethodConfig, meta: dict[str, Any],
                 tokenizer: PreTrainedTokenizerBase) -> PromptLayout:
    """The adapter's prompt layout resolved for ``tokenizer``, its demonstrations rebuilt from its run."""
    demos = run_demonstrations(directory, method, config, meta) if method.capabilities.demonstrations else None
    return PromptLayout.from_meta(meta, demos).resolved(tokenizer)


def load_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: PromptLayout | None = None) -> Loaded:
    """The bare base model, frozen, seen as an adapter that adds nothing."""
    from tunelab.methods.icl import FrozenAdapter

    freeze(model)
    return Loaded(FrozenAdapter(model, "base", MethodConfig()), None, MethodConfig(),
                  (layout or PromptLayout()).resolved(tokenizer))


def run_config(directory: Path, meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The resolved config of the run that trained the adapter in ``directory``: saved in its metadata, or
    (adapters written before it was) in RUN/result.json beside ``directory``."""
    meta = read_meta(directory) if meta is None else meta
    if isinstance(meta.get(RUN_CONFIG_KEY), dict):
        return meta[RUN_CONFIG_KEY]
    result = Path(directory).parent / "result.json"
    if result.is_file():
        return json.loads(result.read_text()).get("config")
    return None


def run_demonstrations(directory: Path, method: Method, config: MethodConfig,
                       meta: dict[str, Any]) -> DemoSelector | None:
    """The demonstration selector of the run that trained the adapter: its training pool, prepared as the
    run prepared it, and its seed."""
    from tunelab.config import RunConfig, from_dict
    from tunelab.run import prepare_task

    saved = run_config(directory, meta)
    if saved is None:
        raise TunelabError(f"{directory}: a {method.name} adapter shows demonstrations drawn from its run's training "
                           f"data, recorded in {ADAPTER_META} ({RUN_CONFIG_KEY}) or the run's result.json; pass the "
                           "adapter/ of a `tunelab run --out X` (or copy X/result.json beside it)")
    cfg = from_dict(RunConfig, {k: v for k, v in saved.items() if k != "out"})
    task = prepare_task(cfg, method, config)
    return method.demonstrations(config, task.train, cfg.train.seed)
