"""What a launch may touch: every path a form or YAML can set stays under the runs folder, and no launch runs
code from a model directory unless the board allows it (``board.confine``, used by ``jobs.start_job``)."""

from __future__ import annotations

import dataclasses
import time
import typing
from pathlib import Path

import pytest
import yaml

pytest.importorskip("pandas", reason="the board's tables are pandas frames: pip install 'tunelab[board]'")

from tunelab.board import confine, forms, jobs  # noqa: E402
from tunelab.compare.grid import SECTIONS  # noqa: E402
from tunelab.config import RunConfig  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402
from tunelab.methods import METHODS  # noqa: E402

RUN = {"method": {"name": "prompt_tuning", "num_virtual_tokens": 4}, "model": {"name": "tiny"},
       "data": {"task": "date_format", "max_eval": 2}, "train": {"steps": 1, "batch_size": 2}}
GRID = {"name": "g", "model": {"name": "tiny"}, "methods": [{"name": "prompt_tuning", "num_virtual_tokens": 4}],
        "tasks": ["date_format"], "seeds": [0], "train": {"steps": 1}}
# text fields of a run config that name no file or folder; a new text field must be classified here or in
# confine.PATH_FIELDS, so a new path setting cannot slip past the board
NOT_PATHS = {"model.dtype", "model.device", "data.template", "data.system_prompt", "data.sni_encoding",
             "train.schedule", "train.precision", "eval.metrics", "eval.precision", "eval.engine", "eval.stop", "report.to", "report.experiment",
             "report.run_name", "method.name", "method.candidates", "method.score", "method.template",
             "method.selection", "method.weights", "method.held_out_tasks", "method.target_modules",
             "method.encoder_type", "method.init", "method.init_text", "method.modules_to_save", "method.method",
             "method.optimizer", "method.init_lora_weights",
             "method.peft_type"}


@pytest.fixture
def place(tmp_path, monkeypatch):
    """(runs folder, a folder beside it that nothing may touch); the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "runs", tmp_path / "outside"


def _with(base: dict, dotted: str, value) -> dict:
    return forms.resolved(base, [f"{dotted}={value}"])


def _text_fields(cls: type, prefix: str) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f"{prefix}{f.name}" for f in dataclasses.fields(cls) if "str" in str(hints[f.name])}


def test_every_text_field_of_a_run_config_is_classified():
    found = {"out"} | {p for s, cls in SECTIONS.items() for p in _text_fields(cls, f"{s}.")}
    for method in METHODS.values():
        found |= _text_fields(method.Config, "method.")
    assert found - set(confine.PATH_FIELDS) - NOT_PATHS == set()
    assert {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS) == {"method", "out"}


@pytest.mark.parametrize("dotted,value", [
    ("out", "../outside/x"), ("out", "{outside}/x"), ("report.dir", "{outside}"), ("report.dir", "~/x"),
    ("data.task", "{outside}/data.jsonl"), ("data.train", "../outside/train.jsonl"), ("data.eval", "/etc/passwd"),
    ("data.mixture", "[runs/ok.jsonl, '{outside}/m.jsonl@2']"), ("method.init_from", "{outside}/run"),
    ("model.name", "{outside}"), ("model.name", "../outside"), ("model.name", "/tmp/model.gguf"),
    ("report.mlflow_uri", "sqlite:///{outside}/mlflow.db"), ("report.mlflow_uri", "http://example.org:5000"),
    ("report.mlflow_uri", "file:{outside}/mlruns"), ("data.task", "runs/link/data.jsonl"),
    ("eval.forgetting_probe", "{outside}/probe.jsonl"),
    ("method", "{{name: peft, peft_type: PROMPT_TUNING, options: {{tokenizer_name_or_path: '{outside}'}}}}")])
def test_a_path_outside_the_runs_folder_is_refused(place, dotted, value):
    runs, outside = place
    (runs / "link").symlink_to(outside, target_is_directory=True)  # a symlink leading out counts as out
    raw = _with(RUN, dotted, value.format(outside=outside))
    with pytest.raises(confine.Refused, match="options" if dotted == "method" else dotted.split(".")[-1]):
        confine.check_launch(runs, raw)
    with pytest.raises(confine.Refused):
        jobs.start_job(runs, raw, "escape")
    assert list(outside.iterdir()) == [] and not (runs / ".board" / "jobs").exists()  # nothing saved or started


def test_paths_under_the_runs_folder_pass(place):
    runs, _ = place
    for dotted, value in [("out", "runs/x"), ("report.dir", str(runs / "t")), ("data.task", "runs/d.jsonl"),
                          ("report.mlflow_uri", "sqlite:///runs/mlflow.db"), ("model.name", "smollm2-135m"),
                          ("model.name", "HuggingFaceTB/SmolLM2-135M"), ("method.init_from", "runs/pt")]:
        confine.check_launch(runs, _with(RUN, dotted, value))


def test_mlflow_s_default_store_counts_when_mlflow_is_on(place, monkeypatch):
    runs, outside = place
    raw = _with(RUN, "report.to", "[mlflow]")
    confine.check_launch(runs, raw)  # the default sqlite:///runs/mlflow.db lies under ./runs
    monkeypatch.chdir(outside)
    with pytest.raises(confine.Refused, match="mlflow_uri"):
        confine.check_launch(runs, raw)


@pytest.mark.parametrize("flag", ["trust_remote_code", "allow_pickle"])
def test_code_flags_need_the_boards_permission(place, flag):
    runs, _ = place
    from_yaml = {**RUN, "model": {"name": "tiny", flag: True}}
    baseline = forms.shown_values(RUN)
    from_form = forms.resolved(RUN, forms.overrides(baseline, {**baseline, f"model.{flag}": True}))  # the checkbox
    from_override = _with(RUN, f"model.{flag}", "true")
    for raw in (from_yaml, from_form, from_override):
        with pytest.raises(confine.Refused, match=f"model.{flag}.*--allow-remote-code"):
            confine.check_launch(runs, raw)
        with pytest.raises(confine.Refused):
            jobs.start_job(runs, raw, "code")
        confine.check_launch(runs, raw, allow_remote_code=True)
    assert not (runs / ".board" / "jobs").exists()


@pytest.mark.parametrize("options", [{"prompt_tuning_init_state_dict_path": "runs/init.pt"},
                                     {"tokenizer_name_or_path": "tiny", "tokenizer_kwargs": {"trust_remote_code": True}}])
def test_peft_options_that_run_code_need_the_boards_permission(place, options):
    """The generic peft method passes peft's own options through: a state dict it torch.loads (a pickle), or
    tokenizer kwargs for AutoTokenizer.from_pretrained."""
    runs, _ = place
    raw = {**RUN, "method": {"name": "peft", "peft_type": "PROMPT_TUNING", "options": options}}
    with pytest.raises(confine.Refused, match="method.options.*--allow-remote-code"):
        confine.check_launch(runs, raw)
    confine.check_launch(runs, raw, allow_remote_code=True)


@pytest.mark.parametrize("change", [
    {"model": {"name": "tiny", "trust_remote_code": True}},
    {"methods": [{"name": "prompt_tuning", "model": {"allow_pickle": True}}]},
    {"methods": [{"name": "lora", "init_from": "{outside}/run"}]},
    {"methods": [{"name": "prompt_tuning", "report": {"dir": "{outside}"}}]},
    {"methods": [{"name": "prompt_tuning", "tune": {"space": {"model.trust_remote_code": [True]}, "trials": 1}}]},
    {"tasks": ["{outside}/task.jsonl"]}, {"tasks": [{"task": "date_format", "train": "{outside}/t.jsonl"}]},
    {"report": {"to": ["mlflow"], "mlflow_uri": "https://example.org"}}, {"data": {"mixture": ["{outside}/m.jsonl"]}}])
def test_every_layer_of_a_grid_is_checked(place, change):
    runs, outside = place
    raw = {**GRID, **yaml.safe_load(yaml.safe_dump(change).replace("{outside}", str(outside)))}
    forms.resolved(raw, [])  # a valid grid
    with pytest.raises(confine.Refused):
        confine.check_launch(runs, raw)
    with pytest.raises(confine.Refused):
        jobs.start_job(runs, raw, "grid")
    assert list(outside.iterdir()) == []


def test_a_job_name_or_jobs_folder_leading_out_is_refused(place):
    runs, outside = place
    (runs / "away").symlink_to(outside, target_is_directory=True)
    with pytest.raises(confine.Refused, match="name"):
        jobs.start_job(runs, RUN, "away")
    (runs / ".board").symlink_to(outside, target_is_directory=True)
    with pytest.raises(confine.Refused, match="jobs folder"):
        jobs.start_job(runs, RUN, "fine")
    assert list(outside.iterdir()) == []


def test_a_job_json_pointing_elsewhere_is_not_followed(place):
    runs, outside = place
    job = jobs.start_job(runs, {**RUN, "data": {"task": "no_such_task"}}, "ok")
    assert [j.id for j in jobs.list_jobs(runs)] == [job.id]
    (outside / "output.log").write_text("secret")
    state = jobs.jobs_dir(runs) / job.id / "job.json"
    state.write_text(state.read_text().replace(str(jobs.jobs_dir(runs) / job.id), str(outside)))
    assert jobs.list_jobs(runs) == []


def test_jobs_do_not_import_from_their_working_directory(place):
    """A `tunelab/` package in the job's working directory (say, written there by an earlier job) is not
    imported in place of tunelab: `python -m` would put the working directory first on sys.path."""
    runs, outside = place
    shadow = runs / "tunelab"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(f"open({str(outside / 'ran')!r}, 'w').close()\n")
    job = jobs.start_job(runs, {**RUN, "data": {"task": "no_such_task"}}, "shadow", cwd=runs)
    deadline = time.monotonic() + 120
    while jobs.is_running(job):
        assert time.monotonic() < deadline, jobs.log_tail(job)
        time.sleep(0.2)
    assert "no_such_task" in jobs.log_tail(job)  # the real tunelab ran
    assert not (outside / "ran").exists()


def test_error_is_one_line(place):
    runs, outside = place
    with pytest.raises(TunelabError) as info:
        confine.check_launch(runs, _with(RUN, "out", str(outside)))
    assert "\n" not in str(info.value) and str(runs.resolve()) in str(info.value)


def test_model_source_keeps_names_and_confines_paths(place):
    runs, outside = place
    (runs / "m").mkdir()
    assert confine.model_source(runs, "tiny") == "tiny"
    assert confine.model_source(runs, "org/model") == "org/model"  # a hub id: not a local path here
    assert confine.model_source(runs, "runs/m") == str((runs / "m").resolve())
    with pytest.raises(confine.Refused):
        confine.model_source(runs, str(outside))


def test_inside_follows_symlinks(place):
    runs, outside = place
    (runs / "link").symlink_to(outside, target_is_directory=True)
    assert confine.inside(runs, runs / "sub" / "x", "p") == (runs / "sub" / "x").resolve()
    for bad in (runs / "link", runs / "link" / "x", runs / ".." / "outside", Path("/tmp/x"), ""):
        with pytest.raises(confine.Refused):
            confine.inside(runs, bad, "p")
