"""`tunelab eval` on E2E test rows: "before" vs "now", and how far each is from the roofline.

Both sides run ``tunelab.protocols.run_eval`` (what `tunelab eval --data ../shared/data/e2e --max-eval N` runs)
on the same rows with the base model, greedy, batch 16:
- before: ``eval.precision=fp32``, on this tree, or with ``--baseline-rev REV`` on git revision REV (a worktree of
  it, ``baseline.py``: old code is compared by revision, not kept alive);
- now: ``eval.precision=--precision`` (default auto) on this tree.
Each side names the decode step that ran (``inference.steps``, from ``result.json``'s eval block: ``decode_step``).

Prints per side: wall time (model load excluded), BLEU with its 95% bootstrap interval; then the speed-up,
whether now's BLEU lies inside before's interval, the share of identical greedy outputs, the paired
bootstrap of the BLEU difference (now - before) with its 95% interval, and each side's roofline bound:
prefill FLOPs over the GEMM peak of its prefill precision plus, per batch, decode steps times the shortest
step (weights + KV bytes over the bandwidth, or FLOPs over the peak; ``roofline.py``).

Run: .venv/bin/python benchmarks/bench_eval.py [--rows 200] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


_SIDE = """
import json, sys
from tunelab.config import EvalConfig
from tunelab.protocols import EvalRequest, run_eval
data, model, rows, batch, precision, resamples = json.loads(sys.argv[1])
report = run_eval(EvalRequest(data=data, model=model, max_eval=rows, metrics=["bleu"], n_resamples=resamples,
                              eval=EvalConfig(batch_size=batch, precision=precision)))
print("RESULT " + json.dumps({"metrics": report.metrics, "metrics_ci": report.metrics_ci,
                              "predictions": report.predictions, "info": report.info}, default=str))
"""


def run_side(args, precision: str, rev: str | None = None):
    """(report, seconds without the model load) of one side: on this tree, or at git revision ``rev``."""
    from types import SimpleNamespace

    from tunelab.config import EvalConfig
    from tunelab.protocols import EvalRequest, run_eval

    if rev is not None:
        from baseline import run_at

        got = run_at(rev, ["-c", _SIDE, json.dumps([str(Path(args.data).resolve()), args.model, args.rows,
                                                     args.batch_size, precision, args.resamples])])
        report = SimpleNamespace(**got)
    else:
        req = EvalRequest(data=str(args.data), model=args.model, max_eval=args.rows, metrics=["bleu"],
                          eval=EvalConfig(batch_size=args.batch_size, precision=precision), n_resamples=args.resamples)
        report = run_eval(req)
    return report, report.info["seconds"] - report.info["load_seconds"]


def roofline_bound(args, report, precision: str, hw: dict) -> tuple[float, float, float]:
    """(bound seconds, prefill part, decode part) for the rows and outputs of ``report``."""
    from roofline import decode_step_limit, facts_of, prefill_limit

    from tunelab import precision as prec
    from tunelab.evaluate import prompts_for
    from tunelab.formatting import PromptLayout
    from tunelab.models import load_model
    from tunelab.protocols import select_examples

    model, tok = load_model(args.model)
    examples = select_examples(_request(args))[0]
    prompts = prompts_for(tok, PromptLayout(report.info["template"]), examples)  # the bare model's layout
    generated = [len(tok(p["prediction"], add_special_tokens=False)["input_ids"]) + 1 for p in report.predictions]
    phases = prec.resolve(precision, "cpu")
    facts = facts_of(model)
    peak = {"fp32": hw["fp32_peak_gflops"], "bf16": hw["bf16_peak_gflops"]}
    nbytes = {"fp32": 4, "bf16": 2}
    tokens = sum(map(len, prompts))
    per_token = prefill_limit(facts, peak[phases.prefill], tokens / len(prompts) / 2)[0]
    prefill = tokens / per_token
    decode = 0.0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # generate_rows' batches
    for start in range(0, len(order), args.batch_size):
        rows = order[start:start + args.batch_size]
        steps = max(generated[i] for i in rows)
        context = sum(len(prompts[i]) for i in rows) / len(rows) + steps / 2
        step, _ = decode_step_limit(facts, len(rows), context, nbytes[phases.decode], nbytes[phases.decode],
                                    hw["bandwidth_gbs"], peak[phases.decode])
        decode += steps * step
    return prefill + decode, prefill, decode


def _request(args):
    from tunelab.protocols import EvalRequest

    return EvalRequest(data=str(args.data), model=args.model, max_eval=args.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="auto", help="the 'now' side: fp32 | bf16 | auto")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--baseline-rev", help="run the 'before' side (fp32) at this git revision")
    args = parser.parse_args()
    import numpy as np
    from bench_gemm import measure

    from tunelab import metrics as M
    from tunelab import precision as prec
    from tunelab.stats import paired_bootstrap

    hw = measure(quick=True)
    phases = prec.resolve(args.precision, "cpu")
    print(f"GEMM peak fp32 {hw['fp32_peak_gflops']} / bf16 {hw['bf16_peak_gflops']} GFLOP/s, memory "
          f"{hw['bandwidth_gbs']} GB/s; now = {args.precision} (prefill {phases.prefill}, decode {phases.decode})")
    sides = {"before": ("fp32", args.baseline_rev), "now": (args.precision, None)}
    reports, walls = {}, {}
    for side, (precision, rev) in sides.items():
        start = time.perf_counter()
        reports[side], walls[side] = run_side(args, precision, rev)
        print(f"{side:7} {walls[side]:7.1f} s  BLEU {reports[side].metrics['bleu']:.2f} "
              f"95% CI {reports[side].metrics_ci['bleu']}  ({time.perf_counter() - start:.0f} s with loading)",
              flush=True)
    before, now = reports["before"], reports["now"]
    refs = [p["references"] for p in before.predictions]
    preds = {s: [p["prediction"] for p in r.predictions] for s, r in reports.items()}
    same = float(np.mean([a == b for a, b in zip(preds["before"], preds["now"], strict=True)]))
    stats = {s: M.sufficient_stats("bleu", p, refs) for s, p in preds.items()}
    diff = paired_bootstrap(stats["now"], stats["before"], M.METRICS["bleu"].reduce, args.resamples)
    lo, hi = before.metrics_ci["bleu"]
    inside = lo <= now.metrics["bleu"] <= hi
    print(f"speed-up now/before: {walls['before'] / walls['now']:.2f}x; identical greedy outputs: {same:.1%}; "
          f"BLEU now - before {diff.delta:+.2f} [{diff.ci[0]:+.2f}, {diff.ci[1]:+.2f}] (paired bootstrap); "
          f"now's BLEU inside before's 95% CI: {inside}")
    result = {"rows": args.rows, "hardware": hw, "identical": same, "bleu_diff": diff.delta,
              "bleu_diff_ci": list(diff.ci), "now_inside_before_ci": inside,
              "speedup": walls["before"] / walls["now"], "baseline_rev": args.baseline_rev}
    for side, (precision, _) in sides.items():
        bound, pre, dec = roofline_bound(args, reports[side], precision, hw)
        print(f"{side:7} roofline bound {bound:6.2f} s (prefill {pre:.2f} s + decode {dec:.2f} s); measured "
              f"{walls[side]:.1f} s = {walls[side] / bound:.1f}x the bound ({bound / walls[side]:.0%} of it reached)")
        result[side] = {"seconds": walls[side], "bleu": reports[side].metrics["bleu"],
                        "bleu_ci": reports[side].metrics_ci["bleu"], "bound_seconds": bound,
                        "decode_step": reports[side].info.get("decode_step")}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
