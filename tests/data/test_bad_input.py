"""Malformed records: one DataError naming file, line or record, and field; skip_bad counts instead."""

from __future__ import annotations

import json

import pytest

from tunelab.data import load_examples, load_task
from tunelab.data.formats import LoadReport
from tunelab.errors import DataError


def write(path, text):
    path.write_text(text)
    return path


ALPACA_OK = {"instruction": "i", "input": "", "output": "o"}
CASES = [  # (file name, content, expected message fragment, field)
    ("alpaca.json", json.dumps([ALPACA_OK, {"instruction": "i", "input": 3, "output": "o"}]),
     "alpaca.json: record 1: expected a string, got int", "input"),
    ("dolly.jsonl", json.dumps({"instruction": "i", "context": "", "response": "r"}) + "\n"
     + json.dumps({"instruction": "i", "context": ""}) + "\n",
     "dolly.jsonl:2: missing required field", "response"),
    ("sharegpt.json", json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                                  {"conversations": [{"from": "robot", "value": "x"}]}]),
     "sharegpt.json: record 1: conversations[0]: unknown speaker 'robot'", "from"),
    ("sharegpt2.json", json.dumps([{"conversations": [{"from": "human", "value": "only a question"}]}]),
     "sharegpt2.json: record 0: conversation has no assistant turn", "messages"),
    ("openai.jsonl", json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]})
     + "\n", "openai.jsonl:1: messages[1]: content must be text", "content"),
    ("task1_x.json", json.dumps({"Definition": ["d"], "Positive Examples": [], "Negative Examples": [],
                                 "Instances": [{"id": "a", "input": "x", "output": ["y"]},
                                               {"id": "b", "input": "x", "output": []}]}),
     "task1_x.json: instance 1: no non-empty gold output", "output"),
    ("e2e.csv", '"mr","ref"\n"name[A]","A is nice."\n"","empty mr"\n', "e2e.csv:3: empty meaning representation", "mr"),
    ("dart.json", json.dumps([{"tripleset": [["a", "b"]], "annotations": [{"source": "s", "text": "t"}]}]),
     "dart.json: record 0: expected a non-empty list of [subject, predicate, object]", "tripleset"),
    ("webnlg.xml", "<benchmark><entries><entry eid='Id1'><modifiedtripleset><mtriple>a | b | c</mtriple>"
     "</modifiedtripleset><lex>ok</lex></entry><entry eid='Id2'><modifiedtripleset><mtriple>a | b</mtriple>"
     "</modifiedtripleset><lex>x</lex></entry></entries></benchmark>",
     "webnlg.xml: entry 1: expected 'subject | predicate | object'", "mtriple"),
    ("uniform.jsonl", json.dumps({"instruction": "i", "output": "o"}) + "\n" + json.dumps({"instruction": "i"}) + "\n",
     "uniform.jsonl:2: missing required field", "output"),
    ("broken.jsonl", json.dumps({"instruction": "i", "output": "o"}) + "\n{oops\n", "broken.jsonl:2: invalid JSON", None),
]


@pytest.mark.parametrize("name, content, message, field", CASES, ids=[c[0] for c in CASES])
def test_one_error_names_file_position_and_field(tmp_path, name, content, message, field):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert message in str(info.value)
    assert info.value.field == field
    if field:
        assert f"(field '{field}')" in str(info.value)


@pytest.mark.parametrize("name, content, message, field", CASES, ids=[c[0] for c in CASES])
def test_skip_bad_skips_and_counts(tmp_path, name, content, message, field):
    path = write(tmp_path / name, content)
    report = LoadReport()
    rows = load_examples(path, skip_bad=True, report=report)
    assert len(report.skipped) == 1 and message in report.skipped[0]
    assert report.loaded == len(rows)


def test_whole_file_problems_are_one_error_even_with_skip_bad(tmp_path):
    path = write(tmp_path / "a.json", '[{"instruction": "i",\n "output": }]')
    with pytest.raises(DataError, match=r"a.json:2: invalid JSON"):
        load_examples(path, skip_bad=True)
    xml = write(tmp_path / "w.xml", "<benchmark><entries>")
    with pytest.raises(DataError, match="w.xml:1: invalid XML"):
        load_examples(xml)
    binary = tmp_path / "b.json"
    binary.write_bytes(b'[{"a": "\xff"}]')
    with pytest.raises(DataError, match="b.json:1: not UTF-8"):
        load_examples(binary)
    with pytest.raises(DataError, match="file not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_skipped_records_reach_task_data_and_result(tmp_path):
    rows = [{"instruction": "i", "output": str(k)} for k in range(20)] + [{"instruction": "i"}]
    path = write(tmp_path / "mine.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError):
        load_task(str(path))
    task = load_task(str(path), skip_bad=True)
    assert task.skipped == 1 and len(task.train) + len(task.eval) == 20
