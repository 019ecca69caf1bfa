"""A hand-written results store for the board's data functions: known predictions, so filters can be checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.compare.store import Store

# example id -> (PT prediction, PT score, IPT prediction, IPT score)
EXAMPLES = {"e0": ("a b c", 100.0, "a b c", 100.0),  # both right, same text
            "e1": ("x", 0.0, "the y", 100.0),  # IPT right, PT wrong
            "e2": ("q", 100.0, "r", 0.0),  # PT right, IPT wrong
            "e3": ("m n", 0.0, "m n", 0.0)}  # both wrong, same text


def _predictions(path: Path, method: str, seed: int) -> str:
    rows = []
    for i, (pt, pt_score, ipt, ipt_score) in EXAMPLES.items():
        if method == "zero_shot":
            row = {"prediction": "nothing", "scores": {"exact_match": 0.0}}
        elif method == "pt":
            row = {"prediction": pt, "scores": {"exact_match": pt_score}}
        else:
            row = {"prediction": ipt, "scores": {"exact_match": ipt_score}, "demo_similarity": 0.5 + 0.1 * int(i[1]),
                   "demonstrations": [{"id": f"d{i}", "instruction": "say it", "input": f"in-{i}", "output": f"out-{i}"}]}
        rows.append({"id": i, "task": "t", "references": [f"ref-{i}"], **row})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _row(tmp: Path, method: str, name: str, seed: int, length: int | None, quality: float, params: int) -> dict:
    predictions = _predictions(tmp / f"{method}-{seed}-{length}.jsonl", method, seed)
    options = {"name": name, **({"k": 0} if method == "zero_shot" else {}),
               **({"num_virtual_tokens": length} if length else {})}
    return {"key": f"{method}-{seed}-{length}", "grid": "hand", "method": method, "method_name": name, "task": "t",
            "seed": seed, "train_size": None, "prompt_length": length, "status": "done",
            "config": {"method": options, "model": {"name": "tiny"}}, "metrics": {"exact_match": quality},
            "primary_metric": "exact_match", "quality": quality, "predictions": predictions, "trainable_params": params,
            "train_seconds": 1.0 + seed, "eval_seconds": 1.0, "adapter_bytes": params * 4, "peak_rss_mb": 100.0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """RUNS/hand/results.sqlite: zero-shot (seed 0), PT at lengths 4 and 8 and IPT at 4 (seeds 0 and 1), 4 examples."""
    root = tmp_path_factory.mktemp("runs")
    (root / "hand").mkdir()
    with Store(root / "hand" / "results.sqlite") as db:
        db.record(_row(root, "zero_shot", "icl", 0, None, 0.0, 0))
        for seed in (0, 1):
            db.record(_row(root, "pt", "prompt_tuning", seed, 4, 50.0, 64))
            db.record(_row(root, "pt", "prompt_tuning", seed, 8, 50.0 + seed, 128))
            db.record(_row(root, "ipt", "ipt", seed, 4, 50.0, 64))
        db.record({**_row(root, "pt", "prompt_tuning", 2, 4, 0.0, 64), "status": "failed", "error": "boom\nmore"})
    (root / ".board" / "jobs").mkdir(parents=True)
    (root / ".board" / "jobs" / "ignored.sqlite").write_text("")
    return root
