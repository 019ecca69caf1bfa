"""Each native format from small hand-written records (layouts as published by each dataset)."""

from __future__ import annotations

import json

import pytest

from tunelab.data import load_examples
from tunelab.data.formats import LoadReport, detect, load_any
from tunelab.errors import ConfigError, DataError


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_dolly_jsonl_is_detected_and_context_becomes_input(tmp_path):
    path = jsonl(tmp_path / "databricks-dolly-15k.jsonl", [
        {"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia ... in 2000.",
         "response": "It started in 2000.", "category": "closed_qa"},
        {"instruction": "Which is a species of fish?", "context": "", "response": "Tope", "category": "classification"}])
    assert detect(path) == "dolly"
    a, b = load_examples(path)
    assert (a.instruction, a.input, a.output, a.task) == ("When did Virgin Australia start operating?",
                                                          "Virgin Australia ... in 2000.", "It started in 2000.",
                                                          "closed_qa")
    assert b.input == "" and b.task == "classification"


def test_unnatural_instructions_core_record_with_reformulations(tmp_path):
    record = {"instruction": "You are given a sentence. Count its words.",
              "instances": [{"instruction_with_input": "...", "input": "I like tea.",
                             "constraints": "The output should be an integer.", "output": "3"},
                            {"instruction_with_input": "...", "input": "Go.", "constraints": "None", "output": "1"}],
              "reformulations": [{"instruction": "How many words are in the sentence {INPUT}?",
                                  "instruction_with_input": "How many words are in 'Hi there'?",
                                  "input": "Hi there", "output": "2"}]}
    path = jsonl(tmp_path / "core_data.jsonl", [record])
    assert detect(path) == "unnatural"
    rows = load_examples(path)
    assert [r.output for r in rows] == ["3", "1", "2"]
    assert rows[0].instruction == "You are given a sentence. Count its words.\nThe output should be an integer."
    assert rows[1].instruction == "You are given a sentence. Count its words."  # 'None' constraint omitted
    assert rows[2].meta["reformulation_of"] == record["instruction"]
    assert len(load_examples(path, reformulations=False)) == 2


def test_openai_messages_jsonl(tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                      {"role": "assistant", "content": None,
                       "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                      {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}])
    assert detect(path) == "openai"
    a, b = load_examples(path)
    assert a.messages[0] == {"role": "system", "content": "Be brief."} and a.output == "4" and a.instruction == "2+2?"
    assert [m["role"] for m in b.messages] == ["user", "assistant", "tool", "assistant"]
    assert '"name": "w"' in b.messages[1]["content"]


def test_alpaca_like_evol_instruct_rows_without_input(tmp_path):
    path = tmp_path / "WizardLM_evol_instruct_70k.json"
    path.write_text(json.dumps([{"instruction": "Explain recursion.", "output": "A function calling itself."}]))
    assert detect(path) == "alpaca"
    (row,) = load_examples(path)
    assert (row.instruction, row.input, row.output) == ("Explain recursion.", "", "A function calling itself.")


def test_generic_csv_with_column_mapping_and_literal_instruction(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer,topic\n"What is 2+2?",4,math\n"Capital of France?",Paris,geo\n')
    assert detect(path) == "table"
    with pytest.raises(DataError, match="--map instruction=COLUMN"):
        load_examples(path)
    rows = load_examples(path, mapping={"instruction": '"Answer briefly."', "input": "question", "output": "answer",
                                        "task": "topic"})
    assert [(r.instruction, r.input, r.output, r.task) for r in rows] == [
        ("Answer briefly.", "What is 2+2?", "4", "math"), ("Answer briefly.", "Capital of France?", "Paris", "geo")]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["Say hi", "Say bye"], "completion": ["hi", "bye"], "n": [1, 2]}), path)
    rows = load_examples(path, mapping={"instruction": "prompt", "output": "completion"})
    assert [(r.instruction, r.output) for r in rows] == [("Say hi", "hi"), ("Say bye", "bye")]


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"q": "1+1", "a": "2"}, {"q": "2+3", "a": "5"}]).save_to_disk(tmp_path / "ds")
    rows = load_any(tmp_path / "ds", mapping={"instruction": '"Add."', "input": "q", "output": "a"})
    assert [(r.input, r.output) for r in rows] == [("1+1", "2"), ("2+3", "5")]


def test_hugging_face_loader_reads_local_data_files(tmp_path):
    data = tmp_path / "hfdata"
    data.mkdir()
    jsonl(data / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    rows = load_any(f"hf:{data}", format="hf", mapping={"instruction": "text", "output": "label"})
    assert [r.output for r in rows] == ["x", "y"]


def test_hub_name_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'surely/not-a-dataset'"):
        load_any("hf:surely/not-a-dataset", format="hf")


def test_flan_templates_with_options(tmp_path):
    # Two of Flan 2021's RTE templates (google-research/FLAN flan/templates.py), as a YAML file.
    templates = tmp_path / "rte_flan.yaml"
    templates.write_text(json.dumps({"templates": [
        ["{premise}\n\nBased on the paragraph above can we conclude that \"{hypothesis}\"?\n\n{options_}", "{answer}"],
        ["{premise}\nCan we infer the following?\n{hypothesis}\n\n{options_}", "{answer}"]]}))
    rows = jsonl(tmp_path / "rte.jsonl", [{"premise": f"P{i}", "hypothesis": f"H{i}", "answer": "yes",
                                           "options": ["yes", "no"]} for i in range(20)])
    one = load_examples(rows, templates=str(templates))
    assert len(one) == 20 and {e.meta["template"] for e in one} == {"flan0", "flan1"}  # seeded choice per row
    assert one == load_examples(rows, templates=str(templates))  # deterministic
    every = load_examples(rows, templates=str(templates), template="all")
    assert len(every) == 40
    first = every[0]
    assert first.instruction == 'P0\n\nBased on the paragraph above can we conclude that "H0"?'
    assert first.options == ("yes", "no") and first.output == "yes"
    from tunelab.formatting import render_body

    assert render_body(first).endswith('"H0"?\n\nOPTIONS:\n- yes\n- no')  # Flan's OPTIONS suffix


def test_flan_template_refuses_attribute_access(tmp_path):
    templates = tmp_path / "t.json"
    templates.write_text(json.dumps([["{premise.__class__}", "{answer}"]]))
    rows = jsonl(tmp_path / "r.jsonl", [{"premise": "p", "answer": "a"}])
    with pytest.raises(DataError, match="plain column name"):
        load_examples(rows, templates=str(templates))


def test_promptsource_template_on_a_glue_rte_row(tmp_path):
    templates = tmp_path / "templates.yaml"
    templates.write_text("""dataset: glue
subset: rte
templates:
  03a7ae07: !Template
    answer_choices: yes ||| no
    id: 03a7ae07
    jinja: '{{sentence1}}

      Does this mean that "{{sentence2}}" is true? {{"A) yes or B) no."}}

      |||

      {{answer_choices[label]}}'
    metadata: !TemplateMetadata
      original_task: true
    name: mean
    reference: ''
""")
    rows = jsonl(tmp_path / "rte.jsonl", [{"sentence1": "A cat sat.", "sentence2": "An animal sat.", "label": 0},
                                          {"sentence1": "x ||| y", "sentence2": "z", "label": 1}])
    a, b = load_examples(rows, templates=str(templates))
    assert a.instruction == 'A cat sat.\nDoes this mean that "An animal sat." is true? A) yes or B) no.'
    assert a.output == "yes" and a.task == "glue/rte" and a.meta["answer_choices"] == ["yes", "no"]
    assert b.instruction.startswith("x ||| y") and b.output == "no"  # '|||' inside a value is not a separator
    bad = jsonl(tmp_path / "bad.jsonl", [{"sentence1": "only one"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: template 'mean' needs column\(s\) label, sentence2"):
        load_examples(bad, templates=str(templates))


def test_spider_needs_its_tables_file(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([{"db_id": "x", "question": "q", "query": "SELECT 1"}]))
    with pytest.raises(DataError, match="--tables"):
        load_examples(path)


def test_unknown_format_and_options_are_config_errors(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(ConfigError, match="unknown data format 'nope'"):
        load_examples(path, format="nope")
    with pytest.raises(ConfigError, match="load option"):
        load_examples(path, colour="red")
    with pytest.raises(ConfigError, match="Super-NI encoding"):
        load_any(path, format="super_ni", sni_encoding="def+pos")


def test_unknown_jsonl_schema_names_the_fix(tmp_path):
    path = jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"odd.jsonl:1: no column for 'instruction'.*--map") as info:
        load_examples(path)
    assert info.value.field == "instruction"
    rows = load_examples(path, mapping={"instruction": "prompt", "output": "completion"})
    assert rows[0].output == "c"


def test_report_counts(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o"}] * 3)
    report = LoadReport()
    load_examples(path, report=report)
    assert (report.loaded, report.format, report.skipped) == (3, "uniform", [])
