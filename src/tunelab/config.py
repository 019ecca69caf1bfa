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

import contextlib
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tunelab.choices import PRECISIONS, PROTOCOLS, SCHEDULERS, SCHEDULES
from tunelab.errors import ConfigError, did_you_mean
from tunelab.formatting import TEMPLATES
from tunelab.metrics import METRICS
from tunelab.models import DTYPES
from tunelab.validation import above, at_least, between, check, choice, each_of, finite, matching, satisfying

DEFAULT_METHOD = "prompt_tuning"  # what `tunelab run` trains when no method is named
DEVICES = r"auto|cpu|mps|cuda(:\d+)?"


def _non_empty(value: str) -> bool:
    return bool(value.strip())


def _sni_encoding(value: str) -> bool:
    from tunelab.data.formats.super_ni import SniEncoding

    try:
        SniEncoding.parse(value)
    except ConfigError:
        return False
    return True


@dataclass
class ModelConfig:
    name: str = satisfying(_non_empty, "a registry name, Hugging Face id or local directory",
                           "smollm2-135m")  # registry name, Hugging Face id, or local directory
    dtype: str = choice(DTYPES, "float32")  # bf16 is ~40x slower on CPUs without bf16 units
    threads: int | None = at_least(1, None)  # torch threads; None = all cores
    device: str = matching(DEVICES, "auto, cpu, cuda, cuda:N or mps",
                           "auto")  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
    trust_remote_code: bool = False  # never run a hub repo's code unless asked
    allow_pickle: bool = False  # load pickle-only (*.bin) local model weights; pickles can run code


@dataclass
class DataConfig:
    task: str = satisfying(_non_empty, "a built-in task name, a data file or a directory",
                           "date_format")  # built-in task name, a JSONL file, or a directory with train/test files
    train: str | None = None  # explicit train file (overrides what `task` implies)
    eval: str | None = None  # explicit eval file
    max_train: int | None = at_least(1, None)  # cap on training examples (learning curves)
    max_eval: int | None = at_least(1, 100)  # cap on evaluation examples
    max_length: int = at_least(1, 512)  # tokens per training sequence; longer prompts are cut from the left
    template: str = choice(TEMPLATES, "auto")  # auto | chat | alpaca | plain
    system_prompt: str | None = None  # chat template system message; None keeps the model's default
    skip_bad: bool = False  # skip malformed records (counted in result.json) instead of stopping
    task_cap: int | None = at_least(1, None)  # examples-proportional mixing of the train tasks, at most this many per task
    mixture: list[str] | None = None  # more training files mixed in, each "path" or "path@weight"
    sni_encoding: str = satisfying(_sni_encoding, "plain or parts joined by '+': def, posK, negK, expl (e.g. def+pos2)",
                                   "plain")  # Super-NI instructions: plain (Definition) or Tk-Instruct's def, def+pos2, ...


@dataclass
class TrainConfig:
    steps: int = at_least(0, 100)  # 0 = no training (e.g. a transferred prompt used as is)
    lr: float | None = above(0, None)  # None = the method's default
    batch_size: int = at_least(1, 8)
    grad_accum: int = at_least(1, 1)
    warmup_steps: int = at_least(0, 0)
    schedule: str = choice(SCHEDULES, "linear")  # linear: warmup then decay to 10% of lr | constant: warmup then flat
    group_by_length: bool = True  # batches of similar-length examples (less padding); order stays random
    weight_decay: float = at_least(0, 0.0)
    max_grad_norm: float = at_least(0, 1.0)  # 0 = no clipping
    seed: int = between(0, 2**32 - 1, 0)  # numpy's seed range
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    precision: str = choice(PRECISIONS, "auto")  # fp32 | bf16 (autocast) | auto: bf16 where measured faster (tunelab.distributed)
    checkpoint_every: int = at_least(0, 0)  # steps between resumable checkpoints; 0 = only at the end
    log_every: int = at_least(1, 10)
    resume: bool = False  # continue from OUT/checkpoint (done anyway when one exists; with this flag, warn if none)
    restart: bool = False  # throw OUT/checkpoint away and start from step 1 (otherwise a run resumes from it when
    # it was made with this run's settings, and refuses, naming the settings that differ, when it was not)

    def __post_init__(self) -> None:
        if self.resume and self.restart:
            raise ConfigError("train.resume and train.restart: choose one (--resume continues from OUT/checkpoint, "
                              "--restart throws it away)")


@dataclass
class EvalConfig:
    batch_size: int = at_least(1, 16)
    max_new_tokens: int | None = at_least(1, None)  # None = derived from the longest training reference
    metrics: list[str] | None = each_of(METRICS, None)  # None = the task's default metrics
    do_sample: bool = False
    temperature: float = above(0, 1.0)
    top_p: float = between(0, 1, 1.0, low_open=True)
    loss: bool = True  # teacher-forced loss on the eval rows and as many training rows (the overfitting gap)
    forgetting: bool = True  # general-text loss with the adapter minus the base model's (tunelab.forgetting)
    forgetting_probe: str | None = None  # JSONL of general text ('output' / 'text'); None = shared Alpaca, else built-in
    # fp32 | bf16 | auto: prefill and decode each in bf16 where fast (tunelab.precision). fp32 by default: bf16
    # rounding differs with the batch's shape, so on a real model a greedy near-tie can flip between batched and
    # one-by-one output (docs/performance.md); fp32 keeps them equal, and stored cells comparable
    precision: str = choice(PRECISIONS, "fp32")


TRACKERS = ("mlflow", "tensorboard", "wandb", "trackio")  # report.to names (tunelab.tracking)


@dataclass
class ReportConfig:
    """Experiment tracking (``report.to``, like Trainer's ``report_to``); see ``tunelab.tracking``."""

    to: list[str] = field(default_factory=list)  # any of mlflow, tensorboard, wandb, trackio; [] = none
    mlflow_uri: str = "sqlite:///runs/mlflow.db"  # MLflow tracking URI (a local sqlite store; no server)
    experiment: str = "tunelab"  # MLflow experiment, W&B and Trackio project
    dir: str | None = None  # TensorBoard / W&B / Trackio files; None = OUT/tracking (runs/tracking without --out)
    run_name: str | None = None  # None = METHOD-TASK-seedS

    def __post_init__(self) -> None:
        unknown = [t for t in self.to if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"report.to: unknown tracker {unknown[0]!r}; choose any of {', '.join(TRACKERS)}")


@dataclass
class MethodConfig:
    """Options shared by all methods; each method subclasses this with its own fields (``tunelab.methods``).

    An instance built by ``tunelab.methods.method_config`` also knows its method's registry ``name`` and
    the options as they were given (``as_given``): that is what ``to_dict`` writes (result.json) and
    what ``tunelab compare`` hashes, so adding an option with a default changes no stored cell.
    Neither is a dataclass field, so ``asdict`` (adapter metadata, checkpoint identity) is unchanged.
    """

    lr: float = above(0, 1e-3)  # learning rate when train.lr is not set
    init_from: str | None = None  # a run (or its adapter/) to start from; see tunelab.methods.transfer

    def bind(self, name: str, given: dict[str, Any]) -> MethodConfig:
        """Record the registry name and the options as given (done by ``tunelab.methods.method_config``)."""
        self.__dict__["_name"], self.__dict__["_given"] = name, copy.deepcopy(given)
        return self

    @property
    def name(self) -> str:
        """The method's registry name (``icl``, ``lora``, ...)."""
        if "_name" in self.__dict__:
            return self.__dict__["_name"]
        from tunelab.methods import METHODS  # built directly, not from a spec: the method owning this class

        return next((m.name for m in METHODS.values() if m.Config is type(self)), "")

    def as_given(self) -> dict[str, Any]:
        """``{"name": ..., **options}`` with only the options that were given (or differ from the defaults)."""
        given = self.__dict__.get("_given")
        if given is None:
            defaults = type(self)()
            given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if getattr(self, f.name) != getattr(defaults, f.name)}
        return {"name": self.name, **copy.deepcopy(given)}


def _default_method() -> MethodConfig:
    from tunelab.methods import method_config

    return method_config({"name": DEFAULT_METHOD})[1]


@dataclass
class RunConfig:
    method: MethodConfig = field(default_factory=_default_method)  # the method's own Config (tunelab.methods)
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

    data: str = satisfying(_non_empty, "a JSONL file or a task directory")  # its eval split for a directory
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

    adapters: str = satisfying(_non_empty, "a directory with one subdirectory per adapter")
    model: str = satisfying(_non_empty, "a registry name, Hugging Face id or local directory",
                            "smollm2-135m")  # the base model every adapter was trained on
    host: str = satisfying(_non_empty, "an address to bind", "127.0.0.1")  # keep 127.0.0.1 unless behind a proxy
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


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking key names, value types and each field's declared rule."""
    where = f"{path}." if path else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: got {data!r}, expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        section = f"{path}: " if path else ""  # every message starts with the path it is about
        key = where + unknown[0]  # repr: a key with a newline still makes one line
        raise ConfigError(f"{section}unknown config key {key!r}{did_you_mean(unknown[0], names)}; "
                          f"valid keys: {', '.join(sorted(names))}")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}{missing[0]}: missing; set it in the config file, as {where}{missing[0]}=VALUE "
                          "or with its flag")
    kwargs = {}
    for key, raw in data.items():
        if isinstance(raw, dict) and raw and not _takes_mapping(hints[key]):  # `model.name=x` where model is a str
            _not_a_section(cls, f"{where}{key}", next(iter(raw)))
        value = _coerce(hints[key], raw, f"{where}{key}")
        check(cls, key, hints[key], value, raw, f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _takes_mapping(hint: Any) -> bool:
    """Whether a field of type ``hint`` can be given as a mapping (a section, a dict, a method spec)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_takes_mapping(a) for a in typing.get_args(hint))
    return (hint is Any or hint is dict or typing.get_origin(hint) is dict or dataclasses.is_dataclass(hint)
            or (isinstance(hint, type) and issubclass(hint, MethodConfig)))


def _method(value: Any, path: str) -> MethodConfig:
    """A method's own config from ``{"name": ..., **options}`` or a bare name."""
    if isinstance(value, MethodConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: got {value!r}, expected a method name or a mapping like {{name: icl, k: 2}}")
    from tunelab.methods import method_config

    return method_config(value, path)[1]


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if isinstance(hint, type) and issubclass(hint, MethodConfig):
        return _method(value, path)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, path)  # type: ignore[arg-type]
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
            raise ConfigError(f"{path}: got {value!r}, expected a list")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a mapping")
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
        raise ConfigError(f"{path}: got {value!r}, expected true/false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: got {value!r}, expected an integer")
    if hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else float("inf")  # huge ints overflow float()
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and finite(number):
            return number
        raise ConfigError(f"{path}: got {value!r}, expected a {'finite ' if number is not None else ''}number")
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: got {value!r}, expected a string")
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
        _not_a_section(cls, ".".join(parts), next(iter(node)))


def _not_a_section(cls: type, key: str, sub: str) -> None:
    names = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    also = did_you_mean(f"{key}.{sub}", getattr(cls, "ALIASES", {}))  # data.max_evl -> data.max_eval
    raise ConfigError(f"{key}: a value, not a section, so {key + '.' + str(sub)!r} is not a config key{also}; "
                      f"valid keys: {', '.join(names)}")


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
