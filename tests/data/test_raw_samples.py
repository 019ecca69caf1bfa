"""Every native-format sample under ../shared/data/raw loads, and round-trips through `data convert`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import SHARED, shared_path

from tunelab.data import load_examples, load_jsonl
from tunelab.data.formats import detect, load_any
from tunelab.data.formats.d2t import load_spider_tables
from tunelab.data.formats.templates import PromptTemplate, load_templates
from tunelab.errors import DataError

RAW = SHARED / "raw"
# Files that hold no examples of their own: each is read by its own loader (and load_any says so).
AUXILIARY = {"tables_sample.json", "templates.yaml", "templates_index.jsonl"}
# (file, format, examples) — counts from each PROVENANCE.md (Super-NI: instances in the file).
EXPECTED = [
    ("alpaca/alpaca_data_sample.json", "alpaca", 300),
    ("dart/dart-v1.1.1-dev-sample.json", "dart", 300),
    ("dart/dart-v1.1.1-dev-sample.xml", "rdf_xml", 300),
    ("e2e/trainset_sample.csv", "e2e", 300),
    ("mt_bench/question.jsonl", "mt_bench", 80),
    ("mt_bench/reference_answer_gpt-4.jsonl", "mt_bench_answers", 30),
    ("sharegpt/dummy_conversation_sample.json", "sharegpt", 300),
    ("sharegpt/glaive_toolcall_en_demo.json", "sharegpt", 300),
    ("spider/dev_sample.json", "spider", 300),
    ("super_ni/tasks/task1146_country_capital.json", "super_ni", 231),
    ("super_ni/tasks/task1452_location_entity_extraction_btc_corpus.json", "super_ni", 175),
    ("super_ni/tasks/task1585_root09_hypernym_generation.json", "super_ni", 563),
    ("super_ni/tasks/task181_outcome_extraction.json", "super_ni", 423),
    ("super_ni/tasks/task927_yelp_negative_to_positive_style_transfer.json", "super_ni", 493),
    ("webnlg/1triple_allSolutions_Airport_train_challenge.xml", "rdf_xml", 301),
    ("webnlg/3triples_Food_train_challenge.xml", "rdf_xml", 314),
    ("wizardlm/WizardLM_testset.jsonl", "wizardlm", 218),
]


def _data_files() -> list[str]:
    if not RAW.is_dir():
        return []
    return sorted(str(p.relative_to(RAW)) for p in RAW.rglob("*")
                  if p.is_file() and p.suffix != ".md" and p.name not in AUXILIARY)


def test_expected_list_covers_every_raw_data_file():
    shared_path("raw")
    assert sorted(name for name, _, _ in EXPECTED) == _data_files()


@pytest.mark.parametrize("name, fmt, count", EXPECTED, ids=[e[0].split("/")[-1] for e in EXPECTED])
def test_raw_sample_loads_and_round_trips(tmp_path, name, fmt, count):
    path = shared_path("raw", name)
    assert detect(path) == fmt
    examples = load_any(path)
    assert len(examples) == count
    assert all(e.output or e.meta.get("no_reference") for e in examples)
    assert len({e.id for e in examples}) == count  # ids are unique within a file
    out = tmp_path / "out.jsonl"
    from typer.testing import CliRunner

    from tunelab.cli import app

    result = CliRunner().invoke(app, ["data", "convert", str(path), "--to", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {count} examples" in result.output
    assert detect(out) == "uniform"
    assert load_examples(out) == examples  # every field but meta compares equal
    assert [e.meta for e in load_jsonl(out)] == [json.loads(json.dumps(e.meta)) for e in examples]


def test_native_rows_match_the_uniform_slices():
    """The native loaders lay out instruction/input exactly like the shared uniform slices."""
    for raw, uniform in [("alpaca/alpaca_data_sample.json", "alpaca/train.jsonl"),
                         ("e2e/trainset_sample.csv", "e2e/train.jsonl"),
                         ("spider/dev_sample.json", "spider/train.jsonl")]:
        native = load_any(shared_path("raw", raw))
        sliced = {(e.instruction, e.input, e.output) for e in load_jsonl(shared_path(uniform))}
        assert all((e.instruction, e.input, e.output) in sliced for e in native), raw
    # Super-NI: 'plain' encoding reproduces super_ni/train.jsonl rows (same ids, instruction, references).
    native = {e.id: e for e in load_any(shared_path("raw", "super_ni", "tasks", "task1146_country_capital.json"))}
    sliced = [e for e in load_jsonl(shared_path("super_ni", "train.jsonl")) if e.task == "task1146_country_capital"]
    assert len(sliced) == 154
    for e in sliced:
        assert (native[e.id].instruction, native[e.id].input, native[e.id].references) == \
            (e.instruction, e.input, e.references)


def test_sharegpt_tool_calls_become_assistant_and_tool_turns():
    examples = load_any(shared_path("raw", "sharegpt", "glaive_toolcall_en_demo.json"))
    first = examples[0].messages
    assert first[0]["role"] == "system" and "search_recipes" in first[0]["content"]
    roles = [m["role"] for m in first[1:]]
    assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert first[4]["content"].startswith('{"name": "search_recipes"')


def test_mt_bench_questions_join_reference_answers():
    examples = {e.id: e for e in load_any(shared_path("raw", "mt_bench", "question.jsonl"))}
    with_answers = [e for e in examples.values() if e.messages]
    # 30 answered by the GPT-4 reference file, 10 more carry a `reference` in question.jsonl itself, of
    # which question 133's first reference is blank (so it stays a prompt without a reference).
    assert len(with_answers) == 39 and len(examples) == 80
    assert examples["mt_bench-133"].meta["no_reference"]
    assert [m["role"] for m in examples["mt_bench-101"].messages] == ["user", "assistant", "user", "assistant"]
    # A blank second reference answer ends the conversation after the first answered turn.
    assert [m["role"] for m in examples["mt_bench-142"].messages] == ["user", "assistant"]
    assert sum(bool(e.meta.get("no_reference")) for e in examples.values()) == 41


def test_auxiliary_files_load_with_their_own_readers():
    tables = shared_path("raw", "spider", "tables_sample.json")
    schemas = load_spider_tables(tables)
    assert len(schemas) == 9
    with pytest.raises(DataError, match="tables.json"):
        load_any(tables)
    index = load_templates(shared_path("raw", "promptsource", "templates_index.jsonl"))
    assert len(index) == 2085 and all(isinstance(t, PromptTemplate) for t in index)
    with pytest.raises(DataError, match="--templates"):
        load_any(shared_path("raw", "promptsource", "templates_index.jsonl"))


def test_every_promptsource_templates_file_parses_and_compiles():
    files = sorted(shared_path("raw", "promptsource", "templates").rglob("templates.yaml"))
    assert len(files) == 279
    total = sum(len(load_templates(f)) for f in files)  # load_templates compiles every Jinja template
    assert total == 2085  # the flattened index has one row per template


def test_p3_templates_apply_to_real_e2e_rows():
    """promptsource's e2e_nlg_cleaned templates on the E2E CSV (columns renamed to the HF dataset's)."""
    templates = shared_path("raw", "promptsource", "templates", "e2e_nlg_cleaned", "templates.yaml")
    from tunelab.data.formats import LoadReport

    report = LoadReport()
    examples = load_any(shared_path("raw", "e2e", "trainset_sample.csv"), templates=str(templates), report=report,
                        rename={"mr": "meaning_representation", "ref": "human_reference"})
    by_template: dict[str, list] = {}
    for e in examples:
        by_template.setdefault(e.meta["template"], []).append(e)
    assert len(by_template) == 12
    assert len(by_template["generate_gramatically_correct_text"]) == 300  # applies to every row
    first = by_template["generate_gramatically_correct_text"][0]
    assert first.instruction.startswith("Combine all of the following data into a concise and grammatically")
    assert "name : Browns Cambridge" in first.instruction and "near : Crowne Plaza Hotel" in first.instruction
    assert first.output.startswith("The Browns Cambridge is a Chinese coffee shop")
    # Templates that skip rows (no 'food' attribute, ...) are counted, never silently dropped.
    skipped = sum(report.notes.values())
    assert len(examples) + skipped == 300 * 12


def test_raw_directory_is_never_copied_into_the_repo():
    repo = Path(__file__).resolve().parents[2]
    assert not list(repo.glob("tests/**/alpaca_data_sample.json"))
