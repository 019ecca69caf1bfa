"""Typed configuration for every command: defaults < YAML file < dotted overrides (``train.lr=1e-3``) < flags.

Every section is a dataclass; unknown keys are errors that name the key's full path, and every field
declares its allowed values (``tunelab.validation``: ``at_least``, ``choice``, ...), checked when the
config is built, so a bad value stops the command with one line before any model loads:
``train.batch_size: got 0, expected an integer >= 1``.

``RunConfig.method`` is the method's own config dataclass (``tunelab.methods``), resolved from
``{name: ipt, k: 2}`` (or just ``ipt``) when the config is built. ``EvalCommandConfig`` (`tunelab eval`)
and ``ServeConfig`` (`tunelab serve`) are built the same way (``build``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tunelab.choices import ENGINES, PRECISIONS, PROTOCOLS, SCHEDULERS
from tunelab.errors import ConfigError
from tunelab.formatting import TEMPLATES
from tunelab.methods import DEFAULT_METHOD, method_config
from tunelab.methods.base import MethodConfig
from tunelab.metrics import METRICS
from tunelab.sections import (
    DEVICES,
    TRACKERS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ReportConfig,
    TrainConfig,
    non_empty,
)
from tunelab.validation import (
    at_least,
    between,
    built_by,
    choice,
    each_of,
    from_dict,
    not_a_section,
    satisfying,
)

# re-exported: the sections and the method config base are imported from here by most of the tree
__all__ = ["DEFAULT_METHOD", "DEVICES", "TRACKERS", "DataConfig", "EvalCommandConfig", "EvalConfig", "MethodConfig",
           "ModelConfig", "ReportConfig", "RunConfig", "ServeConfig", "TrainConfig", "apply_overrides", "build",
           "build_config", "from_dict", "load_yaml", "parse_override", "to_dict"]


def _default_method() -> MethodConfig:
    return method_config({"name": DEFAULT_METHOD})[1]


def _method(value: Any, path: str) -> MethodConfig:
    """A method's own config from ``{"name": ..., **options}`` or a bare name."""
    if isinstance(value, MethodConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: got {value!r}, expected a method name or a mapping like {{name: icl, k: 2}}")
    return method_config(value, path)[1]


@dataclass
class RunConfig:
    method: MethodConfig = built_by(_method, _default_method)  # the method's own Config (tunelab.methods)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    out: str | None = None

    @property
    def method_name(self) -> str:
        return self.method.name


@dataclass
class EvalCommandConfig:
    """What `tunelab eval` was asked to do: a YAML file (``--config``), dotted overrides, then its flags."""

    data: str = satisfying(non_empty, "a JSONL file or a task directory")  # its eval split for a directory
    model: str | None = None  # None = the adapter's base model, else smollm2-135m
    adapter: str | None = None  # directory holding tunelab_adapter.json
    protocol: str = choice(PROTOCOLS, "standard")  # standard | super_ni
    k: int = at_least(0, 2)  # super_ni: positive examples shown with the definition
    tasks_file: str | None = None  # super_ni: definitions and examples (default: DATA_DIR/tasks.jsonl)
    seen_from: str | None = None  # training data whose tasks are excluded (default: the adapter's run)
    include_seen: bool = False  # score tasks seen in training too (not the unseen-task protocol)
    metrics: list[str] | None = each_of(METRICS, None)  # None = the task's (super_ni: rouge_l)
    max_eval: int | None = at_least(1, None)  # cap on examples, after the per-task cap
    max_per_task: int | None = at_least(1, None)  # first N examples of each task
    template: str = choice(TEMPLATES, "auto")  # an adapter's own layout wins under auto
    system_prompt: str | None = None
    max_length: int | None = at_least(1, None)  # prompt tokens; None = the adapter's own (1024 for the bare model)
    eval: EvalConfig = field(default_factory=EvalConfig)  # batch size and decoding
    n_resamples: int = at_least(1, 1000)  # bootstrap resamples for the 95% intervals
    out: str | None = None  # write OUT/metrics.json and OUT/predictions.jsonl
    skip_bad: bool = False  # skip malformed records (counted) instead of stopping, as data.skip_bad in a run

    # `tunelab run`'s spelling of a key this command has (``data.max_eval=10`` means ``max_eval=10`` here)
    ALIASES: ClassVar[dict[str, str]] = {
        "data.max_eval": "max_eval", "data.template": "template", "data.system_prompt": "system_prompt",
        "data.max_length": "max_length", "data.skip_bad": "skip_bad", "model.name": "model",
        "eval.metrics": "metrics"}
    # keys of a shared section (EvalConfig) that scoring a data file has no use for
    UNUSED: ClassVar[dict[str, str]] = {
        "eval.loss": "tunelab eval scores generations; the teacher-forced loss is measured by tunelab run"}


@dataclass
class ServeConfig:
    """What `tunelab serve` was asked to do: a YAML file (``--config``), dotted overrides, then its flags."""

    adapters: str = satisfying(non_empty, "a directory with one subdirectory per adapter")
    model: str = satisfying(non_empty, "a registry name, Hugging Face id or local directory",
                            "smollm2-135m")  # the base model every adapter was trained on
    host: str = satisfying(non_empty, "an address to bind", "127.0.0.1")  # keep 127.0.0.1 unless behind a proxy
    port: int = between(0, 65535, 8000)  # 0 = any free port
    api_key: str | None = None  # require `Authorization: Bearer KEY` (the flag also reads TUNELAB_API_KEY)
    max_loaded: int = at_least(1, 64)  # adapters kept in memory (least recently used evicted)
    max_weight_adapters: int = at_least(1, 2)  # full-weight adapters kept (each holds a model copy)
    max_lora_adapters: int = at_least(1, 32)  # LoRA adapters stacked as rows of the shared batch (LRU slots)
    max_batch: int = at_least(1, 32)  # rows per forward pass
    hot_prompts: int = at_least(0, 256)  # soft prompts whose virtual-token key/values stay cached (LRU; serve.batcher)
    scheduler: str = choice(SCHEDULERS, "continuous")  # continuous | static (for comparison)
    window_ms: float = at_least(0, 5.0)  # how long the static batcher collects requests
    grace_s: float = at_least(0, 10.0)  # on SIGTERM: running rows get this long, then the rest are cancelled
    max_prompt_tokens: int = at_least(1, 2048)
    max_tokens: int = at_least(1, 512)  # largest max_tokens a request may ask for
    max_body_bytes: int = at_least(1, 1_000_000)
    threads: int | None = at_least(1, None)  # torch threads; None = torch's default
    precision: str = choice(PRECISIONS, "fp32")  # fp32 | bf16 | auto (as eval.precision)
    engine: str = choice(ENGINES, "tunelab")  # tunelab | vllm: who generates (serve.scheduler or serve.vllm_scheduler)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass; a method config is written as given
    (``MethodConfig.as_given``: its name and the options that were set)."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if isinstance(value, MethodConfig):
        return value.as_given()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-3`` -> (["train", "lr"], 0.001); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-3)")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); validation happens in ``from_dict``."""
    out = _deep_copy(data)
    for item in overrides:
        parts, value = parse_override(item)
        out = _method_as_section(out)  # `method=icl method.k=2`
        _set(out, parts, value, f"override '{item}'")
    return out


def _set(data: dict[str, Any], parts: list[str], value: Any, what: str) -> None:
    """Set ``parts`` (dotted keys) in ``data``; a number picks an entry of a list (``tasks.0.max_eval=600``)."""
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what}: '{part}' is not an index of that list (0 to {len(node) - 1})")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: '{parts[i - 1]}' is not a section")
        if last:
            node[part] = value
            return
        node = node.setdefault(part, {})


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) for k, v in data.items()}


def _copy(value: Any) -> Any:
    """A copy of nested dicts and lists (YAML data), so overrides never change the caller's."""
    if isinstance(value, dict):
        return _deep_copy(value)
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a clear error for syntax problems."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def build(cls: type, yaml_path: str | Path | None = None, overrides: list[str] | None = None,
          flags: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> Any:
    """Defaults < ``base`` < YAML file < dotted overrides < ``flags``, validated into dataclass ``cls``.

    ``flags`` maps dotted keys to CLI flag values, set as they are (not re-parsed as YAML); a None
    value is a flag not given. A key written as another command spells it (``cls.ALIASES``) is renamed,
    a key ``cls`` has but does not use (``cls.UNUSED``) is an error, and so is a dotted key under a
    plain value (``data.max_eval`` where ``data`` is a path): no key is ever dropped in silence.
    """
    data: dict[str, Any] = _deep_copy(base or {})
    if yaml_path:
        data = _merge(data, load_yaml(yaml_path))
    data = _method_as_section(apply_overrides(_method_as_section(data), overrides or []))
    data = _own_keys(cls, data)
    for key, value in (flags or {}).items():
        if value is not None:
            _check_not_section(cls, data, key.split("."))
            _set(data, key.split("."), value, f"flag for {key}")
    return from_dict(cls, _method_as_section(data))


def _own_keys(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``cls.ALIASES`` renamed to ``cls``'s own keys; a key in ``cls.UNUSED`` is an error."""
    for dotted, reason in getattr(cls, "UNUSED", {}).items():
        if _pop(data, dotted.split("."), keep=True) is not _ABSENT:
            raise ConfigError(f"{dotted}: not used here ({reason}); drop it")
    for dotted, own in getattr(cls, "ALIASES", {}).items():
        value = _pop(data, dotted.split("."))
        if value is not _ABSENT:
            data.setdefault(own, value)
    return data


_ABSENT = object()


def _pop(data: dict[str, Any], parts: list[str], keep: bool = False) -> Any:
    """Remove (or with ``keep``, only look up) a dotted key of nested dicts; ``_ABSENT`` if it is not there.
    A section left empty is removed with it."""
    node: Any = data
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return _ABSENT
    if parts[-1] not in node:
        return _ABSENT
    if keep:
        return node[parts[-1]]
    value = node.pop(parts[-1])
    if len(parts) > 1 and not node:
        _pop(data, parts[:-1])
    return value


def _check_not_section(cls: type, data: dict[str, Any], parts: list[str]) -> None:
    """A flag sets a plain value where the overrides made a section (``data.max_evl=3 --data f.jsonl``):
    setting it would drop those keys in silence, so name them and the keys that exist instead."""
    node: Any = data
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict) and node:
        not_a_section(cls, ".".join(parts), next(iter(node)))


def _method_as_section(data: dict[str, Any]) -> dict[str, Any]:
    """``method: icl`` means ``method: {name: icl}``, so ``method.k=2`` can be set beside it."""
    if isinstance(data.get("method"), str):
        data = {**data, "method": {"name": data["method"]}}
    return data


def build_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None,
                 base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < ``base`` < YAML file < overrides, validated into a RunConfig."""
    return build(RunConfig, yaml_path, overrides, base=base)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
