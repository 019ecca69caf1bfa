"""The vLLM tests: run by `make test` in .venv-vllm (`make test-vllm`), where vllm-cpu is installed beside tunelab.

In tunelab's own venv (no vLLM) every test here skips with that reason. Adapters are trained for a few steps on
SmolLM2-135M (vLLM cannot load the tiny test model: it has no directory and a head size vLLM's CPU kernels lack).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

HAS_VLLM = importlib.util.find_spec("vllm") is not None
E2E = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "e2e"

# what each adapter trains: lr high enough that a few steps move the output away from the base model's
TRAINED = {
    "lora": ["method.r=8", "train.lr=3e-3"],
    "prompt_tuning": ["method.num_virtual_tokens=8", "train.lr=0.3"],
    "prefix_tuning": ["method.num_virtual_tokens=4"],
}


def pytest_collection_modifyitems(config, items):
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="vllm is not installed in this venv; `make test` runs these in .venv-vllm "
                                   "(make test-vllm)")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def e2e() -> Path:
    if not E2E.is_dir():
        pytest.skip(f"needs {E2E} (../shared/data beside the checkout; present in CI)")
    return E2E


@pytest.fixture(scope="session")
def trained(tmp_path_factory, e2e) -> dict[str, Path]:
    """method -> the adapter directory of a short `tunelab run` of it on E2E with SmolLM2-135M."""
    from tunelab.config import build_config
    from tunelab.run import run

    root = tmp_path_factory.mktemp("vllm-adapters")
    out = {}
    for method, options in TRAINED.items():
        run(build_config(None, [f"method.name={method}", *options, "model.name=smollm2-135m", f"data.task={e2e}",
                                "train.steps=6", "train.batch_size=4", "data.max_train=32", "data.max_eval=2",
                                "eval.max_new_tokens=8", "eval.loss=false", "eval.forgetting=false",
                                f"out={root / method}"]), progress=False)
        out[method] = root / method / "adapter"
    return out
