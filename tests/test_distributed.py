"""Data-parallel training under `accelerate launch` (2 CPU processes, gloo) against one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab import distributed
from tunelab.errors import TunelabError

# the same global batch both ways: 2 processes x batch 4, or 1 process x 2 micro-batches of 4; batches are
# left ungrouped so the examples of a step are identical (length grouping windows scale with the global batch)
COMMON = ["model.name=tiny", "method.name={method}", "data.task=date_format", "data.max_train=32",
          "data.max_eval=2", "train.steps=5", "train.batch_size=4", "train.group_by_length=false",
          "train.precision=fp32", "train.schedule=constant", "model.threads=1"]
# gradients are averaged in a different order (all-reduce vs accumulation): float rounding only, which Adam
# amplifies a little step by step; measured here: <= 1.3e-5 relative after 5 steps (LoRA, loss ~10.7)
RELATIVE_TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _launch(out: Path, method: str, processes: int, extra: list[str]) -> dict:
    args = [a.format(method=method) for a in COMMON] + extra + [f"out={out}"]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if processes > 1:
        # no GPU here: --multi_gpu only selects the torchrun launcher; tunelab asks accelerate for gloo on CPU
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "tunelab.cli", "run", "--quiet", *args]
    else:
        cmd = [sys.executable, "-m", "tunelab.cli", "run", "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("method", ["prompt_tuning", "lora"])
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, method):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate's launcher is not installed in this environment")
    two = _launch(tmp_path / "two", method, 2, [])
    one = _launch(tmp_path / "one", method, 1, ["train.grad_accum=2"])
    assert two["train"]["processes"] == 2 and one["train"]["processes"] == 1
    assert two["train"]["parallel"] == "MULTI_CPU" and one["train"]["parallel"] == "none"  # DDP over gloo
    assert len(two["train"]["losses"]) == len(one["train"]["losses"]) == 5
    diffs = [abs(a - b) / abs(b) for a, b in zip(two["train"]["losses"], one["train"]["losses"], strict=True)]
    assert max(diffs) < RELATIVE_TOLERANCE, (two["train"]["losses"], one["train"]["losses"])
    # the loss moved (a curve, not one repeated value), and both counted the same tokens
    assert len(set(round(x, 4) for x in one["train"]["losses"])) > 1
    assert two["train"]["tokens"] == one["train"]["tokens"]
    # evaluation ran once (process 0) on the trained weights
    assert set(two["metrics"]) == set(one["metrics"]) and (tmp_path / "two" / "adapter").is_dir()
    assert not (tmp_path / "two" / "checkpoint").exists()


def test_processes_see_disjoint_slices_of_each_global_batch():
    batch = list(range(8))
    shards = [distributed.Parallel(rank=r, world=2).shard(batch, 4) for r in range(2)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_precision_auto_is_fp32_or_bf16_and_bad_values_name_the_key():
    assert distributed.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert distributed.resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")
    expected = "bf16" if distributed.cpu_has_fast_bf16() else "fp32"
    assert distributed.resolve_precision("auto", torch.device("cpu")) == expected
    # where the CPU flags say bf16, bf16 GEMMs are measurably faster (the reason auto picks it)
    if distributed.cpu_has_fast_bf16():
        assert distributed.cpu_bf16_speedup() > 1.0
    with pytest.raises(TunelabError, match="train.precision"):
        distributed.resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(TunelabError, match="model.device"):
        distributed.resolve_device("warp-drive")


@pytest.mark.parametrize("cap, fast", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", None)])
def test_onednn_isa_cap_turns_bf16_off(monkeypatch, cap, fast):
    """ONEDNN_MAX_CPU_ISA below oneDNN's bf16 ISAs means no bf16 units for `auto` (the AVX2 machine's choices on an
    AVX-512 one); a cap that keeps them changes nothing."""
    from tunelab import distributed

    distributed.cpu_has_fast_bf16.cache_clear()
    baseline = distributed.cpu_has_fast_bf16()
    distributed.cpu_has_fast_bf16.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    try:
        assert distributed.cpu_has_fast_bf16() is (baseline if fast is None else fast)
    finally:
        distributed.cpu_has_fast_bf16.cache_clear()
