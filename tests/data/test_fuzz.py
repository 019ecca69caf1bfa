"""Fuzzing every loader: arbitrary bytes, arbitrary JSON and near-miss records give rows or the
library's own DataError/ConfigError, never a traceback from deep inside."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.example import Example
from tunelab.data.formats import FORMATS, LoadReport, load_any
from tunelab.data.formats.templates import load_templates
from tunelab.errors import TunelabError

SUFFIX = {"uniform": ".jsonl", "alpaca": ".json", "dolly": ".jsonl", "unnatural": ".jsonl", "wizardlm": ".jsonl",
          "super_ni": ".json", "sharegpt": ".json", "openai": ".jsonl", "mt_bench": ".jsonl",
          "mt_bench_answers": ".jsonl", "e2e": ".csv", "dart": ".json", "rdf_xml": ".xml", "spider": ".json",
          "table": ".csv"}
# Keys each format reads, so generated records reach the record-level code and not only the type checks.
KEYS = ["instruction", "input", "output", "context", "response", "category", "instances", "constraints",
        "reformulations", "instruction_with_input", "Instruction", "Skill", "idx", "conversations", "from", "value",
        "tools", "system", "messages", "role", "content", "tool_calls", "type", "text", "question_id", "turns",
        "reference", "choices", "model_id", "tripleset", "annotations", "source", "db_id", "question", "query",
        "Definition", "Positive Examples", "Negative Examples", "Instances", "id", "explanation", "references",
        "options", "meta", "task"]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20) | \
    st.sampled_from(["human", "gpt", "user", "assistant", "tool", "function_call", "None", "a | b | c", ""])
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=6),
                           max_leaves=25)
records = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8)


def _check(path: Path, **options) -> list[Example] | None:
    """Rows, or None when the library raised its own error; anything else fails the test."""
    try:
        rows = load_any(path, **options)
    except TunelabError:
        return None
    assert isinstance(rows, list) and all(isinstance(r, Example) for r in rows)
    for r in rows:  # what loads must also serialise to the uniform schema
        json.dumps(r.to_dict(), default=str)
    return rows


@contextmanager
def _file(data: bytes, suffix: str):
    """``data`` written to a fresh directory that also holds a Spider tables.json."""
    with tempfile.TemporaryDirectory(prefix="tunelab-fuzz-") as directory:
        (Path(directory) / "tables.json").write_text(json.dumps([{
            "db_id": "d", "table_names_original": ["t"], "column_names_original": [[-1, "*"], [0, "c"]]}]))
        path = Path(directory) / f"data{suffix}"
        path.write_bytes(data)
        yield path


def _encode(rows: list, suffix: str) -> bytes:
    return ("".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)).encode()


# Valid records of each format (non-blank text everywhere), so fuzzing reaches the record code.
word = st.text(alphabet="abc xyz.?", min_size=1, max_size=12).filter(str.strip)
words = st.lists(word, min_size=1, max_size=3)
VALID = {
    "uniform": st.fixed_dictionaries({"instruction": word, "input": word, "output": word, "references": words,
                                      "options": words}),
    "alpaca": st.fixed_dictionaries({"instruction": word, "input": word, "output": word}),
    "dolly": st.fixed_dictionaries({"instruction": word, "context": word, "response": word, "category": word}),
    "unnatural": st.fixed_dictionaries({
        "instruction": word, "instances": st.lists(st.fixed_dictionaries({
            "instruction_with_input": word, "input": word, "constraints": word, "output": word}), min_size=1, max_size=2),
        "reformulations": st.lists(st.fixed_dictionaries({"instruction": word, "input": word, "output": word}),
                                   max_size=2)}),
    "wizardlm": st.fixed_dictionaries({"idx": st.integers(0, 999), "Skill": word, "Difficulty": st.integers(1, 9),
                                       "Instruction": word}),
    "sharegpt": st.fixed_dictionaries({"id": word, "tools": st.sampled_from(["", "[]", '[{"name": "f"}]']),
                                       "conversations": st.lists(st.fixed_dictionaries({
                                           "from": st.sampled_from(["human", "user", "observation", "system"]),
                                           "value": word}), max_size=3).map(
                                           lambda turns: turns + [{"from": "gpt", "value": "ok"}])}),
    "openai": st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "tool", "developer"]),
        "content": word | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": word}), max_size=2)}),
        max_size=3).map(lambda m: m + [{"role": "assistant", "content": "ok"}])}),
    "mt_bench": st.fixed_dictionaries({"question_id": st.integers(0, 999), "category": word, "turns": words,
                                       "reference": words}),
    "mt_bench_answers": st.fixed_dictionaries({"question_id": st.integers(0, 999), "model_id": word,
                                               "choices": st.lists(st.fixed_dictionaries({"turns": words}),
                                                                   min_size=1, max_size=2)}),
    "dart": st.fixed_dictionaries({"tripleset": st.lists(st.lists(word, min_size=3, max_size=3), min_size=1,
                                                         max_size=3),
                                   "annotations": st.lists(st.fixed_dictionaries({"source": word, "text": word}),
                                                           min_size=1, max_size=2)}),
    "spider": st.fixed_dictionaries({"db_id": st.just("d"), "question": word, "query": word}),
}


def _mutate(record: dict, key_index: int, value, delete: bool) -> dict:
    """Delete one key, or replace its value (at top level or one list item down) with arbitrary JSON."""
    keys = sorted(record)
    key = keys[key_index % len(keys)]
    out = dict(record)
    if delete:
        del out[key]
    elif isinstance(out[key], list) and out[key] and isinstance(out[key][0], dict):
        inner = dict(out[key][0])
        inner[sorted(inner)[key_index % len(inner)]] = value
        out[key] = [inner, *out[key][1:]]
    else:
        out[key] = value
    return out


@pytest.mark.parametrize("fmt", sorted(VALID))
@SETTINGS
@given(data=st.data())
def test_valid_records_always_load(fmt, data):
    rows = data.draw(st.lists(VALID[fmt], min_size=1, max_size=3))
    with _file(_encode(rows, SUFFIX[fmt]), SUFFIX[fmt]) as path:
        loaded = _check(path, format=fmt)
        assert loaded is not None and len(loaded) >= len(rows)
        if fmt not in ("mt_bench_answers",):  # (answers alone look like uniform rows to detection: not asserted)
            assert _check(path) is not None


@pytest.mark.parametrize("fmt", sorted(VALID))
@SETTINGS
@given(data=st.data())
def test_mutated_records_load_or_fail_cleanly(fmt, data):
    rows = data.draw(st.lists(VALID[fmt], min_size=1, max_size=3))
    bad = data.draw(st.integers(0, len(rows) - 1))
    rows[bad] = _mutate(rows[bad], data.draw(st.integers(0, 20)), data.draw(json_values), data.draw(st.booleans()))
    with _file(_encode(rows, SUFFIX[fmt]), SUFFIX[fmt]) as path:
        strict = _check(path, format=fmt)
        report = LoadReport()
        try:
            lenient = load_any(path, format=fmt, skip_bad=True, report=report)
        except TunelabError:
            return  # a whole-file problem (e.g. detection) is still the library's own error
        # skip_bad never loses a record silently: either it loaded or it is counted
        assert len(report.skipped) <= 1 and (strict is None) == bool(report.skipped)
        assert len(lenient) >= len(rows) - 1


@pytest.mark.parametrize("fmt", sorted(SUFFIX))
@SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(fmt, data):
    with _file(data, SUFFIX[fmt]) as path:
        _check(path, format=fmt, mapping={"instruction": "a", "output": "b"} if fmt == "table" else {})


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".xml", ".parquet", ".yaml", ".txt"])
@SETTINGS
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_with_detection(suffix, data):
    with _file(data, suffix) as path:
        _check(path)


@pytest.mark.parametrize("fmt", sorted(f for f, s in SUFFIX.items() if s in (".json", ".jsonl")))
@SETTINGS
@given(value=json_values, rows=st.lists(records, max_size=4))
def test_arbitrary_json_and_records(fmt, value, rows):
    suffix = SUFFIX[fmt]
    with _file(json.dumps(value).encode(), suffix) as path:
        _check(path, format=fmt)
    with _file(_encode(rows, suffix), suffix) as path:
        _check(path, format=fmt)
        _check(path, format=fmt, skip_bad=True)
        _check(path)  # detection too


@SETTINGS
@given(instances=st.lists(st.fixed_dictionaries({"id": word, "input": word, "output": words}), max_size=3),
       demo=records, mutation=st.tuples(st.integers(0, 20), json_values, st.booleans()))
def test_super_ni_task_objects(instances, demo, mutation):
    if instances:
        instances[0] = _mutate(instances[0], *mutation)
    task = {"Definition": ["d"], "Positive Examples": [demo], "Negative Examples": [], "Instances": instances}
    with _file(json.dumps(task).encode(), ".json") as path:
        _check(path, format="super_ni", sni_encoding="def+pos1+expl")


@SETTINGS
@given(entries=st.lists(st.tuples(st.text(max_size=15) | st.just("a | b | c"), st.text(max_size=15)), max_size=4))
def test_rdf_xml_entries(entries):
    from xml.sax.saxutils import escape

    body = "".join(f"<entry eid='Id{i}'><modifiedtripleset><mtriple>{escape(t)}</mtriple></modifiedtripleset>"
                   f"<lex>{escape(lex)}</lex></entry>" for i, (t, lex) in enumerate(entries))
    with _file(f"<benchmark><entries>{body}</entries></benchmark>".encode(), ".xml") as path:
        _check(path)


@pytest.mark.parametrize("suffix", [".yaml", ".jsonl", ".json"])
@SETTINGS
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_template_files(suffix, data):
    with _file(data, suffix) as path, suppress(TunelabError):
        load_templates(path)


@SETTINGS
@given(jinja=st.text(max_size=40) | st.sampled_from(["{{a}} ||| {{b}}", "{{ a.b }} ||| x", "{% for %}",
                                                      "{{ answer_choices[label] }} ||| {{a}}", "{{ a|length }}|||y"]),
       row=st.dictionaries(st.sampled_from(["a", "b", "label"]), json_values, max_size=3))
def test_promptsource_templates_on_arbitrary_rows(jinja, row):
    spec = {"dataset": "d", "templates": {"t": {"jinja": jinja, "name": "t", "answer_choices": "x ||| y"}}}
    with _file(json.dumps(spec).encode(), ".yaml") as templates:
        rows = templates.parent / "rows.jsonl"
        rows.write_text(json.dumps(row) + "\n")
        _check(rows, templates=str(templates))


@SETTINGS
@given(prompt=st.text(max_size=30) | st.sampled_from(["{a}", "{a.b}", "{0}", "{options_}", "{a!r}", "{"]),
       row=st.dictionaries(st.sampled_from(["a", "output", "options"]), json_values, max_size=3))
def test_flan_templates_on_arbitrary_rows(prompt, row):
    with _file(json.dumps([[prompt, "{output}"]]).encode(), ".json") as templates:
        rows = templates.parent / "rows.jsonl"
        rows.write_text(json.dumps(row) + "\n")
        _check(rows, templates=str(templates))


def test_every_format_is_fuzzed():
    assert set(SUFFIX) | {"hf", "spider_tables", "sni_tasks", "templates"} == set(FORMATS)
