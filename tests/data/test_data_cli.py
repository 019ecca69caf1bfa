"""`tunelab data inspect|convert|formats` as a user runs them."""

from __future__ import annotations

import json

from tests.conftest import shared_path
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.commands.data import histogram

runner = CliRunner()


def test_inspect_prints_counts_histogram_and_three_prompts(tiny):
    path = shared_path("raw", "alpaca", "alpaca_data_sample.json")
    result = runner.invoke(app, ["data", "inspect", str(path), "--model", "tiny", "--prompt-template", "alpaca"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps lines at the terminal width
    assert "300 examples from" in out and "(format: alpaca)" in out
    assert "│ alpaca_data_sample │ 300 │" in out  # the per-task table
    assert "tokens per example (tiny, alpaca layout): min" in out and "longer than 512" in out
    assert out.count("█") > 10
    assert out.count("### Instruction:") == 3  # three rendered prompts


def test_inspect_counts_tasks_of_a_mixture(tiny):
    result = runner.invoke(app, ["data", "inspect", str(shared_path("super_ni", "eval.jsonl")), "--model", "tiny",
                                 "--show", "0"], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "2935 examples" in out and "30 task(s)" in out and "│ task1289_trec_classification │ 100 │" in out


def test_convert_with_mapping_and_skip_bad(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps({"q": "2+2?", "a": "4"}) + "\n" + json.dumps({"q": "no answer"}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["data", "convert", str(src), "--to", str(out), "--map", 'instruction="Answer.",input=q,output=a']
    failed = runner.invoke(app, args)
    assert failed.exit_code != 0 and not out.exists()
    assert "qa.jsonl:2: column 'a' (mapped to output) is missing" in str(failed.exception)
    result = runner.invoke(app, args + ["--skip-bad"])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())
    assert "skipped 1 malformed records" in printed and "wrote 1 examples" in printed
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row == {"id": "qa-1", "task": "qa", "instruction": "Answer.", "input": "2+2?", "output": "4"}


def test_convert_refuses_a_non_jsonl_target(tmp_path):
    result = runner.invoke(app, ["data", "convert", str(shared_path("raw", "e2e", "trainset_sample.csv")),
                                 "--to", str(tmp_path / "out.json")])
    assert result.exit_code != 0 and ".jsonl" in str(result.exception)


def test_formats_lists_every_user_format():
    result = runner.invoke(app, ["data", "formats"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("alpaca", "dolly", "super_ni", "unnatural", "sharegpt", "openai", "e2e", "dart", "rdf_xml",
                 "spider", "table", "hf"):
        assert name in result.output


def test_histogram_bins_and_overflow():
    lines = histogram([1, 2, 3, 4, 5, 100] * 20 + [5000])
    assert lines[0].split()[:2] == ["1-10", "100"] and lines[-1].split()[:2] == [">=101", "1"]
    assert histogram([]) == ["(no examples)"]
