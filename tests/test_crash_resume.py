"""`tunelab run` killed with SIGKILL at a random step, then `--resume`d, ends exactly where an uninterrupted run does."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tunelab.checkpoint import latest_checkpoint
from tunelab.config import build_config
from tunelab.run import run

STEPS = 120  # ~25 ms each on the tiny model: the kill lands mid-run with room to spare
ARGS = ["run", "--method", "prompt_tuning", "--task", "date_format", "--model", "tiny", "--steps", str(STEPS),
        "--batch-size", "4", "--max-train", "32", "--max-eval", "2", "--seed", "3", "-q",
        "train.checkpoint_every=1", "model.threads=1", "method.num_virtual_tokens=4"]


def _tunelab(log, *args: str) -> subprocess.Popen:
    """``tunelab run`` in a child process; its output goes to ``log`` (a pipe nobody reads could block it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "tunelab.cli", *ARGS, *args], env=env, stdout=f, stderr=f)


def _tail(log) -> str:
    return log.read_text()[-2000:]


def _step(checkpoint_dir) -> int:
    path = latest_checkpoint(checkpoint_dir)
    return int(path.name.split("-")[1]) if path else 0


def _uninterrupted(out) -> None:
    """The same run in this process (saves a ~10 s interpreter start); same code path and one thread."""
    cfg = build_config(None, ["method.name=prompt_tuning", "data.task=date_format", "model.name=tiny",
                              f"train.steps={STEPS}", "train.batch_size=4", "data.max_train=32", "data.max_eval=2",
                              "train.seed=3", "train.checkpoint_every=1", "model.threads=1",
                              "method.num_virtual_tokens=4", f"out={out}"])
    threads = torch.get_num_threads()
    try:
        run(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path):
    kill_after = random.Random(9).randint(5, STEPS - 50)  # seeded, so a failure reproduces
    victim = _tunelab(tmp_path / "victim.log", "--out", str(tmp_path / "killed"))
    checkpoints = tmp_path / "killed" / "checkpoint"
    deadline = time.monotonic() + 120
    while _step(checkpoints) < kill_after:
        assert victim.poll() is None, f"the run ended before it could be killed: {_tail(tmp_path / 'victim.log')}"
        assert time.monotonic() < deadline, "no checkpoint progress within 120 s"
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = _step(checkpoints)
    assert kill_after <= killed_at < STEPS and not (tmp_path / "killed" / "result.json").exists()

    resumed = _tunelab(tmp_path / "resumed.log", "--out", str(tmp_path / "killed"), "--resume")
    _uninterrupted(tmp_path / "full")  # while the resumed process starts up
    assert resumed.wait(timeout=300) == 0, _tail(tmp_path / "resumed.log")

    weights = [load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("full", "killed")]
    assert weights[0].keys() == weights[1].keys()
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= 1e-6
    full, after = (json.loads((tmp_path / d / "result.json").read_text())["train"] for d in ("full", "killed"))
    assert after["resumed_from"] == killed_at and full["resumed_from"] is None
    assert len(after["losses"]) == STEPS and after["steps"] == STEPS and after["tokens"] == full["tokens"]
    assert max(abs(a - b) for a, b in zip(after["losses"], full["losses"], strict=True)) <= 1e-6
    assert not (tmp_path / "killed" / "checkpoint").exists()  # a finished run drops its checkpoint
