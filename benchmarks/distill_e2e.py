"""A prompt-tuned SmolLM2 on E2E, distilled into a LoRA (`tunelab export --to lora`): BLEU of both on test rows.

1. trains prompt tuning on ../shared/data/e2e (train.jsonl; see its PROVENANCE.md) and scores it on the first
   ``--rows`` rows of test.jsonl (skipped when OUT/pt/result.json exists: rerun to re-export only);
2. exports OUT/pt/adapter to a LoRA of rank ``--rank`` in OUT/lora by ``--distill-steps`` steps of KL
   distillation on the same training rows (``tunelab.distill``), which scores teacher and student on the
   same test rows;
3. prints BLEU with its 95% bootstrap interval for the soft prompt (teacher) and the LoRA (student), the
   mean KL(teacher || student) on those rows before and after distillation, and each step's seconds.

Run: .venv/bin/python benchmarks/distill_e2e.py [--steps 300] [--distill-steps 300] [--rank 8] [--rows 100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


def train_teacher(args) -> dict:
    from tunelab.config import build_config
    from tunelab.run import run

    result_file = args.out / "pt" / "result.json"
    if result_file.is_file():
        print(f"using the prompt-tuning run in {result_file.parent}")
        return json.loads(result_file.read_text())
    cfg = build_config(None, [f"model.name={args.model}", "method.name=prompt_tuning",
                              f"method.num_virtual_tokens={args.virtual_tokens}", f"data.task={args.data}",
                              f"data.max_train={args.max_train}", f"data.max_eval={args.rows}", "eval.metrics=[bleu]",
                              "eval.loss=false", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                              f"out={args.out / 'pt'}"])
    return run(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("runs/distill_e2e"))
    parser.add_argument("--steps", type=int, default=300, help="prompt-tuning steps")
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=100, help="test rows scored")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate")
    args = parser.parse_args()

    from tunelab.export import ExportConfig, export

    start = time.perf_counter()
    teacher_run = train_teacher(args)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    report = export(ExportConfig(adapter=str(args.out / "pt"), out=str(args.out / "lora"), rank=args.rank,
                                 steps=args.distill_steps, lr=args.lr, batch_size=args.batch_size))
    export_seconds = time.perf_counter() - start

    print(f"\nE2E, {report['n_eval']} test rows, {args.model}; prompt tuning {args.steps} steps "
          f"({train_seconds:.0f} s), distilled to LoRA rank {args.rank} in {args.distill_steps} steps "
          f"({export_seconds:.0f} s, {report['distill']['cpu_seconds']:.0f} CPU s)")
    print(f"{'adapter':<28}{'BLEU':>8}   95% CI")
    for label, side in (("prompt tuning (teacher)", report["teacher"]), ("LoRA (student)", report["student"])):
        lo, hi = side["metrics_ci"]["bleu"] or (float("nan"), float("nan"))
        print(f"{label:<28}{side['metrics']['bleu']:>8.2f}   [{lo:.2f}, {hi:.2f}]")
    print(f"teacher as its run scored it: BLEU {teacher_run['metrics']['bleu']:.2f}")
    print(f"mean KL(teacher || student) on those rows: {report['kl']['before']:.4f} before, "
          f"{report['kl']['after']:.4f} after; LoRA {report['student']['adapter_bytes']:,} bytes in {args.out / 'lora'}")


if __name__ == "__main__":
    main()
