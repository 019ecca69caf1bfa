"""Data-to-text and text-to-SQL benchmarks in their release formats: E2E CSV, DART JSON/XML,
WebNLG XML, Spider JSON (+ tables.json schemas).

Instructions and input layouts match the uniform slices under ../shared/data (e2e, dart, webnlg,
spider), so a model trained on one reads the other identically.
"""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.data.formats.base import (
    BadRecord,
    LoadOptions,
    LoadReport,
    convert_records,
    distinct,
    items,
    json_records,
    obj,
    read_json,
    read_text,
    text,
)
from tunelab.errors import DataError

E2E_INSTRUCTION = ("Write a short restaurant description in English that expresses every attribute of the "
                   "following meaning representation.")
TRIPLES_INSTRUCTION = ("Write one or more fluent English sentences that describe all of the following "
                       "subject | predicate | object triples.")
SQL_INSTRUCTION = "Write a SQLite SQL query that answers the question over the given database schema."


def csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs of a CSV file; quoting errors name the line."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise DataError("empty CSV file (no header row)", path=str(path), line=1)
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"expected {len(header)} columns ({', '.join(header)}), got {len(row)}",
                                path=str(path), line=reader.line_num)
            rows.append((reader.line_num, dict(zip(header, row, strict=True))))
    except csv.Error as exc:
        raise DataError(f"invalid CSV: {exc}", path=str(path), line=reader.line_num) from None
    return header, rows


def load_e2e(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """The E2E NLG challenge CSV (``mr,ref``): one example per (meaning representation, reference)."""
    header, rows = csv_rows(path)
    missing = [c for c in ("mr", "ref") if c not in header]
    if missing:
        raise DataError(f"E2E CSV needs columns mr,ref; found {', '.join(header)}", path=str(path), line=1,
                        field=missing[0])

    def convert(row: dict[str, str], line: int) -> Example:
        if not row["mr"].strip():
            raise BadRecord("empty meaning representation", "mr")
        return Example(id=f"{path.stem}-{line}", task="e2e", instruction=E2E_INSTRUCTION, input=row["mr"],
                       output=row["ref"], references=(row["ref"],))

    return convert_records(rows, convert, path=path, unit="line", opts=opts, report=report)


def _triples_input(triples: list[list[str]]) -> str:
    return " ; ".join(" | ".join(t) for t in triples)


def dart_example(record: Any, where: int, *, stem: str) -> Example:
    """``{tripleset: [[s, p, o]], annotations: [{source, text}]}``; all annotations are references."""
    triples = items(record, "tripleset")
    if not triples or not all(isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t)
                              for t in triples):
        raise BadRecord("expected a non-empty list of [subject, predicate, object] strings", "tripleset")
    refs = distinct(text(a, "text") for a in items(record, "annotations"))
    if not refs:
        raise BadRecord("no non-empty annotation text", "annotations")
    sources = sorted({a.get("source") for a in obj(record)["annotations"] if isinstance(a.get("source"), str)})
    return Example(id=f"{stem}-{where}", task="dart", instruction=TRIPLES_INSTRUCTION, input=_triples_input(triples),
                   output=refs[0], references=refs, meta={"triples": triples, "sources": sources})


def load_dart_json(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """DART's release JSON (a list of tripleset/annotations entries)."""
    return convert_records(json_records(path, read_json(path)), lambda r, i: dart_example(r, i, stem=path.stem),
                           path=path, unit="record", opts=opts, report=report)


def _clean(node: str) -> str:
    """WebNLG writes DBpedia names with underscores (Olive_oil); the shared slices use spaces."""
    return node.replace("_", " ").strip()


def rdf_entry_example(entry: ET.Element, where: int, *, stem: str, task: str) -> Example:
    """One ``<entry>``: ``modifiedtripleset/mtriple`` ("s | p | o") and ``lex`` references."""
    triples = []
    for node in entry.iter("mtriple"):
        parts = [p.strip() for p in (node.text or "").split("|")]
        if len(parts) != 3:
            raise BadRecord(f"expected 'subject | predicate | object', got {node.text!r}", "mtriple")
        triples.append(parts)
    if not triples:
        raise BadRecord("entry has no modifiedtripleset/mtriple", "mtriple")
    refs = distinct((lex.text or "").strip() for lex in entry.iter("lex"))
    if not refs:
        raise BadRecord("entry has no non-empty lex", "lex")
    shown = [[_clean(x) for x in t] for t in triples]
    meta = {"triples": triples, "category": entry.get("category", ""), "eid": entry.get("eid", "")}
    return Example(id=f"{stem}-{entry.get('eid') or where}", task=task, instruction=TRIPLES_INSTRUCTION,
                   input=_triples_input(shown), output=refs[0], references=refs, meta=meta)


def load_rdf_xml(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """WebNLG (and DART's XML release): ``<benchmark><entries><entry>`` with triples and ``lex`` texts."""
    try:
        root = ET.fromstring(read_text(path).encode("utf-8"))
    except ET.ParseError as exc:
        raise DataError(f"invalid XML: {exc}", path=str(path), line=exc.position[0]) from None
    entries = list(root.iter("entry"))
    if root.tag != "benchmark" or not entries:
        raise DataError("expected a WebNLG/DART <benchmark> with <entry> elements", path=str(path), field="entry")
    task = "dart" if path.stem.startswith("dart") else "webnlg"
    return convert_records(enumerate(entries), lambda e, i: rdf_entry_example(e, i, stem=path.stem, task=task),
                           path=path, unit="entry", opts=opts, report=report)


def spider_schema(table: dict[str, Any]) -> str:
    """``table(col, col) ; table(col)`` from a tables.json entry (original names, as SQL uses them)."""
    names = table["table_names_original"]
    columns: list[list[str]] = [[] for _ in names]
    for pair in table["column_names_original"]:
        index, name = pair
        if isinstance(index, int) and 0 <= index < len(names):
            columns[index].append(str(name))
    return " ; ".join(f"{t}({', '.join(cols)})" for t, cols in zip(names, columns, strict=True))


def load_spider_tables(path: str | Path) -> dict[str, str]:
    """db_id -> rendered schema, from Spider's tables.json."""
    path = Path(path)
    out = {}
    for i, table in json_records(path, read_json(path)):
        try:
            db_id = text(table, "db_id")
            for key in ("table_names_original", "column_names_original"):
                if not isinstance(items(table, key), list):
                    raise BadRecord("expected a list", key)
            out[db_id] = spider_schema(table)
        except BadRecord as exc:
            raise DataError(f"record {i}: {exc.message}", path=str(path), field=exc.field) from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"record {i}: malformed schema ({exc})", path=str(path),
                            field="column_names_original") from None
    return out


def _tables_file(path: Path, opts: LoadOptions) -> Path:
    if opts.tables:
        return Path(opts.tables)
    candidates = sorted(path.parent.glob("tables*.json"))
    if not candidates:
        raise DataError("Spider questions need the database schemas: put tables.json beside the file or pass "
                        "--tables PATH", path=str(path))
    return candidates[0]


def load_spider(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """Spider's ``dev.json``/``train_spider.json`` (question, query, db_id) with schemas from tables.json."""
    schemas = load_spider_tables(_tables_file(path, opts))

    def convert(record: Any, where: int) -> Example:
        db_id = text(record, "db_id")
        if db_id not in schemas:
            raise BadRecord(f"database {db_id!r} is not in the tables file", "db_id")
        question = text(record, "question")
        return Example(id=f"{path.stem}-{where}", task="spider", instruction=SQL_INSTRUCTION,
                       input=f"Database: {db_id}\nSchema: {schemas[db_id]}\nQuestion: {question}",
                       output=text(record, "query"), meta={"db_id": db_id})

    return convert_records(json_records(path, read_json(path)), convert, path=path, unit="record", opts=opts,
                           report=report)
