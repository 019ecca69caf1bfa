"""Bad values stop `run`, `eval`, `serve` and `compare` with one line naming the key, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.config import EvalCommandConfig, ServeConfig, build, build_config, from_dict, to_dict
from tunelab.errors import ConfigError

NO_MODEL = "/nonexistent/model-dir"  # loading it would fail with a different error: proves validation came first


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """``tunelab ARGS`` through ``tunelab.cli.main`` (which turns TunelabError into one line, exit 2)."""
    from tunelab.cli import main

    monkeypatch.setattr(sys, "argv", ["tunelab", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out + out.err


@pytest.mark.parametrize(("args", "line"), [
    (["train.batch_size=0"], "error: train.batch_size: got 0, expected an integer >= 1"),
    (["train.lr=-1"], "error: train.lr: got -1, expected a number > 0"),
    (["train.steps=-3"], "error: train.steps: got -3, expected an integer >= 0"),
    (["--method", "icl", "method.k=-1"], "error: method.k: got -1, expected an integer >= 0"),
    (["--method", "ipt", "method.k=-1"], "error: method.k: got -1, expected an integer >= 1"),
    (["data.template=x"], "error: data.template: got 'x', expected one of auto, chat, alpaca, plain"),
    (["--batch-size", "0"], "error: train.batch_size: got 0, expected an integer >= 1"),
])
def test_run_bad_value_is_one_line_exit_2(capsys, monkeypatch, args, line):
    code, output = cli(capsys, monkeypatch, "run", "--method", "prompt_tuning", "--task", "date_format",
                       "--model", NO_MODEL, *args)
    assert code == 2
    assert output.strip() == line


def test_run_bad_value_from_yaml(capsys, monkeypatch, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: {name: lora, r: 0}\ntrain: {steps: 2}\n")
    code, output = cli(capsys, monkeypatch, "run", "--config", str(path), "--model", NO_MODEL)
    assert code == 2 and output.strip() == "error: method.r: got 0, expected an integer >= 1"


def test_run_as_a_user_types_it():
    """The command of issue 15, in a subprocess: one line, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "run", "--method", "prompt_tuning", "--task",
                           "date_format", "train.batch_size=0"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "error: train.batch_size: got 0, expected an integer >= 1"
    assert "Traceback" not in proc.stderr


def test_compare_grid_sections_and_method_entries_are_validated(capsys, monkeypatch, tmp_path):
    grid = {"name": "g", "methods": [{"name": "icl", "k": 0}], "tasks": ["date_format"], "model": {"name": "tiny"}}
    for change, line in [({"train": {"batch_size": 0}}, "train.batch_size: got 0, expected an integer >= 1"),
                         ({"methods": [{"name": "icl", "k": -1}]}, "methods[0].k: got -1, expected an integer >= 0"),
                         ({"methods": [{"name": "prompt_tuning", "train": {"lr": -1}}]},
                          "methods[0].train.lr: got -1, expected a number > 0")]:
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump({**grid, **change}))
        code, output = cli(capsys, monkeypatch, "compare", "--config", str(path), "--dry-run")
        assert code == 2 and len(output.strip().splitlines()) == 1 and output.strip().endswith(line), output


def test_typed_method_keeps_name_and_options_as_given():
    cfg = build_config(None, ["method.name=ipt", "method.k=2"])
    assert cfg.method_name == "ipt" and cfg.method.k == 2 and cfg.method.num_virtual_tokens == 20
    assert to_dict(cfg)["method"] == {"name": "ipt", "k": 2}
    again = from_dict(type(cfg), to_dict(cfg))  # what compare's runner does with a stored result.json
    assert again.method == cfg.method and to_dict(again) == to_dict(cfg)


def test_rules_inherited_by_a_redeclared_default():
    """LoRA redeclares lr only to change its default; MethodConfig's `lr > 0` still applies."""
    with pytest.raises(ConfigError, match=r"^method.lr: got 0, expected a number > 0$"):
        build_config(None, ["method.name=lora", "method.lr=0"])


# --- tunelab eval: YAML + dotted overrides + flags -------------------------------------------------------

@pytest.fixture
def small_jsonl(tmp_path):
    path = tmp_path / "small.jsonl"
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ("cat", "dog", "sun")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_config_yaml_overrides_flags_layer(tmp_path, small_jsonl):
    path = tmp_path / "eval.yaml"
    path.write_text(f"data: {small_jsonl}\nmodel: tiny\neval: {{batch_size: 2, max_new_tokens: 3}}\nmax_eval: 3\n")
    req = build(EvalCommandConfig, path, ["eval.batch_size=4", "max_eval=2"], {"max_eval": None, "template": "plain"})
    assert req.eval.batch_size == 4 and req.eval.max_new_tokens == 3 and req.max_eval == 2
    assert req.model == "tiny" and req.template == "plain" and req.protocol == "standard"
    with pytest.raises(ConfigError, match="unknown config key 'eval.batchsize'"):
        build(EvalCommandConfig, path, ["eval.batchsize=4"])
    with pytest.raises(ConfigError, match=r"^protocol: got 'nope', expected one of standard, super_ni$"):
        build(EvalCommandConfig, path, ["protocol=nope"])
    with pytest.raises(ConfigError, match=r"^data: missing"):
        build(EvalCommandConfig, None, [])


def test_eval_command_with_config_and_override(tmp_path, small_jsonl):
    """`tunelab eval --config eval.yaml eval.batch_size=4` on the tiny model."""
    from tunelab.cli import app

    path = tmp_path / "eval.yaml"
    out = tmp_path / "out"
    path.write_text(f"data: {small_jsonl}\nmodel: tiny\nn_resamples: 50\neval: {{batch_size: 1, max_new_tokens: 2}}\n")
    result = CliRunner().invoke(app, ["eval", "--config", str(path), "-q", "--out", str(out), "eval.batch_size=4"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["request"]["eval"]["batch_size"] == 4 and saved["request"]["eval"]["max_new_tokens"] == 2
    assert saved["model"] == "tiny" and saved["n_eval"] == 3


def test_eval_bad_value_stops_before_loading(capsys, monkeypatch, small_jsonl):
    code, output = cli(capsys, monkeypatch, "eval", "--data", str(small_jsonl), "--model", NO_MODEL,
                       "eval.batch_size=0")
    assert code == 2 and output.strip() == "error: eval.batch_size: got 0, expected an integer >= 1"
    code, output = cli(capsys, monkeypatch, "eval", "--data", str(small_jsonl), "--model", NO_MODEL, "--top-p", "0")
    assert code == 2 and output.strip() == "error: eval.top_p: got 0.0, expected a number in (0, 1]"


# --- tunelab serve ---------------------------------------------------------------------------------------

def test_serve_config_layers_and_flags(tmp_path, monkeypatch):
    import tunelab.commands.serve as serve_module
    from tunelab.cli import app

    path = tmp_path / "serve.yaml"
    path.write_text("adapters: runs\nport: 9000\nmax_batch: 8\n")
    cfg = build(ServeConfig, path, ["window_ms=2.5"], {"port": 9001, "threads": None})
    assert (cfg.adapters, cfg.port, cfg.max_batch, cfg.window_ms, cfg.threads) == ("runs", 9001, 8, 2.5, None)
    assert ServeConfig(adapters="x") == build(ServeConfig, None, [], {"adapters": "x"})  # flags' old defaults
    seen = []
    monkeypatch.setattr(serve_module, "serve", seen.append)  # no model, no server: only the config
    result = CliRunner().invoke(app, ["serve", "--config", str(path), "--max-loaded", "3", "max_tokens=64"])
    assert result.exit_code == 0, result.output
    assert (seen[0].port, seen[0].max_loaded, seen[0].max_tokens, seen[0].model) == (9000, 3, 64, "smollm2-135m")


def test_serve_bad_value_is_one_line(capsys, monkeypatch, tmp_path):
    code, output = cli(capsys, monkeypatch, "serve", "--adapters", str(tmp_path), "--model", NO_MODEL, "port=70000")
    assert code == 2 and output.strip() == "error: port: got 70000, expected an integer in [0, 65535]"
    code, output = cli(capsys, monkeypatch, "serve", "--model", NO_MODEL)
    assert code == 2 and output.strip().startswith("error: adapters: missing")


def test_run_flags_are_set_as_typed_and_win_over_overrides():
    from tunelab.cli import RUN_FLAGS

    flags = {RUN_FLAGS["method"]: "ipt", RUN_FLAGS["task"]: "yes", RUN_FLAGS["out"]: "runs/a: b"}
    cfg = build(type(build_config()), None, ["method=icl", "method.k=2"], flags)
    assert (cfg.method_name, cfg.method.k, cfg.data.task, cfg.out) == ("ipt", 2, "yes", "runs/a: b")
