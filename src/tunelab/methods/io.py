"""Saving and loading adapters: the one place that reads or writes an adapter directory.

An adapter directory holds the method's weights (safetensors, the PEFT format where peft implements
the method) and ``tunelab_adapter.json``: the method and its options, the base model, the prompt
layout (``formatting.PromptLayout.to_meta``), the instruction and options every example of its task
shared (``TaskPrompt``, so a server lays out a bare input as training did) and the resolved config of
the run that trained it. Older directories without a key load with that key's default.

``check_adapter`` does every check that needs no weights loaded (pickles, metadata, options, base
model, readable safetensors headers and PEFT config, weight shapes against the model) and raises one
``ModelError`` line naming the file and the problem; `tunelab serve` runs it on every adapter at start-up.
A local directory is never looked up on the hub: the PEFT files are checked before peft opens them.

``load_adapter`` is used by `tunelab eval`, `tunelab serve`, ``method.init_from`` and transfer. It
refuses pickles before any library parses the directory (``safety``), validates the saved options
against the method's own config, and for a method that shows demonstrations rebuilds its selector
from the saved run config through the same data preparation the run used (``data.prepare.prepare_task``:
``data.max_train``, ``skip_bad``, ``task_cap``, mixtures, the method's ``prepare_data``), so evaluation
and serving draw demonstrations from exactly the run's pool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.data.example import Example
from tunelab.data.prepare import prepare_task
from tunelab.errors import ConfigError, ModelError, TunelabError
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
from tunelab.methods.transfer import Source, source_of
from tunelab.sections import DataConfig, TrainConfig
from tunelab.validation import from_dict

RUN_CONFIG_KEY = "run_config"  # the resolved RunConfig of the run that trained the adapter
TASK_PROMPT_KEY = "task_prompt"  # TaskPrompt.to_meta()
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names
# what a load of broken weights raises (torch size mismatch, peft, safetensors, missing keys)
LOAD_ERRORS = (RuntimeError, ValueError, OSError, KeyError, SafetensorError)


@dataclass(frozen=True)
class TaskPrompt:
    """What every example of the adapter's task showed before its input: the instruction and the options.

    >>> TaskPrompt.shared_by([Example("1", "t", "Add.", "2+2"), Example("2", "t", "Add.", "3+1")])
    TaskPrompt(instruction='Add.', options=())
    >>> TaskPrompt.shared_by([Example("1", "t", "Add.", "2+2"), Example("2", "t", "Sub.", "3-1")]) is None
    True
    """

    instruction: str = ""
    options: tuple[str, ...] = ()

    @classmethod
    def shared_by(cls, examples: Sequence[Example]) -> TaskPrompt | None:
        """The instruction and options all ``examples`` share (None: they differ, or are conversations)."""
        found = {(e.instruction, tuple(e.options)) for e in examples}
        if len(found) != 1 or any(e.messages for e in examples):
            return None
        instruction, options = found.pop()
        return cls(instruction, options)

    def to_meta(self) -> dict[str, Any]:
        return {TASK_PROMPT_KEY: {"instruction": self.instruction, "options": list(self.options)}}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TaskPrompt | None:
        """The saved task prompt; None for adapters saved without one (or with a malformed one)."""
        saved = meta.get(TASK_PROMPT_KEY)
        if not isinstance(saved, dict) or not isinstance(saved.get("instruction", ""), str):
            return None
        options = saved.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            return None
        return cls(saved.get("instruction", ""), tuple(options))


@dataclass
class Loaded:
    """An adapter on its base model, with the method that made it and the prompt layout it was trained with."""

    adapter: Adapter
    method: Method | None  # None: the bare base model
    config: MethodConfig
    layout: PromptLayout  # template resolved for the tokenizer, demonstrations rebuilt from the run
    meta: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None
    task: TaskPrompt | None = None  # the instruction and options its task's examples shared

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
                 run_config: dict[str, Any] | None = None, task: TaskPrompt | None = None) -> None:
    """Write ``adapter``'s weights and metadata into ``directory`` (which the caller makes atomic)."""
    from tunelab import envinfo

    adapter.save_weights(directory)
    extra: dict[str, Any] = {"base_model": base_model, **layout.to_meta(), **(task.to_meta() if task else {}),
                             "tunelab_version": envinfo.versions()["tunelab"]}
    if run_config is not None:
        extra[RUN_CONFIG_KEY] = run_config
    write_meta(directory, adapter, extra)


def read_checked_meta(directory: Path) -> tuple[Method, MethodConfig, dict[str, Any]]:
    """Refuse pickles, read the metadata and validate the method options (nothing parsed before the check)."""
    from tunelab.methods import method_config
    from tunelab.safety import check_adapter_dir

    check_adapter_dir(directory, needs_weights=False)
    try:
        meta = read_meta(directory)
    except (UnicodeDecodeError, RecursionError, OSError) as exc:
        raise ModelError(f"{directory / ADAPTER_META}: unreadable ({type(exc).__name__}); "
                         "rewrite it as the JSON `tunelab run` saves") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str) \
            or not isinstance(meta.get("config", {}), dict):
        raise ModelError(f"{directory / ADAPTER_META}: needs a 'method' name and a 'config' mapping")
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
    directory = Path(directory).resolve()  # a relative name never reaches peft, which would try the hub
    method, config, meta = check_adapter(directory, model, base_model)
    folded = meta.get("folded_from")
    try:
        if folded and not method.capabilities_for(config).whole_model:  # trained on base + that run: fold it again
            source = start_from(folded, model)
            assert source is not None
            model = source.model
        adapter = method.load(directory, model, config)
    except LOAD_ERRORS as exc:
        raise ModelError(f"{directory}: cannot load the {method.name} weights ({_first_line(exc)})") from None
    layout = PromptLayout.from_meta(meta)
    if tokenizer is not None:
        layout = saved_layout(directory, method, config, meta, tokenizer)
    return Loaded(adapter, method, config, layout, meta, directory, TaskPrompt.from_meta(meta))


def start_from(init_from: str | None, model: PreTrainedModel) -> Source | None:
    """The run ``init_from`` names, loaded onto ``model`` as what a method starts from (``methods.transfer``):
    pickles refused, options validated, as every load; None when nothing is named."""
    if not init_from:
        return None
    directory = adapter_dir(init_from)
    loaded = load_adapter(directory, model)
    assert loaded.method is not None
    return source_of(directory, loaded.method.name, loaded.method.capabilities_for(loaded.config), loaded.adapter,
                     model)


def build_adapter(method: Method, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MethodConfig,
                  train: Sequence[Example], seed: int) -> Adapter:
    """``method.build`` with ``config.init_from`` loaded first and passed as its ``source``; a folded source is
    recorded on the adapter (``folded_from``, saved in its metadata) so that loading folds it in again."""
    source = start_from(config.init_from, model)
    adapter = method.build(model, tokenizer, config, train, seed, source)
    adapter.folded_from = source.folded_from if source is not None else None
    return adapter


def check_adapter(directory: str | Path, model: PreTrainedModel | None = None,
                  base_model: str | None = None) -> tuple[Method, MethodConfig, dict[str, Any]]:
    """Every check that needs no weights loaded (see the module docstring); the method, options and metadata."""
    directory = Path(directory)
    method, config, meta = read_checked_meta(directory)
    check_base_model(directory, meta, base_model)
    peft = check_weight_files(directory)
    if model is not None and peft is not None:
        check_fits(directory, peft, meta, model, method.capabilities_for(config).soft_prompt)
    return method, config, meta


def check_weight_files(directory: Path) -> dict[str, Any] | None:
    """Every safetensors header readable, and peft's config and weights both present and readable (so peft
    never falls back to the hub for a missing file); the parsed PEFT config, None without one."""
    for path in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({_first_line(exc)}); "
                             "it may be truncated: copy or train the adapter again") from None
    config, weights = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not config.is_file():
        if weights.is_file():
            raise ModelError(f"{directory}: holds {PEFT_WEIGHTS} but no {PEFT_CONFIG}; copy the whole adapter "
                             "directory `tunelab run` wrote")
        return None
    if not weights.is_file():
        raise ModelError(f"{directory}: holds {PEFT_CONFIG} but no {PEFT_WEIGHTS}; copy the whole adapter "
                         "directory `tunelab run` wrote")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelError(f"{config}: not valid JSON ({_first_line(exc)}); copy the adapter again") from None
    if not isinstance(parsed, dict):
        raise ModelError(f"{config}: expected a JSON object (peft's adapter config)")
    return parsed


def check_fits(directory: Path, peft: dict[str, Any], meta: dict[str, Any], model: PreTrainedModel,
               soft_prompt: bool) -> None:
    """Refuse a PEFT adapter whose recorded sizes are not ``model``'s (``num_layers``; ``token_dim``, the
    embedding width, for a soft prompt: a prefix's is its key/value width): its metadata names the wrong
    base model, and the mismatch would otherwise surface as a shape error in the first forward pass."""
    embedding: Any = model.get_input_embeddings()
    have = {"token_dim": int(embedding.weight.shape[-1]) if soft_prompt else None,
            "num_layers": getattr(model.config, "num_hidden_layers", None)}
    for key, size in have.items():
        saved = peft.get(key)
        if size is not None and isinstance(saved, int) and saved != size:
            trained_on = peft.get("base_model_name_or_path")
            on = f" (trained on {trained_on!r})" if trained_on else ""
            raise ModelError(
                f"{directory / PEFT_CONFIG}: the weights have {key}={saved}{on} but the base model loaded "
                f"({meta.get('base_model')!r} per {ADAPTER_META}) has {key}={size}; set base_model in "
                f"{ADAPTER_META} to the model it was trained on")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class LoadedDelta:
    """A low-rank adapter read as plain tensors (no model patched), with its method and prompt layout."""

    delta: LowRankDelta
    method: Method
    layout: PromptLayout
    task: TaskPrompt | None = None


def load_low_rank_delta(directory: str | Path, tokenizer: PreTrainedTokenizerBase,
                        base_model: str | None = None) -> LoadedDelta | None:
    """The adapter in ``directory`` as a ``LowRankDelta`` when its method declares
    ``Capabilities.low_rank_delta`` and it was not trained on a folded ``init_from`` (whose folded weights
    are not a low-rank delta of the base model); None otherwise. The same checks as ``load_adapter``."""
    directory = Path(directory).resolve()
    method, config, meta = check_adapter(directory, base_model=base_model)
    if not method.capabilities.low_rank_delta or meta.get("folded_from"):
        return None
    try:
        delta = method.low_rank_delta(directory, config)
    except LOAD_ERRORS as exc:
        raise ModelError(f"{directory}: cannot load the {method.name} weights ({_first_line(exc)})") from None
    if delta is None:
        return None
    return LoadedDelta(delta, method, saved_layout(directory, method, config, meta, tokenizer),
                       TaskPrompt.from_meta(meta))


def check_base_model(directory: Path, meta: dict[str, Any], base_model: str | None) -> None:
    """Refuse an adapter trained on another base model than ``base_model`` (None: no check)."""
    from tunelab.models import portable_name, resolve_base_model

    saved_base = resolve_base_model(meta.get("base_model"))  # the adapter's portable name -> this machine's copy
    if base_model is not None and saved_base is not None and saved_base != portable_name(base_model):
        raise ModelError(f"adapter {directory} was trained on {saved_base!r}, not {base_model!r}; "
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
    saved = run_config(directory, meta)
    if saved is None:
        raise TunelabError(f"{directory}: a {method.name} adapter shows demonstrations drawn from its run's training "
                           f"data, recorded in {ADAPTER_META} ({RUN_CONFIG_KEY}) or the run's result.json; pass the "
                           "adapter/ of a `tunelab run --out X` (or copy X/result.json beside it)")
    data = from_dict(DataConfig, saved.get("data", {}), "data")
    seed = from_dict(TrainConfig, saved.get("train", {}), "train").seed
    return method.demonstrations(config, prepare_task(data, seed, method, config).train, seed)
