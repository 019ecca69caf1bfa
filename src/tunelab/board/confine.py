"""What the board may touch: names and paths stay under the runs folder, and no launch runs a model's code.

A board serves a form that starts processes, so everything the form (or a YAML it loads, or a dotted
override) can set is checked before anything is saved or started:

- a name (a saved config, a job's output folder, an adapters folder) becomes a path only through
  ``paths.safe_child`` / ``inside``, which resolve symlinks and refuse ``..``, absolute paths and links
  leading out of the runs folder;
- every config field that names a file or folder (``PATH_FIELDS``) must resolve under the runs folder
  (a relative path is relative to the board's working directory, as the job runs there like the CLI
  typed in that directory), and MLflow may track only to a file there;
- ``model.trust_remote_code`` (runs a model directory's Python) and ``model.allow_pickle`` (unpickles its
  weights, which runs code too) are refused unless the board was started with ``--allow-remote-code``.

Registry names (``smollm2-135m``, ``tiny``) and Hugging Face ids load from the model caches as in every
command; a model name that is a local path follows the path rule.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tunelab.errors import TunelabError
from tunelab.paths import safe_child

CODE_FLAGS = ("model.trust_remote_code", "model.allow_pickle")
REMOTE_CODE_FLAG = "--allow-remote-code"


class Refused(TunelabError):
    """The board will not do this: a path outside the runs folder, or code from a model directory."""


def inside(runs: str | Path, value: str | Path, what: str) -> Path:
    """``value`` resolved (``~`` expanded, symlinks followed, relative to the working directory), which must
    lie under ``runs``; else ``Refused``."""
    root = Path(runs).resolve()
    text = str(value)
    if not text.strip() or "\x00" in text:
        raise Refused(f"{what}: {text!r} is not a path under the runs folder {root}")
    path = Path(text).expanduser().resolve()
    if not path.is_relative_to(root):
        raise Refused(f"{what}: {text!r} is outside the runs folder {root}; the board reads and writes only "
                      "under it (give a path under it, or use the CLI for files elsewhere)")
    return path


def child(folder: str | Path, name: str, what: str) -> Path:
    """``folder/name`` for a plain name (``paths.safe_child``), the error naming ``what``."""
    try:
        return safe_child(folder, name)
    except TunelabError as exc:
        raise Refused(f"{what}: {exc}") from None


def model_source(runs: str | Path, name: str, what: str = "model.name") -> str:
    """``name`` unchanged for a registry name or hub id; a local path must lie under ``runs`` (returned absolute)."""
    from tunelab.models import MODELS

    if name in MODELS:
        return name
    path = Path(name).expanduser()
    local = path.is_absolute() or name.startswith((".", "~")) or path.suffix == ".gguf" or path.exists()
    return str(inside(runs, name, what)) if local else name


def _model(runs: Path, value: Any, what: str) -> None:
    model_source(runs, str(value), what)


def _task(runs: Path, value: Any, what: str) -> None:
    from tunelab.data import TASKS

    name = str(value)
    if name not in TASKS and ("/" in name or name.startswith((".", "~")) or Path(name).exists()):
        inside(runs, value, what)  # a plain unknown name fails in the job as `tunelab run` fails on it


def _path(runs: Path, value: Any, what: str) -> None:
    if value is not None:
        inside(runs, value, what)


def _mixture(runs: Path, value: Any, what: str) -> None:
    from tunelab.data.mixtures import parse_source

    for i, entry in enumerate(value or []):
        inside(runs, parse_source(str(entry))[0], f"{what}[{i}]")


def _init_from(runs: Path, value: Any, what: str) -> None:
    if isinstance(value, str):  # a grid's {cell: ...} reference resolves to a cell under the job's folder
        inside(runs, value, what)


def _peft_options(runs: Path, value: Any, what: str) -> None:
    """The generic peft method's own options: the files they name (a tokenizer to load)."""
    if isinstance(value, dict) and value.get("tokenizer_name_or_path"):
        model_source(runs, str(value["tokenizer_name_or_path"]), f"{what}.tokenizer_name_or_path")
    if isinstance(value, dict) and value.get("prompt_tuning_init_state_dict_path"):
        inside(runs, value["prompt_tuning_init_state_dict_path"], f"{what}.prompt_tuning_init_state_dict_path")


def _peft_code(value: Any) -> str | None:
    """The peft option (of ``method.options``) that would run code, if any: peft ``torch.load``s an init
    state dict (a pickle) and passes ``tokenizer_kwargs`` to ``AutoTokenizer.from_pretrained``."""
    if not isinstance(value, dict):
        return None
    if value.get("prompt_tuning_init_state_dict_path"):
        return "prompt_tuning_init_state_dict_path"
    kwargs = value.get("tokenizer_kwargs")
    return "tokenizer_kwargs.trust_remote_code" if isinstance(kwargs, dict) and kwargs.get("trust_remote_code") else None


def _tracking_uri(runs: Path, value: Any, what: str) -> None:
    """MLflow's store: ``sqlite:///FILE``, ``file:DIR`` or a plain path, under the runs folder; no server."""
    text = str(value)
    if text.startswith("sqlite:///"):
        inside(runs, text.removeprefix("sqlite:///"), what)
    elif (scheme := urlparse(text).scheme) in ("", "file"):
        inside(runs, urlparse(text).path if scheme else text, what)
    else:
        raise Refused(f"{what}: {text!r} tracks to a {scheme} server; the board tracks only to files under the "
                      f"runs folder (e.g. sqlite:///mlflow.db); use the CLI to track elsewhere")


# every config field naming a file or folder, and how it is checked (tests/board check that every other
# text field of a run config is not a path)
PATH_FIELDS: dict[str, Callable[[Path, Any, str], None]] = {
    "model.name": _model, "data.task": _task, "data.train": _path, "data.eval": _path, "data.mixture": _mixture,
    "eval.forgetting_probe": _path, "method.init_from": _init_from, "method.options": _peft_options,
    "report.dir": _path, "report.mlflow_uri": _tracking_uri, "out": _path}


def check_sections(runs: str | Path, sections: dict[str, Any], where: str = "", allow_remote_code: bool = False) -> None:
    """Check ``{section: {field: value}}`` (top-level ``out`` as a plain value) against the rules above."""
    root = Path(runs).resolve()
    for section, values in sections.items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for name, value in items:
            key = section if name is None else f"{section}.{name}"
            flag = key if key in CODE_FLAGS and value else None
            if key == "method.options" and (option := _peft_code(value)):
                flag = f"{key}.{option}"
            if flag and not allow_remote_code:
                raise Refused(f"{where}{flag}: refused, it lets a model directory run code (its Python, or pickled "
                              f"weights); this board was started without {REMOTE_CODE_FLAG} (restart it with "
                              "that flag only if you trust every model it can load)")
            if key in PATH_FIELDS and value is not None:
                PATH_FIELDS[key](root, value, f"{where}{key}")


def check_launch(runs: str | Path, raw: dict[str, Any], allow_remote_code: bool = False) -> None:
    """Refuse a resolved run or grid mapping that reaches outside ``runs`` or runs a model's code."""
    from tunelab.board.forms import kind_of
    from tunelab.compare.grid import SECTIONS

    if kind_of(raw) == "run":
        method = raw.get("method")
        check_sections(runs, {**{s: raw.get(s) or {} for s in SECTIONS},
                              "method": method if isinstance(method, dict) else {}, "out": raw.get("out")},
                       allow_remote_code=allow_remote_code)
        _check_default_tracking(runs, [raw.get("report")])
        return
    _check_grid(runs, raw, allow_remote_code)


def _check_default_tracking(runs: str | Path, reports: list[Any]) -> None:
    """MLflow's default store is relative to the working directory: check it when MLflow is on and no
    layer of the config names a store."""
    from tunelab.config import ReportConfig

    layers = [r for r in reports if isinstance(r, dict)]
    if any("mlflow" in (r.get("to") or []) for r in layers) and not any(r.get("mlflow_uri") for r in layers):
        _tracking_uri(Path(runs).resolve(), ReportConfig().mlflow_uri, "report.mlflow_uri (the default)")


def _check_grid(runs: str | Path, raw: dict[str, Any], allow_remote_code: bool) -> None:
    """Every layer a grid cell's config is merged from: the grid's sections, each method's options and
    sections, each task's files; a cell's value comes from one of them, so checking each covers every cell."""
    from tunelab.compare.grid import SECTIONS, parse_grid

    grid = parse_grid(raw)
    check_sections(runs, {s: getattr(grid, s) for s in SECTIONS}, allow_remote_code=allow_remote_code)
    for i, spec in enumerate(grid.methods):
        where = f"methods[{i}]."
        check_sections(runs, {**spec.overrides, "method": spec.options}, where, allow_remote_code)
        for key in (spec.tune.space if spec.tune else {}):
            if key in CODE_FLAGS or key in PATH_FIELDS or key == "init_from":
                raise Refused(f"{where}tune.space.{key}: the board does not search over paths or code flags")
    _check_default_tracking(runs, [grid.report, *(m.overrides.get("report") for m in grid.methods)])
    for i, task in enumerate(grid.tasks):
        check_sections(runs, {"data": {"task": task.task, "train": task.train, "eval": task.eval}}, f"tasks[{i}].")
