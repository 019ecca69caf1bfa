"""A broken adapter directory is one line and exit 2 from `tunelab eval --adapter`, never a traceback,
and a local directory is never looked up on the hub (``methods.io.check_adapter``)."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

from tunelab.data import load_task
from tunelab.formatting import PromptLayout
from tunelab.methods import METHODS
from tunelab.methods.io import TaskPrompt, load_adapter, save_adapter
from tunelab.methods.prompt_tuning import PromptTuningMethodConfig
from tunelab.modelcard import CardInfo, finish_adapter_dir
from tunelab.models import load_model


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A prompt-tuning adapter on the tiny model, saved as `tunelab run` saves one."""
    model, tok = load_model("tiny", seed=0)
    task = load_task("date_format")
    adapter = METHODS["prompt_tuning"].build(model, tok, PromptTuningMethodConfig(num_virtual_tokens=3),
                                             task.train[:4], 0)
    directory = tmp_path_factory.mktemp("adapters") / "good"
    directory.mkdir()
    save_adapter(adapter, directory, "tiny", PromptLayout().resolved(tok), task=TaskPrompt.shared_by(task.train))
    finish_adapter_dir(directory, CardInfo("tiny", "prompt_tuning", "date_format", {}, {}, 4, 0, "", {}, {}))
    return directory


def _copy(good: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(good, target)
    return target


def _eval(adapter: Path, monkeypatch, capsys, *extra: str) -> tuple[int, list[str]]:
    """`tunelab eval --adapter ADAPTER` as a user runs it (the CLI's main, which turns errors into one line),
    with every network connection refused."""
    from tunelab.cli import main

    def no_network(*_args, **_kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(sys, "argv", ["tunelab", "eval", "--adapter", str(adapter), "--data", "date_format",
                                      "--max-eval", "1", "--max-new-tokens", "2", "--resamples", "10", "-q", *extra])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return int(exited.value.code or 0), (out.out + out.err).strip().splitlines()


def test_the_good_adapter_evaluates(good, monkeypatch, capsys):
    """The control: the same command on the intact adapter succeeds."""
    code, lines = _eval(good, monkeypatch, capsys)
    assert code == 0 and any("exact_match" in line for line in lines), lines


def test_missing_peft_config_is_one_line_and_never_reaches_the_hub(good, tmp_path, monkeypatch, capsys):
    broken = _copy(good, tmp_path, "noconf")
    (broken / "adapter_config.json").unlink()
    monkeypatch.chdir(tmp_path)  # a relative name looks like a hub repo id to peft
    code, lines = _eval(Path("noconf"), monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "adapter_config.json" in lines[0] and "noconf" in lines[0]


def test_missing_metadata_is_one_line(good, tmp_path, monkeypatch, capsys):
    broken = _copy(good, tmp_path, "nometa")
    (broken / "tunelab_adapter.json").unlink()
    code, lines = _eval(broken, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and "tunelab_adapter.json" in lines[0], lines


def test_truncated_safetensors_is_one_line(good, tmp_path, monkeypatch, capsys):
    broken = _copy(good, tmp_path, "trunc")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, lines = _eval(broken, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "adapter_model.safetensors" in lines[0] and "truncated" in lines[0]


def test_unparsable_peft_config_is_one_line(good, tmp_path, monkeypatch, capsys):
    broken = _copy(good, tmp_path, "badconf")
    (broken / "adapter_config.json").write_text('{"peft_type": ')
    code, lines = _eval(broken, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "adapter_config.json" in lines[0] and "JSON" in lines[0]


def test_metadata_naming_another_base_model_is_one_line_naming_both(good, wide_model, tmp_path, monkeypatch,
                                                                    capsys):
    """Trained on tiny (16 wide), but its metadata names another model: without --model that model loads, and
    the weights are refused before any forward pass (which failed with a tensor size mismatch)."""
    broken = _copy(good, tmp_path, "other")
    meta = json.loads((broken / "tunelab_adapter.json").read_text())
    (broken / "tunelab_adapter.json").write_text(json.dumps({**meta, "base_model": str(wide_model)}))
    code, lines = _eval(broken, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "'tiny'" in lines[0] and str(wide_model) in lines[0], lines
    assert "token_dim=16" in lines[0] and "token_dim=32" in lines[0], lines


def test_task_prompt_is_saved_and_old_adapters_still_load(good, tmp_path):
    model, _ = load_model("tiny", seed=0)
    loaded = load_adapter(good, model, base_model="tiny")
    assert loaded.task == TaskPrompt("Rewrite the date in the form 'Month D, YYYY'.")
    old = _copy(good, tmp_path, "old")
    meta = json.loads((old / "tunelab_adapter.json").read_text())
    del meta["task_prompt"]
    (old / "tunelab_adapter.json").write_text(json.dumps(meta))
    assert load_adapter(old, load_model("tiny", seed=0)[0], base_model="tiny").task is None
