"""The CLI as a user runs it: subprocesses, exit codes, files on disk."""

import json
import os
import subprocess
import sys

import pytest

TUNELAB = [sys.executable, "-m", "tunelab.cli"]


def tunelab(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*TUNELAB, *args], capture_output=True, text=True, env=env, timeout=600, **kw)


def test_run_writes_result_with_costs(tmp_path):
    out = tmp_path / "run"
    proc = tunelab("run", "--method", "prompt_tuning", "--task", "arithmetic", "--model", "tiny", "--steps", "3",
                   "--max-eval", "4", "--out", str(out), "-q", "method.num_virtual_tokens=4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["trainable_params"] == 4 * 16
    assert result["train"]["steps"] == 3 and len(result["train"]["losses"]) == 3
    assert result["adapter_bytes"] > 0 and result["peak_rss_mb"] > 0
    assert result["config"]["method"] == {"name": "prompt_tuning", "num_virtual_tokens": 4}
    assert {"torch", "transformers", "peft"} <= set(result["versions"])
    assert result["machine"]["cores"] and result["machine"]["cpu"]  # what the seconds were measured on
    assert "machine" in proc.stdout  # the printed table names it too
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_yaml_config_and_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: {name: icl, k: 1}\nmodel: {name: tiny}\ndata: {task: sentiment, max_eval: 3}\n")
    out = tmp_path / "o"
    proc = tunelab("run", "--config", str(cfg), "--out", str(out), "-q", "method.k=0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "result.json").read_text())["config"]["method"]["k"] == 0


def test_malformed_jsonl_names_file_line_field_and_writes_nothing(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    out = tmp_path / "out"
    proc = tunelab("run", "--method", "prompt_tuning", "--task", str(data), "--model", "tiny", "--out", str(out))
    assert proc.returncode == 2
    assert f"{data}:2: expected a string, got int (field 'output')" in " ".join(proc.stdout.split())
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists()


def test_unknown_config_key_is_one_line(tmp_path):
    proc = tunelab("run", "--model", "tiny", "train.stepz=3")
    assert proc.returncode == 2 and "unknown config key 'train.stepz'" in proc.stdout


def test_ls_lists_everything():
    proc = tunelab("ls")
    assert proc.returncode == 0
    for name in ("smollm2-135m", "date_format", "prompt_tuning", "icl"):
        assert name in proc.stdout


@pytest.mark.real_model
def test_prompt_tuning_on_embedded_model_end_to_end(tmp_path):
    out = tmp_path / "real"
    proc = tunelab("run", "--method", "prompt_tuning", "--task", "date_format", "--steps", "2", "--max-eval", "4",
                   "--batch-size", "4", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "smollm2-135m" and result["trainable_params"] == 20 * 576
    assert result["load_seconds"] < 5


def test_sigterm_stops_a_command_as_ctrl_c_does():
    """kill / a board job's Stop / docker stop: the command unwinds (a grid packs its store in its `finally`)."""
    import signal
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "import tunelab.cli as cli\n"
            "def app():\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)\n"
            "    finally:\n"
            "        print('unwound', flush=True)\n"
            "cli.app = app\n"
            "cli.main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr  # not -15: the process was not simply killed
    assert "unwound" in done.stdout and "interrupted; rerun the same command" in done.stdout
