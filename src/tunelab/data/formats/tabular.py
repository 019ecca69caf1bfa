"""Generic rows (CSV, JSONL, JSON array, Parquet, any Hugging Face dataset) mapped onto Example
fields by a column mapping, or fed through prompt templates.

A mapping names, for each Example field, the source column: ``{"instruction": "question",
"output": "answer"}``. A value in quotes is literal text: ``instruction='"Answer the question."'``.
Unmapped fields default to a column of the same name when there is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.data.formats.base import (
    BadRecord,
    LoadOptions,
    LoadReport,
    convert_records,
    json_records,
    jsonl_records,
    obj,
    read_json,
    scalar_text,
)
from tunelab.data.formats.d2t import csv_rows
from tunelab.data.formats.templates import (
    PromptTemplate,
    flan_examples,
    load_templates,
    promptsource_examples,
    select,
)
from tunelab.errors import ConfigError, DataError

FIELDS = ("id", "task", "instruction", "input", "output", "references", "options")
LIST_FIELDS = ("references", "options")


def parse_mapping(spec: str | None) -> dict[str, str]:
    """``"instruction=question,output=answer"`` -> dict; keys must be Example fields."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"--map entry {part!r} must look like field=column (e.g. output=answer)")
        if key not in FIELDS:
            raise ConfigError(f"--map field {key!r} is not an Example field; use one of {', '.join(FIELDS)}")
        out[key] = value
    return out


def _literal(spec: str) -> str | None:
    if len(spec) >= 2 and spec[0] == spec[-1] and spec[0] in "\"'":
        return spec[1:-1]
    return None


def _column(row: dict[str, Any], field: str, spec: str) -> Any:
    literal = _literal(spec)
    if literal is not None:
        return literal
    if spec not in row:
        raise BadRecord(f"column {spec!r} (mapped to {field}) is missing; row has {', '.join(map(str, row))}", spec)
    return row[spec]


def mapped_example(record: Any, where: int, mapping: Mapping[str, str], *, stem: str) -> Example:
    """One row -> Example through ``mapping`` (plus same-named columns for unmapped fields)."""
    row = obj(record)
    spec = {f: f for f in FIELDS if f in row} | dict(mapping)
    for required in ("instruction", "output"):
        if required not in spec:
            raise BadRecord(f"no column for '{required}': pass a mapping such as --map {required}=COLUMN "
                            f"(columns: {', '.join(map(str, row))})", required)
    values: dict[str, Any] = {}
    for name, source in spec.items():
        value = _column(row, name, source)
        if name in LIST_FIELDS:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadRecord(f"expected a list of strings for {name}", source)
            values[name] = tuple(value)
        else:
            values[name] = scalar_text(value, source)
    values.setdefault("id", f"{stem}-{where}")
    values["id"] = values["id"] or f"{stem}-{where}"
    values["task"] = values.get("task") or stem
    return Example(**values)


def read_rows(path: Path) -> tuple[list[tuple[int, Any]], str]:
    """Rows of a CSV/TSV, JSONL, JSON array or Parquet file, and the position unit ('line'/'record')."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return csv_rows(path)[1], "line"
    if suffix == ".jsonl":
        return jsonl_records(path, strict=False), "line"
    if suffix == ".json":
        return json_records(path, read_json(path)), "record"
    if suffix == ".parquet":
        return list(enumerate(_parquet(path))), "record"
    raise DataError(f"cannot read rows from {suffix or 'a file without extension'!r}; use .csv, .jsonl, .json "
                    "or .parquet", path=str(path))


def _parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError("file not found", path=str(path))
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read Parquet: {exc}", path=str(path)) from None


def rows_to_examples(rows: list[tuple[int, Any]], unit: str, path: Path, opts: LoadOptions,
                     report: LoadReport, stem: str) -> list[Example]:
    """Rows through templates (``opts.templates``) or through the column mapping."""
    if opts.templates:
        templates = select(load_templates(opts.templates), opts.template)
        rows = [(w, _renamed(r, opts.rename)) for w, r in rows]
        if isinstance(templates[0], PromptTemplate):
            convert = lambda r, i: promptsource_examples(templates, r, i, stem=stem, seed=opts.seed,  # noqa: E731
                                                         report=report)
        else:
            convert = lambda r, i: flan_examples(templates, r, i, stem=stem, seed=opts.seed,  # noqa: E731
                                                 every=opts.template == "all")
    else:
        convert = lambda r, i: mapped_example(r, i, opts.mapping, stem=stem)  # noqa: E731
    return convert_records(rows, convert, path=path, unit=unit, opts=opts, report=report)


def parse_rename(spec: str | None) -> dict[str, str]:
    """``"mr=meaning_representation,ref=human_reference"`` -> {source column: new name}."""
    out = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        old, sep, new = (x.strip() for x in part.partition("="))
        if not sep or not old or not new:
            raise ConfigError(f"--rename entry {part!r} must look like column=new_name")
        out[old] = new
    return out


def _renamed(row: Any, rename: Mapping[str, str]) -> Any:
    """Columns renamed to the names a template expects (``mr`` -> ``meaning_representation``)."""
    if not isinstance(row, dict) or not rename:
        return row
    return {rename.get(k, k): v for k, v in row.items()}


def load_table(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """Any CSV/JSONL/JSON/Parquet file of rows, via the column mapping or templates."""
    rows, unit = read_rows(path)
    return rows_to_examples(rows, unit, path, opts, report, stem=path.stem)


def load_hf(name: str | Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """Any dataset ``datasets`` can open: a saved dataset directory, local data files, or a hub name
    (needs network; set HF_HUB_OFFLINE=0). Rows go through the mapping or templates."""
    import datasets

    name = str(name).removeprefix("hf:")
    try:
        if (Path(name) / "dataset_info.json").is_file() or (Path(name) / "state.json").is_file():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[opts.split]
        else:
            ds = datasets.load_dataset(name, opts.subset, split=opts.split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (network, hub, format); report one line
        raise DataError(f"cannot load Hugging Face dataset {name!r} (subset={opts.subset}, split={opts.split}): "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    rows = list(enumerate(ds))
    stem = Path(name).name or name
    return rows_to_examples(rows, "record", Path(name), opts, report, stem=stem)
