"""`tunelab serve` as a user runs it: a subprocess on 127.0.0.1, key from TUNELAB_API_KEY, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tunelab.serve.local import free_port


def test_tunelab_serve_command_serves_the_adapter_directory(adapter_root):
    port = free_port()
    env = {**os.environ, "TUNELAB_API_KEY": "k3y", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", "--model", "tiny", "--adapters",
                             str(adapter_root), "--port", str(port), "--max-tokens", "8",
                             "--max-lora-adapters", "3"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        assert httpx.get(f"{url}/health", timeout=5).json()["lora_slots"]["capacity"] == 3  # --max-lora-adapters
        body = {"model": "task02", "prompt": "hello", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer k3y"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["model"] == "task02"
        too_many = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 9},
                              headers={"Authorization": "Bearer k3y"}, timeout=60)
        assert too_many.status_code == 400  # --max-tokens 8
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "serving tiny + 20 adapters" in out


def test_missing_adapter_directory_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "serve", "--model", "tiny", "--adapters",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a directory" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_engine_vllm_refuses_a_random_weight_model_in_one_line(adapter_root):
    """`--engine vllm` needs a model directory: the tiny built-in model is refused before any weights load."""
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "serve", "--model", "tiny", "--engine", "vllm",
                           "--adapters", str(adapter_root)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "engine vllm" in out and "random-weight" in out and "Traceback" not in out


def test_engine_vllm_without_vllm_names_the_extra(adapter_root):
    """Without vLLM installed, `--engine vllm` says how to install it, brackets and all (not eaten as markup)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "serve", "--model", "smollm2-135m", "--engine", "vllm",
                           "--adapters", str(adapter_root)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "tunelab[vllm]" in out and "Traceback" not in out
