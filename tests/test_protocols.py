"""`tunelab eval` and the Super-NI unseen-task protocol, end to end on the tiny model."""

import json

import pytest
from tests.conftest import shared_path
from typer.testing import CliRunner

from tunelab.config import EvalConfig, build_config
from tunelab.errors import ConfigError
from tunelab.protocols import EvalRequest, cap_per_task, run_eval, select_examples

TASKS = ["task1146_country_capital", "task1508_wordnet_antonyms", "task111_asset_sentence_simplification"]


def _subset(tmp_path, split="eval", per_task=2, tasks=TASKS):
    """A few rows of three shared Super-NI tasks, written to a temporary file (never into the repo)."""
    rows = [json.loads(line) for line in shared_path("super_ni", f"{split}.jsonl").read_text().splitlines()]
    keep = [r for t in tasks for r in [r for r in rows if r["task"] == t][:per_task]]
    path = tmp_path / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return path


def _request(tmp_path, **kw) -> EvalRequest:
    return EvalRequest(data=str(_subset(tmp_path)), protocol="super_ni",
                       tasks_file=str(shared_path("super_ni", "tasks.jsonl")), **kw)


def test_super_ni_prompt_is_definition_plus_k_positive_examples(tmp_path):
    examples, info = select_examples(_request(tmp_path, k=2))
    assert len(examples) == 6 and info["encoding"] == "def+pos2"
    for e in examples:
        assert e.instruction.startswith("Definition: ")
        assert "Positive Example 2 -" in e.instruction and "Positive Example 3" not in e.instruction
        assert e.input and e.input not in e.instruction  # the instance comes after, as `Input: ...`
    zero, _ = select_examples(_request(tmp_path, k=0))
    assert all("Positive Example" not in e.instruction for e in zero)


def test_tasks_seen_in_training_are_excluded(tmp_path):
    train = _subset(tmp_path, "train", tasks=TASKS[:1])
    examples, info = select_examples(_request(tmp_path, seen_from=str(train)))
    assert {e.task for e in examples} == set(TASKS[1:])
    assert info["excluded_seen_tasks"] == TASKS[:1]
    with pytest.raises(ConfigError, match="no task is unseen.*--include-seen"):
        select_examples(_request(tmp_path, seen_from=str(shared_path("super_ni", "train.jsonl"))))
    everything, _ = select_examples(_request(tmp_path, seen_from=str(train), include_seen=True))
    assert len(everything) == 6


def test_cap_per_task_keeps_file_order():
    from tunelab.data import Example

    rows = [Example(str(i), "ab"[i % 2], "") for i in range(7)]
    assert [e.id for e in cap_per_task(rows, 2)] == ["0", "1", "2", "3"]
    assert cap_per_task(rows, None) == rows


def test_super_ni_report_per_task_and_averaged(tmp_path):
    report = run_eval(_request(tmp_path, model="tiny", out=str(tmp_path / "out"), n_resamples=200,
                               eval=EvalConfig(max_new_tokens=8)))
    assert set(report.per_task) == set(TASKS)
    assert report.info["termination"]["answers"] == 6  # summed over the 3 tasks' generations
    for name in ("rouge_l", "exact_match"):
        task_mean = sum(t["metrics"][name] for t in report.per_task.values()) / 3
        assert report.metrics[f"{name}_task_mean"] == pytest.approx(task_mean)
        # equal task sizes: the instance average equals the task average
        assert report.metrics[name] == pytest.approx(task_mean)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["per_task"].keys() == report.per_task.keys() and saved["metrics_ci"]["rouge_l"] is not None
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"id", "task", "prediction", "references", "scores"} <= set(rows[0])


@pytest.mark.parametrize("method", [["method.name=prompt_tuning", "method.num_virtual_tokens=2"],
                                    ["method.name=icl", "method.k=2"]], ids=["prompt_tuning", "icl"])
def test_eval_with_adapter_reproduces_the_runs_own_predictions(tmp_path, method):
    """Same weights, template and demonstrations as the run's own evaluation, so the same outputs."""
    from tunelab.run import run

    run(build_config(None, [*method, "model.name=tiny", "data.task=date_format", "train.steps=2",
                            "train.batch_size=2", "data.max_eval=5", f"out={tmp_path / 'run'}"]), progress=False)
    report = run_eval(EvalRequest(data="date_format", adapter=str(tmp_path / "run" / "adapter"), max_eval=5,
                                  n_resamples=100))
    from_run = [json.loads(line)["prediction"]
                for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert report.info["method"] == method[0].split("=")[1] and report.info["model"] == "tiny"
    assert [p["prediction"] for p in report.predictions] == from_run


def test_cli_prints_per_task_table_and_writes_files(tmp_path):
    from tunelab.cli import app

    data = _subset(tmp_path)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", str(data), "--protocol", "super_ni",
                                      "--tasks-file", str(shared_path("super_ni", "tasks.jsonl")), "--k", "1",
                                      "--resamples", "100", "--max-new-tokens", "8", "--out", str(out), "-q"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "per task" in result.output and "task1146_country_capital" in result.output
    assert "95% CI" in result.output
    assert (out / "metrics.json").is_file() and (out / "predictions.jsonl").is_file()


def test_cli_rejects_an_unknown_protocol(tmp_path):
    from tunelab.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", str(_subset(tmp_path)),
                                      "--protocol", "nope"])
    assert isinstance(result.exception, ConfigError) and "super_ni" in str(result.exception)


def test_eval_says_how_many_answers_ran_to_the_token_limit():
    from types import SimpleNamespace

    from rich.console import Console

    from tunelab.commands.eval import print_report

    console = Console(record=True, width=200)
    info = {"protocol": "standard", "model": "tiny", "data": "d", "n_eval": 10, "seconds": 1.0, "load_seconds": 0.5}
    report = SimpleNamespace(info={**info, "termination": {"at_limit": 3, "answers": 10}}, metrics={"bleu": 1.0},
                             metrics_ci={}, per_task={})
    print_report(console, report)
    assert "3 of 10 answers ran to the token limit" in console.export_text()
    print_report(console, SimpleNamespace(**{**vars(report), "info": {**info, "termination": None}}))
    assert console.export_text().count("ran to the token limit") == 0  # export_text cleared the record
