"""Prompt templates applied to dataset rows: promptsource (P3) ``templates.yaml`` and Flan-style
templates with an OPTIONS list.

promptsource (Bach et al. 2022): each template is Jinja whose output is split on ``|||`` into prompt
and target; ``answer_choices`` is Jinja too, split on ``|||``. Rendering follows promptsource's
``Template.apply``: a sandboxed environment with ``zip``/``choice``/``most_frequent``, ``|||`` inside
row values escaped, parts stripped. A template that yields no target for a row (its own conditions
exclude the row) produces no example; those rows are counted in the load report.

Flan 2021 (Wei et al. 2022, §2): ``(prompt, target)`` pairs of Python format strings; classification
rows carry an options list that Flan renders as ``OPTIONS:\\n- a\\n- b`` where the template says
``{options_}``. Here the options go into ``Example.options`` and tunelab's ``render_body`` prints
them after the instruction in exactly that form, so rank classification can score them.
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml
from jinja2.sandbox import SandboxedEnvironment

from tunelab.data.example import Example
from tunelab.data.formats.base import BadRecord, LoadReport, jsonl_records, read_text
from tunelab.errors import DataError

PIPE_ESCAPE = "3ed2dface8203c4c9dfb1a5dc58e41e0||"  # promptsource's stand-in for '|||' inside values
TEXT_VAR_LENGTH = 2048  # promptsource truncates every substituted variable to this many characters


@dataclass(frozen=True)
class PromptTemplate:
    """One promptsource template."""

    id: str
    name: str
    dataset: str
    subset: str | None
    jinja: str
    answer_choices: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def task(self) -> str:
        return f"{self.dataset}/{self.subset}" if self.subset else self.dataset


@dataclass(frozen=True)
class FlanTemplate:
    """One Flan ``(prompt, target)`` pair of format strings."""

    prompt: str
    target: str
    name: str = ""


class _TemplateLoader(yaml.SafeLoader):
    """Safe YAML plus promptsource's two tags, read as plain mappings (no promptsource code runs)."""


for _tag in ("!Template", "!TemplateMetadata"):
    _TemplateLoader.add_constructor(_tag, lambda loader, node: loader.construct_mapping(node, deep=True))


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("|||", PIPE_ESCAPE)
    if isinstance(value, list):
        return [_escape(v) for v in value]
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    return value


def _most_frequent(items: Sequence[Any]) -> Any:
    return Counter(items).most_common(1)[0][0]


ENV = SandboxedEnvironment(loader=jinja2.BaseLoader())
ENV.globals.update(zip=zip, most_frequent=_most_frequent)


def _promptsource_file(path: Path, data: Any) -> list[PromptTemplate]:
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict):
        raise DataError("expected a promptsource templates.yaml (dataset, subset, templates: {id: !Template})",
                        path=str(path), field="templates")
    out = []
    for key, t in data["templates"].items():
        if not isinstance(t, dict) or not isinstance(t.get("jinja"), str):
            raise DataError(f"template {key}: expected a mapping with a 'jinja' string", path=str(path),
                            field="jinja")
        choices = t.get("answer_choices")
        out.append(PromptTemplate(id=str(t.get("id", key)), name=str(t.get("name", key)),
                                  dataset=str(data.get("dataset", path.parent.name)), subset=data.get("subset"),
                                  jinja=t["jinja"], answer_choices=choices if isinstance(choices, str) else None,
                                  metadata=dict(t["metadata"]) if isinstance(t.get("metadata"), dict) else {}))
    return out


def _index_rows(path: Path) -> list[PromptTemplate]:
    out = []
    for line, row in jsonl_records(path):
        if not isinstance(row, dict) or not isinstance(row.get("jinja"), str):
            raise DataError("expected a template object with a 'jinja' string", path=str(path), line=line,
                            field="jinja")
        choices = row.get("answer_choices")
        out.append(PromptTemplate(id=str(row.get("template_id", line)), name=str(row.get("name", line)),
                                  dataset=str(row.get("dataset", "")), subset=row.get("subset"), jinja=row["jinja"],
                                  answer_choices=choices if isinstance(choices, str) else None,
                                  metadata={k: row[k] for k in ("metrics", "original_task", "choices_in_prompt",
                                                                "languages") if k in row}))
    return out


def _flan_file(path: Path, data: Any) -> list[FlanTemplate]:
    pairs = data.get("templates") if isinstance(data, dict) else data
    if not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs):
        raise DataError("expected Flan templates: a list of [prompt, target] format-string pairs", path=str(path),
                        field="templates")
    return [FlanTemplate(p, t, name=f"flan{k}") for k, (p, t) in enumerate(pairs)]


def load_templates(path: str | Path) -> list[PromptTemplate] | list[FlanTemplate]:
    """Templates from a promptsource ``templates.yaml``, promptsource's flattened ``templates_index.jsonl``,
    or a Flan file (YAML/JSON ``templates: [[prompt, target], ...]``). Every Jinja template is compiled."""
    path = Path(path)
    if path.suffix == ".jsonl":
        templates: list = _index_rows(path)
    else:
        try:
            data = yaml.load(read_text(path), Loader=_TemplateLoader)  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError as exc:
            raise DataError(f"invalid YAML: {exc}", path=str(path)) from None
        is_flan = isinstance(data, list) or (isinstance(data, dict) and isinstance(data.get("templates"), list))
        templates = _flan_file(path, data) if is_flan else _promptsource_file(path, data)
    for t in templates:
        if isinstance(t, PromptTemplate):
            try:
                ENV.parse(t.jinja)
                if t.answer_choices:
                    ENV.parse(t.answer_choices)
            except jinja2.TemplateSyntaxError as exc:
                raise DataError(f"template {t.name!r}: Jinja syntax error at line {exc.lineno}: {exc.message}",
                                path=str(path), field="jinja") from None
    return templates


def select(templates: Sequence[Any], name: str | None) -> list[Any]:
    """All templates, or those whose name or id equals ``name`` (an unknown name lists the valid ones)."""
    if not name or name == "all":
        return list(templates)
    chosen = [t for t in templates if name in (t.name, getattr(t, "id", None))]
    if not chosen:
        raise DataError(f"no template named {name!r}; available: {', '.join(t.name for t in templates)}",
                        field="template")
    return chosen


@functools.lru_cache(maxsize=4096)
def _compiled(source: str) -> tuple[jinja2.Template, frozenset[str]]:
    """Compiling is ~100x the cost of rendering; a dataset renders the same few templates many times."""
    return ENV.from_string(source), frozenset(jinja2.meta.find_undeclared_variables(ENV.parse(source)))


def _render(source: str, row: dict[str, Any], rng: random.Random) -> str:
    return _compiled(source)[0].render(**row, choice=rng.choice)


def render_promptsource(template: PromptTemplate, row: dict[str, Any], seed: str = "0") -> list[str]:
    """promptsource's ``Template.apply``: [prompt] or [prompt, target], stripped, pipes restored."""
    return _apply(template, row, seed)[0]


def _apply(template: PromptTemplate, row: dict[str, Any], seed: str) -> tuple[list[str], list[str]]:
    """(rendered parts, answer choices) of one row."""
    missing = _compiled(template.jinja)[1] - set(row) - set(ENV.globals) - {"answer_choices", "choice"}
    if missing:
        raise BadRecord(f"template {template.name!r} needs column(s) {', '.join(sorted(missing))}; "
                        f"row has {', '.join(sorted(row)) or 'none'}", sorted(missing)[0])
    rng = random.Random(f"{seed}:{template.id}")
    values = {k: (v[:TEXT_VAR_LENGTH] if isinstance(v, str) else v) for k, v in _escape(row).items()}
    choices = answer_choices(template, values, rng)
    try:
        rendered = _render(template.jinja, {**values, "answer_choices": choices}, rng)
    except jinja2.TemplateError as exc:
        raise BadRecord(f"template {template.name!r} failed on this row: {exc}", "jinja") from None
    return [part.replace(PIPE_ESCAPE, "|||").strip() for part in rendered.split("|||")], choices


def answer_choices(template: PromptTemplate, row: dict[str, Any], rng: random.Random | None = None) -> list[str]:
    """The template's answer choices for this row (they may depend on the row)."""
    if not template.answer_choices:
        return []
    try:
        rendered = _render(template.answer_choices, row, rng or random.Random(0))
        # (answer choices are rendered from the escaped row, so '|||' inside values cannot split them)
    except jinja2.TemplateError as exc:
        raise BadRecord(f"template {template.name!r}: answer_choices failed on this row: {exc}",
                        "answer_choices") from None
    return [c.replace(PIPE_ESCAPE, "|||").strip() for c in rendered.split("|||")]


def promptsource_examples(templates: Sequence[PromptTemplate], row: Any, where: int, *, stem: str, seed: int,
                          report: LoadReport) -> list[Example]:
    """Every template applied to one row; rows a template excludes are counted, not errors."""
    if not isinstance(row, dict):
        raise BadRecord(f"expected an object, got {type(row).__name__}")
    out = []
    for t in templates:
        parts, choices = _apply(t, row, seed=f"{seed}:{where}")
        if len(parts) < 2 or not parts[1]:
            report.note(f"rows not applicable to template '{t.name}'")
            continue
        meta: dict[str, Any] = {"template": t.name, "template_id": t.id}
        if choices:
            meta["answer_choices"] = choices
        out.append(Example(id=f"{stem}-{where}-{t.id[:8]}", task=t.task, instruction=parts[0],
                           output=parts[1], references=tuple(p for p in parts[1:] if p), meta=meta))
    return out


FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _format(source: str, values: dict[str, Any], name: str) -> str:
    """``str.format`` restricted to plain field names (no attribute or index access into values)."""
    fields = [f for _, f, _, _ in string.Formatter().parse(source) if f is not None]
    for f in fields:
        if not FIELD_RE.match(f):
            raise BadRecord(f"Flan template {name}: field {{{f}}} must be a plain column name", "templates")
        if f not in values:
            raise BadRecord(f"Flan template {name} needs column {f!r}; row has {', '.join(sorted(values))}", f)
    return source.format(**values)


def flan_examples(templates: Sequence[FlanTemplate], row: Any, where: int, *, stem: str, seed: int,
                  every: bool) -> list[Example]:
    """One seeded template per row (Flan's default), or every template with ``every``."""
    if not isinstance(row, dict):
        raise BadRecord(f"expected an object, got {type(row).__name__}")
    options = row.get("options", [])
    if isinstance(options, str):
        options = [o for o in options.split("|||") if o.strip()]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise BadRecord("expected a list of strings", "options")
    values = {**{k: v for k, v in row.items() if isinstance(k, str)}, "options_": ""}
    chosen = templates if every else [random.Random(f"{seed}:{where}").choice(list(templates))]
    out = []
    for t in chosen:
        prompt = _format(t.prompt, values, t.name).strip()
        target = _format(t.target, values, t.name).strip()
        out.append(Example(id=f"{stem}-{where}-{t.name}", task=stem, instruction=prompt, output=target,
                           options=tuple(o.strip() for o in options), meta={"template": t.name}))
    return out
