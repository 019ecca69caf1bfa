"""Launch-form data: fields generated from the typed config sections, templates, overrides, commands.

The form has one field per field of ``ModelConfig`` / ``DataConfig`` / ``TrainConfig`` /
``EvalConfig`` (the sections a run and a grid share); the YAML editor beside it holds the rest
(a run's ``method``, a grid's ``methods`` / ``tasks`` / axes). A field differing from what the
YAML resolves to becomes a dotted override; the YAML that is saved and launched has them applied,
so the board runs exactly what `tunelab run --config` / `tunelab compare --config` would.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.compare.grid import SECTIONS, list_presets, parse_grid, preset_path
from tunelab.config import RunConfig, apply_overrides, from_dict
from tunelab.errors import ConfigError

RUN_TEMPLATE = {"method": {"name": "prompt_tuning", "num_virtual_tokens": 8},
                "model": {"name": "smollm2-135m"}, "data": {"task": "date_format", "max_eval": 40},
                "train": {"steps": 40, "batch_size": 8}}


@dataclass(frozen=True)
class FieldSpec:
    """One form field: dotted path, value kind (bool | text), the dataclass default, and its type as text."""

    path: str
    kind: str
    default: Any
    type_name: str


def form_fields() -> list[FieldSpec]:
    """Every field of the shared config sections, in declaration order."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            kind = "bool" if hint is bool else "text"
            out.append(FieldSpec(f"{section}.{f.name}", kind, getattr(cls(), f.name), _type_name(hint)))
    return out


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def templates() -> dict[str, str]:
    """Starting points for the YAML editor: every shipped grid preset and a single run."""
    names = sorted(list_presets(), key=lambda n: (n != "quick", n))  # the few-minutes grid first
    out = {f"grid preset: {name}": preset_path(name).read_text() for name in names}
    out["single run"] = yaml.safe_dump(RUN_TEMPLATE, sort_keys=False)
    return out


def parse_yaml(text: str) -> dict[str, Any]:
    """The editor's YAML as a mapping (errors name the problem)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the YAML's top level must be a mapping")
    return raw


def kind_of(raw: dict[str, Any]) -> str:
    """``grid`` when the YAML lists ``methods`` (a `tunelab compare` grid), else ``run``."""
    return "grid" if "methods" in raw else "run"


def field_values(raw: dict[str, Any]) -> dict[str, Any]:
    """What each form field resolves to under this YAML (its value there, else the dataclass default)."""
    values = {}
    for spec in form_fields():
        section, name = spec.path.split(".")
        values[spec.path] = (raw.get(section) or {}).get(name, spec.default)
    return values


def as_text(value: Any) -> str:
    """A value as the form shows it: YAML flow style, empty for None."""
    if value is None:
        return ""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def from_text(text: str | bool | None) -> Any:
    if isinstance(text, bool) or text is None:
        return text
    return yaml.safe_load(text) if text.strip() else None


def shown_values(raw: dict[str, Any]) -> dict[str, Any]:
    """The form's contents for this YAML: a checkbox's bool, else the value as text."""
    return {p: v if isinstance(v, bool) else as_text(v) for p, v in field_values(raw).items()}


def overrides(baseline: dict[str, Any], form: dict[str, Any]) -> list[str]:
    """Dotted overrides (``train.steps=5``) for the fields the user changed from ``baseline`` (what the
    form was filled with from the YAML); untouched fields follow the YAML."""
    out = []
    for path, shown in form.items():
        value = from_text(shown)
        if path in baseline and value != from_text(baseline[path]):
            out.append(f"{path}={'null' if value is None else as_text(value)}")
    return out


def refill(raw: dict[str, Any], baseline: dict[str, Any], form: dict[str, Any]) -> dict[str, Any]:
    """After the YAML changed: untouched fields take its new values, edited ones keep the user's value."""
    fresh = shown_values(raw)
    return {p: fresh[p] if p not in baseline or from_text(form[p]) == from_text(baseline[p]) else form[p]
            for p in form}


def resolved(raw: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The YAML with the form's overrides applied, validated as a grid or a run config."""
    data = apply_overrides(raw, extra)
    if kind_of(data) == "grid":
        parse_grid(data)
    else:
        if isinstance(data.get("method"), str):
            data["method"] = {"name": data["method"]}
        from_dict(RunConfig, data)
    return data


def command(kind: str, config: str | Path, out: str | Path, workers: int = 1, python: bool = False) -> list[str]:
    """The command that runs the saved YAML: the `tunelab` CLI (``python=True``: through this interpreter)."""
    head = [sys.executable, "-m", "tunelab.cli"] if python else ["tunelab"]
    if kind == "grid":
        tail = ["compare", "--config", str(config), "--out", str(out), "--quiet"]
        if workers > 1:
            tail += ["--workers", str(workers)]
    else:
        tail = ["run", "--config", str(config), "--out", str(out), "--quiet"]
    return head + tail


def preview(kind: str, config: str | Path, out: str | Path, workers: int = 1) -> str:
    return shlex.join(command(kind, config, out, workers))


def default_name(raw: dict[str, Any]) -> str:
    if kind_of(raw) == "grid":
        return str(raw.get("name") or "grid")
    method = raw.get("method")
    return f"run-{method.get('name') if isinstance(method, dict) else method or 'run'}"
