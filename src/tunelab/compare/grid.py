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
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.choices import PRUNERS
from tunelab.compare.archive import is_cell_dir
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
from tunelab.metrics import METRICS
from tunelab.validation import at_least, choice, each_of

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
            "report": ReportConfig}
METHOD_RESERVED = ("name", "label", "tasks", "seeds", "tune", *SECTIONS)  # keys of a method entry that are not method options
PROMPT_LENGTH_FIELD = "num_virtual_tokens"  # the option `prompt_lengths` sweeps, for methods that have it


@dataclass
class TuneSpec:
    """A method's search space: ``{"train.lr": [0.03, 0.3], "num_virtual_tokens": {low: 5, high: 50}}``.

    A key is a method option (``num_virtual_tokens``, ``r``, ``init``) or ``section.field`` of the run
    config (``train.lr``); a list is a set of choices, ``{low, high, log, int}`` a range.
    """

    space: dict[str, Any] = field(default_factory=dict)
    trials: int | None = None  # None = the grid's tune.trials (the same budget for every method)
    task: str | None = None  # tune on this task only and use its winner on every task (None: tune per task)


@dataclass
class TuneSettings:
    """The grid's ``tune:`` section: what every tuned method shares."""

    trials: int = 8  # trials per tuned method (per task, size and length); equal unless a method overrides it
    sampler: str = "auto"  # auto (grid for small all-choice spaces, else tpe) | tpe | grid
    seed: int = 0  # sampler seed, dev split seed and the training seed of every trial
    dev_rows: int = 50  # dev rows drawn (seeded) from the training data; trials train on the rest
    startup_trials: int = 3  # TPE: random trials before it models the scores
    # pruning (Optuna MedianPruner) on the dev loss, measured teacher-forced on the dev rows during a trial
    pruner: str = choice(PRUNERS, "none")  # none | median (stop a trial worse than the median)
    prune_every: int = at_least(1, 25)  # optimizer steps between a trial's dev-loss measurements (pruner: median)
    prune_startup_trials: int = at_least(0, 3)  # finished trials before any is pruned (MedianPruner n_startup_trials)
    prune_warmup_steps: int = at_least(0, 0)  # no pruning before this step (MedianPruner n_warmup_steps)


@dataclass
class MethodSpec:
    """One method entry: registry name, its options, a display label and per-method section overrides."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # how the report names it; default: name plus its options
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"train": {"lr": 0.3}, ...}
    tasks: list[str] | None = None  # run only on these task labels (None = every task of the grid)
    seeds: list[int] | None = None  # e.g. [0] for a deterministic method (zero-shot); None = the grid's seeds
    tune: TuneSpec | None = None  # search this method's hyperparameters on a dev split first (compare/tuning.py)
    init_from_cell: dict[str, str] | None = None  # {method: LABEL, task: TASK}: start from that cell's adapter

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
    max_eval: int | None = at_least(1, None)
    metrics: list[str] | None = each_of(METRICS, None)
    train_tasks: list[str] | None = None  # keep only training rows whose `task` field is listed
    eval_tasks: list[str] | None = None  # keep only evaluation rows whose `task` field is listed
    eval_per_task: int | None = at_least(1, None)  # the first N evaluation rows of each task (max_eval cuts the file's head)
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
    resources: dict[str, Any] = field(default_factory=dict)  # per cell: {cpus: 4, gpus: 1}; compare.backends
    tune: TuneSettings = field(default_factory=TuneSettings)
    margins: dict[str, float] = field(default_factory=dict)  # metric -> equivalence margin (claims' TOST)
    report: dict[str, Any] = field(default_factory=dict)  # experiment tracking of every cell (report.to)
    until: str | None = None  # decisive: after the planned cells, add seeds/rows until every quality test is decided
    budget: str | None = None  # cell time the additions may take (until: decisive), e.g. 3h, 90m, 600s


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
    source_key: str | None = None  # key of the cell whose adapter this one starts from (init_from: {cell: ...})

    def coords(self) -> dict[str, Any]:
        return {"method": self.method, "method_name": self.method_name, "task": self.task, "seed": self.seed,
                "train_size": self.train_size, "prompt_length": self.prompt_length, "unseen": self.unseen}


def coords_of(cells: Iterable[Cell]) -> dict[str, dict[str, Any]]:
    """Key -> the labels a grid gives each of its cells (``Store.tagged_rows`` names stored rows with them)."""
    return {c.key: c.coords() for c in cells}


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
    tune_raw = raw.pop("tune", None) or {}
    if not isinstance(tune_raw, dict):
        raise ConfigError(f"tune: expected a mapping (trials, sampler, seed, dev_rows), got {tune_raw!r}")
    grid = from_dict(GridConfig, raw)
    grid.tune = from_dict(TuneSettings, tune_raw, path="tune")
    if grid.tune.sampler not in ("auto", "tpe", "grid"):
        raise ConfigError(f"tune.sampler: {grid.tune.sampler!r}; choose auto, tpe or grid")
    if grid.tune.trials < 1 or grid.tune.dev_rows < 1:
        raise ConfigError("tune.trials and tune.dev_rows must be at least 1")
    if grid.until is not None:
        from tunelab.compare.adaptive import UNTIL, parse_budget

        if grid.until not in UNTIL:
            raise ConfigError(f"until: {grid.until!r}; choose {', '.join(UNTIL)} (or leave it out: the planned cells only)")
        if grid.budget is None:
            raise ConfigError("until: decisive needs a budget of cell time for the added cells, e.g. budget: 3h")
        parse_budget(grid.budget)
    elif grid.budget is not None:
        raise ConfigError("budget: only counts with until: decisive (set it, or drop budget)")
    for metric, margin in grid.margins.items():
        if not isinstance(margin, (int, float)) or margin <= 0:
            raise ConfigError(f"margins.{metric}: expected a positive number of metric points, got {margin!r}")
    grid.methods, grid.tasks = methods, tasks
    for section, cls in SECTIONS.items():
        from_dict(cls, getattr(grid, section), path=section)
    from tunelab.compare.backends import Resources

    # where cells run, not what they compute: not part of any cell's key
    grid.resources = dataclasses.asdict(from_dict(Resources, grid.resources, path="resources"))
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
    for i, m in enumerate(methods):
        if m.tune is not None and m.tune.task is not None and (m.tune.task not in task_labels
                                                               or (m.tasks is not None and m.tune.task not in m.tasks)):
            raise ConfigError(f"methods[{i}].tune.task: {m.tune.task!r} is not one of this method's tasks")
        ref = m.init_from_cell
        if ref is None:
            continue
        where = f"methods[{i}].init_from.cell"
        if ref["method"] not in labels:
            raise ConfigError(f"{where}.method: no method labelled {ref['method']!r}; methods: {', '.join(labels)}")
        if ref["task"] not in task_labels:
            raise ConfigError(f"{where}.task: no task named {ref['task']!r}; tasks: {', '.join(task_labels)}")
        if m.tune is not None:
            raise ConfigError(f"methods[{i}]: a method that starts from another cell cannot have a `tune:` block "
                              "(its trials would need the source first); tune the source method instead")
        if next(x for x in methods if x.display == ref["method"]).init_from_cell is not None:
            raise ConfigError(f"{where}: {ref['method']!r} starts from another cell itself; chains are not supported")
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
    source = None
    if isinstance(options.get("init_from"), dict):  # another cell's adapter, resolved once that cell has run
        ref = options.pop("init_from")
        source = ref.get("cell")
        if set(ref) != {"cell"} or not isinstance(source, dict) or set(source) != {"method", "task"}:
            raise ConfigError(f"{path}.init_from: expected {{cell: {{method: LABEL, task: TASK}}}} (a run directory "
                              f"is a plain string), got {ref!r}")
        source = {k: str(v) for k, v in source.items()}
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
    tune = _tune_spec(entry.get("tune"), f"{path}.tune", method) if "tune" in entry else None
    return MethodSpec(method.name, options, str(label) if label is not None else None, overrides, tasks, seeds, tune,
                      source)


def _tune_spec(entry: Any, path: str, method: Any) -> TuneSpec:
    """A method's ``tune:`` block, every key checked against the method's options and the run sections."""
    if not isinstance(entry, dict) or not isinstance(entry.get("space"), dict) or not entry["space"]:
        raise ConfigError(f"{path}: expected {{space: {{train.lr: [0.03, 0.3], ...}}, trials: N}}")
    spec = from_dict(TuneSpec, entry, path=path)
    if spec.trials is not None and spec.trials < 1:
        raise ConfigError(f"{path}.trials: must be at least 1")
    option_names = {f.name for f in dataclasses.fields(method.Config)}
    for key, values in spec.space.items():
        where = f"{path}.space.{key}"
        section, _, name = key.partition(".")
        if name:
            if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
                raise ConfigError(f"{where}: no setting {key!r}; use a method option or section.field "
                                  f"({', '.join(SECTIONS)})")
        elif key not in option_names:
            raise ConfigError(f"{where}: {method.name} has no option {key!r}; options: {', '.join(sorted(option_names))}")
        if isinstance(values, list):
            if not values:
                raise ConfigError(f"{where}: give at least one choice")
        elif isinstance(values, dict):
            unknown = set(values) - {"low", "high", "log", "int"}
            if unknown or "low" not in values or "high" not in values or not values["low"] < values["high"]:
                raise ConfigError(f"{where}: a range is {{low: A, high: B, log: true|false, int: true|false}} "
                                  f"with A < B")
        else:
            raise ConfigError(f"{where}: expected a list of choices or a {{low, high}} range, got {values!r}")
    return spec


def with_params(cell: Cell, params: dict[str, Any]) -> Cell:
    """The cell with tuned ``params`` applied (method options, or ``section.field``), its key recomputed.

    A tuned prompt length is part of the method's configuration, not a sweep coordinate: the cell's
    ``prompt_length`` becomes None so the claims still pair it with the other method's cells.
    """
    raw = to_dict(cell.config)
    for key, value in params.items():
        section, _, name = key.partition(".")
        if name:
            raw[section][name] = value
        else:
            raw["method"][key] = value
    cfg = from_dict(RunConfig, raw)
    length = None if PROMPT_LENGTH_FIELD in params else cell.prompt_length
    return dataclasses.replace(cell, key=cell_key(cfg, cell.task_spec), config=cfg, prompt_length=length)


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
    if data.get("eval", {}).get("precision", "fp32") == "fp32":  # left at its default (fp32) or set to it
        # greedy fp32 decoding: batch size changes speed, not outputs; in bf16 which rows share a batch can
        # flip a near-tie (docs/performance.md, "bf16 and batch invariance"), so there it counts
        data.get("eval", {}).pop("batch_size", None)
    data.get("model", {}).pop("threads", None)  # speed only (--workers splits the cores between cells)
    data["method"] = cfg.method.as_given()  # options as given (not resolved: old stores keep their keys); the name always counts
    source = data["method"].get("init_from")
    if isinstance(source, str) and is_cell_dir(source):  # another cell of a grid: counts by its key, not --out
        data["method"]["init_from"] = SOURCE_PLACEHOLDER + Path(source).name
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
    if spec.init_from_cell is not None:
        options["init_from"] = f"{SOURCE_PLACEHOLDER}{spec.init_from_cell['method']}@{spec.init_from_cell['task']}"
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


SOURCE_PLACEHOLDER = "cell:"  # method.init_from of a cell whose source cell is resolved later (resolve_sources)


def depends_on(cell: Cell) -> dict[str, str] | None:
    """The {method, task} of the cell this one starts from, if any."""
    value = getattr(cell.config.method, "init_from", None)
    if isinstance(value, str) and value.startswith(SOURCE_PLACEHOLDER):
        method, _, task = value[len(SOURCE_PLACEHOLDER):].partition("@")
        return {"method": method, "task": task}
    return None


def resolve_sources(cells: list[Cell], out_dir: Path) -> list[Cell]:
    """Point every ``init_from: {cell: ...}`` cell at its source cell's output directory.

    The source is the cell of that method and task with the same seed (else its first seed) and, for
    prompts, the same prompt length where it has several. The key counts the source by its key, so it
    does not depend on ``--out``; the config names the directory the run loads.
    """
    out = []
    for cell in cells:
        ref = depends_on(cell)
        if ref is None:
            out.append(cell)
            continue
        candidates = [c for c in cells if c.method == ref["method"] and c.task == ref["task"]
                      and depends_on(c) is None]
        if not candidates:
            raise ConfigError(f"{cell.method} on {cell.task}: init_from names {ref['method']} on {ref['task']}, "
                              "which the grid does not run (check that method's `tasks`)")
        length = getattr(cell.config.method, PROMPT_LENGTH_FIELD, None)
        same_length = [c for c in candidates if c.prompt_length in (None, length)] or candidates
        source = next((c for c in same_length if c.seed == cell.seed), same_length[0])
        out.append(started_from(cell, source, Path(out_dir).resolve() / "cells"))
    return out


def started_from(cell: Cell, source: Cell, cells_dir: Path) -> Cell:
    """``cell`` starting from ``source``'s adapter (its folder under ``cells_dir``), its key recomputed: the key
    counts the source by its key (``cell_key``), so it does not depend on where the cells are written."""
    raw = to_dict(cell.config)
    raw["method"]["init_from"] = str(Path(cells_dir) / source.key)
    cfg = from_dict(RunConfig, raw)
    return dataclasses.replace(cell, key=cell_key(cfg, cell.task_spec), config=cfg, source_key=source.key)


def waves(cells: list[Cell]) -> list[list[Cell]]:
    """Cells in run order: every cell that starts from another cell's adapter after all the others."""
    first = [c for c in cells if c.source_key is None]
    later = [c for c in cells if c.source_key is not None]
    return [w for w in (first, later) if w]


def validate(cells: list[Cell]) -> None:
    """Run ``tunelab.run.prepare`` (method options, data files, metrics) once per distinct cell setup."""
    from tunelab.prepare import prepare  # torch-free: a bad grid fails before the heavy imports

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
