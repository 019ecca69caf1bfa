"""A comparison grid: methods x tasks x seeds x training-set sizes x prompt lengths, validated up front.

A grid YAML holds shared ``model``/``data``/``train``/``eval`` sections (the ``tunelab run`` schema),
a list of ``methods`` (``{name: prompt_tuning, num_virtual_tokens: 20, label: pt, train: {lr: 0.3}}``),
a list of ``tasks`` (a built-in name, a data path, or a mapping), and the axes ``seeds``,
``train_sizes`` and ``prompt_lengths``. ``expand`` turns it into cells, each a complete ``RunConfig``;
``validate`` runs ``tunelab.run.prepare`` on every distinct one, so a typo fails before any training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    ReportConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    to_dict,
)
from tunelab.errors import ConfigError, TunelabError

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "report": ReportConfig}
METHOD_RESERVED = ("name", "label", "tasks", "seeds", *SECTIONS)  # keys of a method entry that are not method options
PROMPT_LENGTH_FIELD = "num_virtual_tokens"  # the option `prompt_lengths` sweeps, for methods that have it


@dataclass
class MethodSpec:
    """One method entry: registry name, its options, a display label and per-method section overrides."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # how the report names it; default: name plus its options
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"train": {"lr": 0.3}, ...}
    tasks: list[str] | None = None  # run only on these task labels (None = every task of the grid)
    seeds: list[int] | None = None  # e.g. [0] for a deterministic method (zero-shot); None = the grid's seeds

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}({opts})" if opts else self.name


@dataclass
class TaskSpec:
    """One task: a built-in name or data path, plus optional per-task data settings."""

    task: str  # built-in task name, JSONL file or directory (as data.task of `tunelab run`)
    name: str | None = None  # label in the report; default: the last path component
    train: str | None = None  # explicit train file
    eval: str | None = None  # explicit eval file
    max_eval: int | None = None
    metrics: list[str] | None = None
    train_tasks: list[str] | None = None  # keep only training rows whose `task` field is listed
    eval_tasks: list[str] | None = None  # keep only evaluation rows whose `task` field is listed
    eval_per_task: int | None = None  # the first N evaluation rows of each task (max_eval cuts the file's head)
    prompt_lengths: list[int] | None = None  # this task's soft-prompt length sweep; None = the grid's
    unseen: bool = False  # the evaluation tasks were never trained on (generalisation claims)
    tags: list[str] | None = None  # labels for the claims table, e.g. [reasoning]; no effect on any cell

    @property
    def label(self) -> str:
        return self.name or Path(self.task.rstrip("/")).name


@dataclass
class GridConfig:
    name: str = "grid"
    methods: list[MethodSpec] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    train_sizes: list[int | None] = field(default_factory=lambda: [None])  # data.max_train per cell
    prompt_lengths: list[int] = field(default_factory=list)  # num_virtual_tokens sweep; [] = method default
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # experiment tracking of every cell (report.to)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a complete RunConfig plus the coordinates the report groups by."""

    key: str  # hash of the resolved config: the identity used to skip finished cells
    method: str  # display label
    method_name: str  # registry name
    task: str
    seed: int
    train_size: int | None
    prompt_length: int | None
    unseen: bool
    config: RunConfig
    task_spec: TaskSpec

    def coords(self) -> dict[str, Any]:
        return {"method": self.method, "method_name": self.method_name, "task": self.task, "seed": self.seed,
                "train_size": self.train_size, "prompt_length": self.prompt_length, "unseen": self.unseen}


def preset_path(name: str) -> Path:
    """The YAML of a shipped preset (``tunelab/presets/NAME.yaml``)."""
    path = Path(str(resources.files("tunelab") / "presets" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(list_presets())}")
    return path


def list_presets() -> list[str]:
    return sorted(p.stem for p in Path(str(resources.files("tunelab") / "presets")).glob("*.yaml"))


def load_grid(path: str | Path, overrides: list[str] | None = None) -> GridConfig:
    """Read and type-check a grid YAML (``overrides`` like ``train.steps=5`` apply to the shared sections)."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    try:
        grid = parse_grid(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return grid


def parse_grid(raw: dict[str, Any]) -> GridConfig:
    """A GridConfig from a mapping; every error names the key path (``methods[1].train.stpes``)."""
    raw = dict(raw)
    methods = [_method_spec(m, f"methods[{i}]") for i, m in enumerate(_list(raw.pop("methods", None), "methods"))]
    tasks = [_task_spec(t, f"tasks[{i}]") for i, t in enumerate(_list(raw.pop("tasks", None), "tasks"))]
    grid = from_dict(GridConfig, raw)
    grid.methods, grid.tasks = methods, tasks
    for section, cls in SECTIONS.items():
        from_dict(cls, getattr(grid, section), path=section)
    if not grid.seeds:
        raise ConfigError("seeds: give at least one seed")
    if not grid.train_sizes:
        grid.train_sizes = [None]
    for key in ("seeds", "train_sizes", "prompt_lengths"):
        _check_values(key, getattr(grid, key), minimum=0 if key == "seeds" else 1)
    for i, t in enumerate(tasks):
        if t.prompt_lengths is not None:
            _check_values(f"tasks[{i}].prompt_lengths", t.prompt_lengths, minimum=1)
    task_labels = [t.label for t in tasks]
    if len(set(task_labels)) != len(task_labels):
        dup = next(x for x in task_labels if task_labels.count(x) > 1)
        raise ConfigError(f"tasks: two entries are both named {dup!r}; give one a distinct `name`")
    for i, m in enumerate(methods):
        unknown = sorted(set(m.tasks or []) - set(task_labels))
        if unknown:
            raise ConfigError(f"methods[{i}].tasks: no task named {unknown[0]!r}; tasks: {', '.join(task_labels)}")
    labels = [m.display for m in methods]
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise ConfigError(f"methods: two entries are both labelled {dup!r}; give one a distinct `label`")
    return grid


def _check_values(path: str, values: list[Any], minimum: int) -> None:
    if len(set(values)) != len(values):
        raise ConfigError(f"{path}: {values} repeats a value")
    bad = [v for v in values if v is not None and v < minimum]
    if bad:
        raise ConfigError(f"{path}: {bad[0]} is out of range")


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: expected a non-empty list")
    return value


def _method_spec(entry: Any, path: str) -> MethodSpec:
    from tunelab.methods import get_method

    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{path}: expected a mapping with a `name` (e.g. {{name: prompt_tuning}})")
    method = get_method(str(entry["name"]))
    options = {k: v for k, v in entry.items() if k not in METHOD_RESERVED}
    try:  # the method's own dataclass checks option names and values, as `tunelab run` does
        from_dict(method.Config, options, path=path)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if path in msg else f"{path} ({method.name}): {msg}") from None
    overrides = {}
    for section, cls in SECTIONS.items():
        if section in entry:
            from_dict(cls, entry[section], path=f"{path}.{section}")
            overrides[section] = dict(entry[section])
    label = entry.get("label")
    tasks = entry.get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks)):
        raise ConfigError(f"{path}.tasks: expected a list of task labels, got {tasks!r}")
    seeds = entry.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise ConfigError(f"{path}.seeds: expected a non-empty list of integers, got {seeds!r}")
    return MethodSpec(method.name, options, str(label) if label is not None else None, overrides, tasks, seeds)


def _task_spec(entry: Any, path: str) -> TaskSpec:
    if isinstance(entry, str):
        return TaskSpec(entry)
    return from_dict(TaskSpec, entry, path=path)


def cell_key(cfg: RunConfig, task: TaskSpec | None = None) -> str:
    """Hash of everything that changes a cell's result (not where it is written or whether it resumes).

    Settings left at their defaults are dropped first, so a tunelab upgrade that adds a config field
    (with a default that keeps the old behaviour) does not invalidate the cells already in a store.
    A task with a per-task subset counts by its recipe (source and filters), not by the path of the
    files the grid derived under its output directory, so another ``--out`` finds the same cells.
    """
    data = _non_default(to_dict(cfg), to_dict(RunConfig()))
    data.pop("out", None)
    data.pop("report", None)  # where a cell is tracked does not change its result
    if task is not None and _has_subset(task):
        section = data.setdefault("data", {})
        section.pop("train", None)
        section.pop("eval", None)
        section["subset"] = {k: getattr(task, k) for k in ("train", "eval", "train_tasks", "eval_tasks",
                                                            "eval_per_task")}
    data.get("train", {}).pop("resume", None)
    data.get("eval", {}).pop("batch_size", None)  # greedy decoding: batch size changes speed, not outputs
    data.get("model", {}).pop("threads", None)  # speed only (--workers splits the cores between cells)
    data["method"] = dict(cfg.method)  # options as given; the name always counts
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _non_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            value = _non_default(value, defaults[key])
            if value:
                out[key] = value
        elif key not in defaults or defaults[key] != value:
            out[key] = value
    return out


def expand(grid: GridConfig, data_dir: Path | None = None) -> list[Cell]:
    """Every cell of the grid in run order (task, method, size, length, seed), keys unique."""
    from tunelab.methods import get_method

    cells: list[Cell] = []
    for task in grid.tasks:
        task_data = _task_data(task, data_dir)
        for spec in grid.methods:
            if spec.tasks is not None and task.label not in spec.tasks:
                continue
            fields = {f.name for f in dataclasses.fields(get_method(spec.name).Config)}
            sweeps = PROMPT_LENGTH_FIELD in fields and PROMPT_LENGTH_FIELD not in spec.options
            sweep = task.prompt_lengths if task.prompt_lengths is not None else grid.prompt_lengths
            lengths: list[int | None] = list(sweep) if sweeps and sweep else [None]
            for size in grid.train_sizes:
                for length in lengths:
                    for seed in spec.seeds or grid.seeds:
                        cells.append(_cell(grid, task, task_data, spec, seed, size, length))
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ConfigError("two cells of the grid resolve to the same config; remove the duplicate method or task")
    return cells


def _task_data(task: TaskSpec, data_dir: Path | None) -> dict[str, Any]:
    data: dict[str, Any] = {"task": task.task}
    for key in ("train", "eval", "max_eval"):
        if getattr(task, key) is not None:
            data[key] = getattr(task, key)
    if _has_subset(task):
        from tunelab.compare.subsets import task_subset

        data.update(task_subset(task, data_dir))
    return data


def _has_subset(task: TaskSpec) -> bool:
    return bool(task.train_tasks or task.eval_tasks or task.eval_per_task)


def _cell(grid: GridConfig, task: TaskSpec, task_data: dict[str, Any], spec: MethodSpec, seed: int,
          size: int | None, length: int | None) -> Cell:
    options = dict(spec.options)
    if length is not None:
        options[PROMPT_LENGTH_FIELD] = length
    raw: dict[str, Any] = {s: dict(getattr(grid, s)) for s in SECTIONS}
    raw = _merge(raw, {"data": task_data})
    if task.metrics:
        raw = _merge(raw, {"eval": {"metrics": list(task.metrics)}})
    raw = _merge(raw, spec.overrides)
    raw = _merge(raw, {"method": {"name": spec.name, **options}, "train": {"seed": seed}})
    if size is not None:
        raw["data"]["max_train"] = size
    if raw["report"].get("to") and not raw["report"].get("run_name"):  # trackers name a cell by its label
        raw["report"]["run_name"] = "-".join([f"{grid.name}/{spec.display}", task.label, f"seed{seed}",
                                             *([f"n{size}"] if size is not None else []),
                                             *([f"len{length}"] if length is not None else [])])
    cfg = from_dict(RunConfig, raw)
    effective_length = length if length is not None else options.get(PROMPT_LENGTH_FIELD)
    return Cell(cell_key(cfg, task), spec.display, spec.name, task.label, seed, cfg.data.max_train, effective_length,
                task.unseen, cfg, task)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, recursively for nested sections."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cells: list[Cell]) -> None:
    """Run ``tunelab.run.prepare`` (method options, data files, metrics) once per distinct cell setup."""
    from tunelab.run import prepare

    seen: set[str] = set()
    for cell in cells:
        data = to_dict(cell.config)
        data["train"] = {}  # seeds and train options do not change what prepare checks
        signature = json.dumps(data, sort_keys=True, default=str)
        if signature in seen:
            continue
        seen.add(signature)
        try:
            prepare(cell.config)
        except TunelabError as exc:
            raise ConfigError(f"cell {cell.method} / {cell.task}: {exc}") from None
