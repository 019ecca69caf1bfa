"""Native dataset formats -> ``Example``: detection by extension and content, one loader per format.

``load_any(path)`` reads any supported file; ``FORMATS`` lists them (``--format`` forces one).
Auxiliary files that hold no examples (Spider's tables.json, promptsource templates, Super-NI
``tasks.jsonl``) are recognised and answered with an error that says how to use them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.data.formats import chat, d2t, instruct, super_ni, tabular
from tunelab.data.formats.base import (
    BadRecord,
    InvalidJSON,
    LoadOptions,
    LoadReport,
    convert_records,
    jsonl_records,
    read_json,
)
from tunelab.data.jsonl import example_from_row
from tunelab.errors import ConfigError, DataError

Loader = Callable[[Path, LoadOptions, LoadReport], list[Example]]


def load_uniform(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """tunelab's own JSONL schema, validated strictly row by row (``tunelab.data.jsonl``).

    With a Super-NI encoding other than 'plain', instructions are re-rendered from the ``tasks.jsonl``
    beside the file (Tk-Instruct's "definition + k positive examples" ... on the shared slices).
    """
    task = path.parent.name or path.stem
    examples = _uniform_rows(path, task, opts, report)
    if super_ni.SniEncoding.parse(opts.sni_encoding).plain:
        return examples
    tasks_file = path.parent / "tasks.jsonl"
    if not tasks_file.is_file():
        raise DataError(f"--sni-encoding {opts.sni_encoding} re-renders Super-NI rows from tasks.jsonl, which is "
                        "not beside this file", path=str(path))
    return super_ni.apply_encoding(examples, super_ni.load_task_rows(tasks_file), opts.sni_encoding)


def _uniform_rows(path: Path, task: str, opts: LoadOptions, report: LoadReport) -> list[Example]:
    return convert_records(
        jsonl_records(path, strict=False),
        lambda row, line: example_from_row(row if isinstance(row, dict) else _not_object(row), task=task,
                                           default_id=f"{path.stem}-{line}", path=str(path), line=line),
        path=path, unit="line", opts=opts, report=report)


def _not_object(row: Any) -> dict:
    raise BadRecord(f"expected a JSON object, got {type(row).__name__}")


def _auxiliary(message: str) -> Loader:
    def refuse(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
        raise DataError(message, path=str(path))

    return refuse


FORMATS: dict[str, tuple[Loader, str]] = {
    "uniform": (load_uniform, "tunelab JSONL: id, instruction, input, output[, references, options, messages]"),
    "alpaca": (instruct.load_alpaca, "Alpaca / Evol-Instruct JSON array of {instruction, input, output}"),
    "dolly": (instruct.load_dolly, "Dolly JSONL {instruction, context, response, category}"),
    "unnatural": (instruct.load_unnatural, "Unnatural Instructions {instruction, instances, reformulations}"),
    "wizardlm": (instruct.load_wizardlm, "WizardLM test set {idx, Skill, Difficulty, Instruction}"),
    "super_ni": (super_ni.load_super_ni, "Super-NaturalInstructions task JSON (Definition, examples, Instances)"),
    "sharegpt": (chat.load_sharegpt, "ShareGPT/Vicuna {conversations: [{from, value}]} (JSON or JSONL)"),
    "openai": (chat.load_openai, "OpenAI chat JSONL {messages: [{role, content}]}"),
    "mt_bench": (chat.load_mt_bench, "MT-Bench question.jsonl (+ reference answers beside it)"),
    "mt_bench_answers": (chat.load_mt_bench_answers, "MT-Bench reference/model answers JSONL"),
    "e2e": (d2t.load_e2e, "E2E NLG CSV (mr, ref)"),
    "dart": (d2t.load_dart_json, "DART JSON (tripleset, annotations)"),
    "rdf_xml": (d2t.load_rdf_xml, "WebNLG / DART XML (<entry> with mtriple and lex)"),
    "spider": (d2t.load_spider, "Spider JSON (question, query, db_id) + tables.json"),
    "table": (tabular.load_table, "any CSV/JSONL/JSON/Parquet rows with --map field=column or --templates"),
    "hf": (tabular.load_hf, "a Hugging Face dataset (name, saved directory or data files) via datasets"),
    "spider_tables": (_auxiliary("this is Spider's tables.json (database schemas, no questions): load the "
                                 "questions file (dev.json) beside it, which reads these schemas"), ""),
    "sni_tasks": (_auxiliary("this is a Super-NI task list (definitions and demonstrations, no instances): "
                             "load train.jsonl/eval.jsonl, or re-render them with "
                             "tunelab.data.formats.super_ni.apply_encoding"), ""),
    "templates": (_auxiliary("these are prompt templates, not data: apply them to rows with "
                             "`tunelab data convert ROWS --templates THIS_FILE` (add --map to rename columns)"), ""),
}


def classify_row(row: dict[str, Any], suffix: str) -> str | None:
    """The format a record's keys imply (first match wins; order matters)."""
    keys = set(row)
    rules = [
        ({"conversations"}, "sharegpt"),
        ({"instruction", "context", "response"}, "dolly"),
        ({"instruction", "instances"}, "unnatural"),
        ({"instruction", "constraints", "output"}, "unnatural"),
        ({"tripleset"}, "dart"),
        ({"db_id", "question", "query"}, "spider"),
        ({"db_id", "table_names_original"}, "spider_tables"),
        ({"question_id", "turns"}, "mt_bench"),
        ({"question_id", "choices"}, "mt_bench_answers"),
        ({"Instruction", "Skill"}, "wizardlm"),
        ({"task", "definition", "positive_examples"}, "sni_tasks"),
        ({"jinja", "template_id"}, "templates"),
        ({"instruction", "output"}, "uniform" if suffix == ".jsonl" else "alpaca"),
        ({"messages"}, "openai"),
    ]
    return next((name for need, name in rules if need <= keys), None)


def _first_object(records: list[Any]) -> dict[str, Any] | None:
    return next((r for r in records if isinstance(r, dict)), None)


def detect(path: str | Path) -> str:
    """The format name of ``path`` (by extension, CSV header, or the keys of the first record)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if str(path).startswith("hf:") or (path.is_dir() and not path.suffix):
        return "hf"
    if suffix == ".xml":
        return "rdf_xml"
    if suffix in (".yaml", ".yml"):
        return "templates"
    if suffix == ".parquet":
        return "table"
    if suffix == ".csv":
        header, _ = d2t.csv_rows(path)
        return "e2e" if {"mr", "ref"} <= set(header) else "table"
    if suffix == ".jsonl":
        records = [r for _, r in jsonl_records(path, strict=False) if not isinstance(r, InvalidJSON)]
        first = _first_object(records)
        return (classify_row(first, suffix) if first else "uniform") or "table"
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            if "Instances" in data or "Definition" in data:
                return "super_ni"
            if "templates" in data:
                return "templates"
        first = _first_object(data) if isinstance(data, list) else None
        return (classify_row(first, suffix) if first else "alpaca") or "table"
    if not path.exists():
        raise DataError("file not found", path=str(path))
    raise DataError(f"unsupported file type {suffix or '(none)'!r}: use .jsonl, .json, .csv, .parquet, .xml, or "
                    f"--format hf for a Hugging Face dataset", path=str(path))


def load_any(path: str | Path, *, report: LoadReport | None = None, **options: Any) -> list[Example]:
    """Load ``path`` in whatever supported format it is; ``options`` are ``LoadOptions`` fields
    (``format``, ``mapping``, ``skip_bad``, ``templates``, ``sni_encoding`` ...). ``report`` receives counts.
    """
    try:
        opts = LoadOptions(**options)
    except TypeError as exc:
        raise ConfigError(f"load option: {exc}") from None
    path = Path(path)
    report = report if report is not None else LoadReport()
    name = opts.format or ("table" if opts.templates or opts.mapping and _generic(path) else detect(path))
    if name not in FORMATS:
        raise ConfigError(f"unknown data format {name!r}; choose one of {', '.join(FORMATS)}")
    report.path, report.format = str(path), name
    return FORMATS[name][0](path, opts, report)


def _generic(path: Path) -> bool:
    """With an explicit --map, unknown-schema files are generic rows (known formats keep their loader)."""
    try:
        return detect(path) in ("table", "uniform", "alpaca")
    except DataError:
        return True


__all__ = ["FORMATS", "LoadOptions", "LoadReport", "detect", "load_any", "classify_row"]
