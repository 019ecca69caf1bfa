import json

import pytest
from tests.conftest import shared_path

from tunelab.data import load_jsonl, load_task
from tunelab.errors import DataError


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_valid_rows_load(tmp_path):
    path = write(tmp_path / "t.jsonl", [{"id": "a", "instruction": "I", "input": "x", "output": "y",
                                         "references": ["y", "z"], "unknown_key": 1}, "",
                                        {"instruction": "I", "output": "w"}])
    rows = load_jsonl(path)
    assert [r.id for r in rows] == ["a", "t-3"]
    assert rows[0].targets == ["y", "z"] and rows[1].targets == ["w"]


@pytest.mark.parametrize("bad, line, field", [
    ({"instruction": "I"}, 2, "output"),
    ({"instruction": 3, "output": "o"}, 2, "instruction"),
    ({"instruction": "I", "output": "o", "references": "o"}, 2, "references"),
    ("{not json", 2, None),
    ("[1, 2]", 2, None),
])
def test_malformed_row_names_file_line_field(tmp_path, bad, line, field):
    path = write(tmp_path / "bad.jsonl", [{"instruction": "I", "output": "o"}, bad])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert f"bad.jsonl:{line}:" in message
    if field:
        assert f"field '{field}'" in message


def test_non_utf8_names_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"instruction": "I", "output": "o"}\n\xff\xfe\n')
    with pytest.raises(DataError, match="b.jsonl:2: not UTF-8"):
        load_jsonl(path)


def test_single_file_task_gets_deterministic_holdout(tmp_path):
    path = write(tmp_path / "mine.jsonl", [{"id": str(i), "instruction": "I", "output": str(i)} for i in range(50)])
    a, b = load_task(str(path)), load_task(str(path))
    assert len(a.eval) == 5 and len(a.train) == 45
    assert [e.id for e in a.eval] == [e.id for e in b.eval]
    assert not {e.id for e in a.eval} & {e.id for e in a.train}


def test_shared_task_directory_loads():
    task = load_task(str(shared_path("e2e")))
    assert task.name == "e2e" and len(task.train) == 2000 and len(task.eval) == 300
    assert all(len(e.references) >= 1 for e in task.eval)
    assert "bleu" in task.metrics
