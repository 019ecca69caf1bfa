"""benchmarks/gpu_check.sh dry-runs on the CPU (the tiny model at tiny sizes): every step runs and writes its
files to $OUT, so the GPU run finds a working script. No figure is checked: a dry run measures nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_dry_runs_on_the_cpu_and_writes_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "needs a CUDA GPU" in (tmp_path / "gpu_tests.log").read_text()  # the gpu tests ran and skipped
    assert json.loads((tmp_path / "device.json").read_text())["device"] == "cpu"
    parts = {p: json.loads((tmp_path / f"{p}.json").read_text()) for p in ("train", "generate", "serve")}
    for part, result in parts.items():
        assert "error" not in result, (part, result.get("error"))
        assert result["dry_run"] is True and result["quality_meaningful"] is False
    train = parts["train"]["train"]
    assert set(train) == {"prompt_tuning", "lora", "full_finetune"}
    for method in train.values():
        assert method["ours"]["tokens"] > 0 and method["trainer_peft"]["tokens"] > 0 and "speedup" in method
    generate = parts["generate"]["generate"]["tiny"]["batches"]
    assert set(generate) == {"1", "4"} and all("bound_tokens_per_second" in row for row in generate.values())
    serve = parts["serve"]["serve"]
    assert serve["adapters"] == 3 and serve["mixed"]["tokens"] > 0 and serve["one_adapter"]["tokens"] > 0
    assert "train lora" in summary and "serve 3 mixed adapters" in summary and "dry run" in summary
