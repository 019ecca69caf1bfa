"""Super-NI task files and Tk-Instruct encodings."""

from __future__ import annotations

import pytest
from tests.conftest import shared_path

from tunelab.data.formats import load_any
from tunelab.data.formats.super_ni import SniEncoding, apply_encoding, load_task_rows, render_instruction
from tunelab.data.jsonl import load_jsonl
from tunelab.errors import ConfigError

POS = [{"input": "United States", "output": "Washington", "explanation": "Washington is the capital"},
       {"input": "India", "output": "New Delhi", "explanation": "New Delhi is the capital of India."}]
NEG = [{"input": "France", "output": "Rome", "explanation": "Rome is not the capital of France."}]


@pytest.mark.parametrize("spec, parsed", [
    ("plain", SniEncoding(plain=True)), ("def", SniEncoding()), ("def+pos2", SniEncoding(pos=2)),
    ("pos4", SniEncoding(definition=False, pos=4)),
    ("def+pos2+neg2+expl", SniEncoding(pos=2, neg=2, explanation=True)),
])
def test_encoding_names_round_trip(spec, parsed):
    assert SniEncoding.parse(spec) == parsed and str(parsed) == spec


@pytest.mark.parametrize("spec", ["", "defpos", "def+pos", "neg2+def", "def+pos2+nonsense"])
def test_bad_encoding_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="def\\+pos2"):
        SniEncoding.parse(spec)


def test_tk_instruct_layout_definition_positive_negative_explanations():
    text = render_instruction("Return the capital city", POS, NEG, SniEncoding.parse("def+pos2+neg1+expl"))
    assert text == ("Definition: Return the capital city.\n\n"
                    "Positive Example 1 -\nInput: United States.\nOutput: Washington.\n"
                    "Explanation: Washington is the capital.\n\n"
                    "Positive Example 2 -\nInput: India.\nOutput: New Delhi.\n"
                    "Explanation: New Delhi is the capital of India.\n\n"
                    "Negative Example 1 -\nInput: France.\nOutput: Rome.\nExplanation: Rome is not the capital of France.")
    assert "Explanation" not in render_instruction("d", POS, NEG, SniEncoding.parse("def+pos2+neg1"))
    assert render_instruction("Return it", POS, NEG, SniEncoding.parse("plain")) == "Return it"
    # asking for more demonstrations than the task has uses what there is
    assert render_instruction("d", POS, NEG, SniEncoding(pos=5)).count("Positive Example") == 2


def test_task_file_encodings_and_references():
    path = shared_path("raw", "super_ni", "tasks", "task1146_country_capital.json")
    plain = load_any(path)
    assert plain[0].instruction.startswith("In this task, you are given a country name")
    assert plain[0].task == "task1146_country_capital" and plain[0].references == ("Kabul",)
    tk = load_any(path, sni_encoding="def+pos2")
    assert tk[0].instruction.startswith("Definition: In this task") and "Positive Example 2 -\nInput: India." in \
        tk[0].instruction
    assert [e.input for e in tk] == [e.input for e in plain]


def test_several_gold_outputs_become_references():
    path = shared_path("raw", "super_ni", "tasks", "task927_yelp_negative_to_positive_style_transfer.json")
    examples = load_any(path)
    assert len(examples) == 493 and all(len(e.references) == 4 for e in examples)  # 4 rewrites per instance
    assert all(e.output == e.references[0] for e in examples)


def test_unseen_task_protocol_rerenders_shared_rows():
    tasks = load_task_rows(shared_path("super_ni", "tasks.jsonl"))
    assert len(tasks) == 30
    rows = load_jsonl(shared_path("super_ni", "eval.jsonl"))[:50]
    encoded = apply_encoding(rows, tasks, "def+pos2")
    assert all(e.instruction.startswith("Definition: ") and "Positive Example 2 -" in e.instruction for e in encoded)
    assert [e.input for e in encoded] == [e.input for e in rows]
    assert apply_encoding(rows, tasks, "plain") == rows  # plain = the shared rows' own instruction


def test_shared_slices_load_with_a_tk_encoding():
    from tunelab.data import load_task

    task = load_task(str(shared_path("super_ni")), sni_encoding="def+pos2+expl")
    assert len(task.train) == 5871 and len(task.eval) == 2935
    assert all(e.instruction.startswith("Definition: ") and "Explanation: " in e.instruction for e in task.eval[:20])
