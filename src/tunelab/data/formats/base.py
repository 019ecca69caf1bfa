"""What every native-format loader shares: options, the skip-bad report, file readers, field checks.

A loader is a pure function ``(path, LoadOptions, LoadReport) -> list[Example]``: it reads the file,
converts each record with a small ``record -> Example(s)`` function and never writes anything.
Record functions raise ``BadRecord(message, field)``; ``convert_records`` turns that into one
``DataError`` naming the file, the line or record index and the field, or, with ``skip_bad``,
counts it in the report. Nothing is dropped without a count.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """How to read one source; every field has a default that suits the sample files."""

    format: str | None = None  # force a format (tunelab.data.formats.FORMATS); None = detect
    mapping: Mapping[str, str] = field(default_factory=dict)  # Example field -> source column ('"text"' = literal)
    rename: Mapping[str, str] = field(default_factory=dict)  # source column -> name a template expects
    skip_bad: bool = False  # skip malformed records and count them instead of stopping
    templates: str | None = None  # promptsource templates.yaml / Flan templates file applied to the rows
    template: str | None = None  # one template name or id (default: every template)
    sni_encoding: str = "plain"  # Super-NI: "plain" (Definition as-is, like super_ni/*.jsonl) or Tk-Instruct's
    # "def", "def+pos2", "def+pos2+neg2+expl", ...
    reformulations: bool = True  # Unnatural Instructions: also emit the paraphrased instructions
    tables: str | None = None  # Spider tables.json (default: tables*.json beside the file)
    split: str = "train"  # Hugging Face datasets split
    subset: str | None = None  # Hugging Face datasets configuration name
    seed: int = 0  # template choice (Flan: one template per row) is seeded


@dataclass
class LoadReport:
    """Counts of one load: rows kept, records skipped (with their errors), rows without a target."""

    path: str = ""
    format: str = ""
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] = self.notes.get(what, 0) + n

    def summary(self) -> str:
        extra = "".join(f", {n} {what}" for what, n in sorted(self.notes.items()))
        return f"{self.path}: {self.loaded} examples ({self.format}), {len(self.skipped)} skipped{extra}"


class BadRecord(Exception):
    """Raised inside a record function; ``convert_records`` adds the file and position."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


def record_error(path: str | Path, where: int | None, unit: str, message: str,
                 field: str | None = None) -> DataError:
    """A DataError at ``path:line`` (unit 'line') or ``path: <unit> N`` (e.g. 'record 3', 0-based)."""
    if unit == "line":
        return DataError(message, path=str(path), line=where, field=field)
    prefix = f"{unit} {where}: " if where is not None else ""
    return DataError(prefix + message, path=str(path), field=field)


Converter = Callable[[Any, int], Example | list[Example] | None]


def convert_records(records: Iterable[tuple[int, Any]], convert: Converter, *, path: str | Path, unit: str,
                    opts: LoadOptions, report: LoadReport) -> list[Example]:
    """Apply ``convert`` to each (position, record); a bad record raises, or is counted with skip_bad.

    ``convert`` may return None for a record that legitimately yields nothing (a template that does
    not apply); those are counted in ``report.notes`` by the caller.
    """
    out: list[Example] = []
    for where, record in records:
        try:
            if isinstance(record, InvalidJSON):
                raise BadRecord(record.message)
            result = convert(record, where)
        except BadRecord as exc:
            error = record_error(path, where, unit, exc.message, exc.field)
        except DataError as exc:  # already located (the uniform-schema validator names path and line)
            error = exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
            # A structure the record function did not anticipate: still one located, readable error.
            error = record_error(path, where, unit, f"malformed record ({type(exc).__name__}: {exc})")
        else:
            if result is not None:
                out.extend(result if isinstance(result, list) else [result])
            continue
        if not opts.skip_bad:
            raise error from None
        report.skipped.append(str(error))
    report.loaded += len(out)
    if report.skipped:
        log.warning("%s; first: %s", report.summary(), report.skipped[0])
    return out


def read_text(path: str | Path) -> str:
    """The whole file as UTF-8 text (a BOM is dropped); a missing or binary file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=str(path), line=line) from None


def read_json(path: str | Path) -> Any:
    """Parse a whole JSON file; syntax errors name the line and column."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} at column {exc.colno}", path=str(path), line=exc.lineno) from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply", path=str(path)) from None


def json_records(path: str | Path, data: Any, key: str | None = None) -> list[tuple[int, Any]]:
    """(index, record) of a JSON array (or of ``data[key]``); anything else is a DataError."""
    items = data.get(key) if key and isinstance(data, dict) else data
    if not isinstance(items, list):
        what = f"'{key}' to be" if key else "the file to hold"
        raise DataError(f"expected {what} a JSON array of records, got {type(items).__name__}", path=str(path),
                        field=key)
    return list(enumerate(items))


@dataclass(frozen=True)
class InvalidJSON:
    """A JSONL line that does not parse; ``convert_records`` reports it like any bad record."""

    message: str


def jsonl_records(path: str | Path, strict: bool = True) -> list[tuple[int, Any]]:
    """(line number, value) for each non-blank line. Invalid JSON raises a DataError naming the line,
    or with ``strict=False`` becomes an ``InvalidJSON`` value so ``--skip-bad`` can count it."""
    out: list[tuple[int, Any]] = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            message = f"invalid JSON: {exc.msg} at column {exc.colno}"
        except RecursionError:
            message = "invalid JSON: nested too deeply"
        else:
            continue
        if strict:
            raise DataError(message, path=str(path), line=lineno)
        out.append((lineno, InvalidJSON(message)))
    return out


def obj(record: Any) -> dict[str, Any]:
    """The record as a JSON object, or BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    return record


def text(record: Any, key: str, *, required: bool = True, default: str = "") -> str:
    """A string field; missing optional fields and nulls give ``default``."""
    row = obj(record)
    if key not in row or (row[key] is None and not required):
        if required:
            raise BadRecord("missing required field", key)
        return default
    value = row[key]
    if not isinstance(value, str):
        raise BadRecord(f"expected a string, got {type(value).__name__}", key)
    return value


def items(record: Any, key: str, *, required: bool = True) -> list[Any]:
    """A list field (missing optional lists give [])."""
    row = obj(record)
    if key not in row or (row[key] is None and not required):
        if required:
            raise BadRecord("missing required field", key)
        return []
    value = row[key]
    if not isinstance(value, list):
        raise BadRecord(f"expected a list, got {type(value).__name__}", key)
    return value


def strings(record: Any, key: str, *, required: bool = True) -> list[str]:
    """A list of strings, or a single string promoted to a one-item list."""
    row = obj(record)
    if isinstance(row.get(key), str):
        return [row[key]]
    values = items(record, key, required=required)
    if not all(isinstance(v, str) for v in values):
        raise BadRecord("expected a list of strings", key)
    return values


def distinct(values: Iterable[str]) -> tuple[str, ...]:
    """Unique non-empty values in first-seen order."""
    return tuple(dict.fromkeys(v for v in values if v.strip()))


def scalar_text(value: Any, key: str) -> str:
    """A cell of a table/dataset row as text (numbers and booleans allowed, containers not)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    raise BadRecord(f"expected text, got {type(value).__name__}", key)
