"""Loader for tunelab's uniform JSONL schema (``id, instruction, input, output[, references, task, options,
messages, meta]``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.errors import DataError

REQUIRED = ("instruction", "output")
STRING_FIELDS = ("id", "task", "instruction", "input", "output")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; malformed JSON names its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=str(path),
                                line=lineno) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON: {exc.msg} at column {exc.colno}", path=str(path),
                                line=lineno) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=str(path),
                                line=lineno)
            yield lineno, obj


def example_from_row(row: dict[str, Any], *, task: str, default_id: str, path: str | None = None,
                     line: int | None = None) -> Example:
    """Validate one uniform-schema row and convert it; errors name path, line and field."""

    def fail(msg: str, fld: str) -> DataError:
        return DataError(msg, path=path, line=line, field=fld)

    for key in REQUIRED:
        if key not in row:
            raise fail("missing required field", key)
    for key in STRING_FIELDS:
        if key in row and not isinstance(row[key], str):
            raise fail(f"expected a string, got {type(row[key]).__name__}", key)
    refs = row.get("references", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise fail("expected a list of strings", "references")
    options = row.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise fail("expected a list of strings", "options")
    messages = row.get("messages", [])
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise fail("expected a list of {role, content} string objects", "messages")
    meta = row.get("meta", {})
    if not isinstance(meta, dict):
        raise fail("expected an object", "meta")
    if not row["output"].strip() and not refs:
        meta = {**meta, "no_reference": True}
    return Example(id=row.get("id") or default_id, task=row.get("task") or task,
                   instruction=row["instruction"], input=row.get("input", ""), output=row["output"],
                   references=tuple(refs), options=tuple(options),
                   messages=tuple({"role": m["role"], "content": m["content"]} for m in messages), meta=meta)


def load_jsonl(path: str | Path, task: str | None = None) -> list[Example]:
    """Load and validate every row of a uniform-schema JSONL file."""
    path = Path(path)
    task = task or path.parent.name or path.stem
    return [example_from_row(row, task=task, default_id=f"{path.stem}-{lineno}", path=str(path), line=lineno)
            for lineno, row in read_jsonl(path)]
