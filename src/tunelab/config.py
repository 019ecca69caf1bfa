"""Typed run configuration: defaults < YAML file < dotted CLI overrides (``train.lr=1e-3``).

Every section is a dataclass; unknown keys are errors that name the key's full path.
Method-specific options live under ``method`` next to its ``name`` and are validated
against that method's own dataclass (see ``tunelab.methods``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # registry name, Hugging Face id, or local directory
    dtype: str = "float32"  # bf16 is ~40x slower on CPUs without bf16 units
    threads: int | None = None  # torch threads; None = all cores
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
    trust_remote_code: bool = False  # never run a hub repo's code unless asked
    allow_pickle: bool = False  # load pickle-only (*.bin) local model weights; pickles can run code


@dataclass
class DataConfig:
    task: str = "date_format"  # built-in task name, a JSONL file, or a directory with train/test files
    train: str | None = None  # explicit train file (overrides what `task` implies)
    eval: str | None = None  # explicit eval file
    max_train: int | None = None  # cap on training examples (learning curves)
    max_eval: int | None = 100  # cap on evaluation examples
    max_length: int = 512  # tokens per training sequence; longer prompts are cut from the left
    template: str = "auto"  # auto | chat | alpaca | plain
    system_prompt: str | None = None  # chat template system message; None keeps the model's default
    skip_bad: bool = False  # skip malformed records (counted in result.json) instead of stopping
    task_cap: int | None = None  # examples-proportional mixing of the train tasks, at most this many per task
    mixture: list[str] | None = None  # more training files mixed in, each "path" or "path@weight"
    sni_encoding: str = "plain"  # Super-NI instructions: plain (Definition) or Tk-Instruct's def, def+pos2, ...


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float | None = None  # None = the method's default
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"  # linear: warmup then decay to 10% of lr | constant: warmup then flat
    group_by_length: bool = True  # batches of similar-length examples (less padding); order stays random
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto: bf16 where measured faster (tunelab.distributed)
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0 = only at the end
    log_every: int = 10
    resume: bool = False  # continue from OUT/checkpoint if one exists


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int | None = None  # None = derived from the longest training reference
    metrics: list[str] | None = None  # None = the task's default metrics
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    loss: bool = True  # teacher-forced loss on the eval rows and as many training rows (the overfitting gap)
    precision: str = "auto"  # fp32 | bf16 | auto: prefill and decode each in bf16 where fast (tunelab.precision)


@dataclass
class RunConfig:
    method: dict[str, Any] = field(default_factory=lambda: {"name": "prompt_tuning"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = None

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", ""))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking key names and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, path)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    return _scalar(hint, value, path)


def _scalar(hint: type, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


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
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


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


def build_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None,
                 base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < ``base`` < YAML file < overrides, validated into a RunConfig."""
    data: dict[str, Any] = _deep_copy(base or {})
    if yaml_path:
        data = _merge(data, load_yaml(yaml_path))
    data = apply_overrides(data, overrides or [])
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    return from_dict(RunConfig, data)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
