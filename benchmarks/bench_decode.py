"""Time per decode step at batch 1 / 16 / 64 against the memory-bandwidth bound of its weight format.

Steps (the table of ``tunelab.inference.steps``, started at each in turn with ``steps.prefer``), each in fp32 and
bf16 weights (``precision.weights_in``), in the engine's decode loop (pre-allocated cache):
- ``transformers``: the model's own forward;
- ``torch``: ``inference.torch_step.step`` (fused QKV and gate/up, F.rms_norm, grouped-query attention as two
  matmuls, oneDNN's packed GEMVs; PyTorch ops);
- ``native``: ``tunelab.native`` (the whole step in one compiled call: decode.c), the default where it builds;
(torch.compile of the torch step was tried and not kept: docs/performance.md.) Each line names the step that
really ran (``steps.choose`` falls back, with a log line saying why, where one cannot run).

Bound of a step of B rows = max(bytes / bandwidth, FLOPs / GEMM peak), bytes = weights + B x context x KV
(``roofline.decode_step_limit``), GEMM peaks from bench_gemm's probe at the start. This machine's read
bandwidth moves by up to 1.7x within a minute (other tenants), so each timed run is bracketed by bandwidth
probes (the best of 3 ``sum``s over 256 MB just before and just after it; the higher of the two, so the bound
is the stricter one) and "reached" is the median over runs of bound(that probe) / step.
The prompts are E2E test inputs (~127 tokens), the base model; EOS never stops a row. Medians of
``--repeats`` runs.

Run: .venv/bin/python benchmarks/bench_decode.py [--batches 1,16,64] [--steps 16] [--repeats 3] [--isa avx2]
(``--isa`` / ``TUNELAB_NATIVE_ISA`` picks the native step's build: auto, avx512, avx2, generic; it is printed.)
``--baseline-rev REV`` runs the same benchmark at git revision REV too (``baseline.py``) and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


def prompts_of(tok, data: Path, n: int) -> list[list[int]]:
    from tunelab.data import load_examples
    from tunelab.formatting import PromptLayout, build_prompt, encode_prompt, resolve_template

    template = resolve_template("auto", tok)
    test = load_examples(data / "test.jsonl")[:n]
    return [encode_prompt(tok, build_prompt(tok, PromptLayout(template), e), 1024) for e in test]


def step_seconds(adapter, rows: list[list[int]], steps: int, precision: str, mode: str, pad: int) -> float:
    """Seconds per decode step of one batch (``roofline.time_ours``, the table started at ``mode``;
    the step that ran is left in ``roofline.LAST_STEP``)."""
    from roofline import time_ours

    from tunelab.inference import steps as step_table

    with step_table.prefer(mode):
        return time_ours(adapter, rows, steps, precision, pad)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="transformers,torch,native",
                        help="decode steps to time (inference.steps.BACKENDS)")
    parser.add_argument("--isa", choices=("auto", "avx512", "avx2", "generic"),
                        help="build of the native step (sets TUNELAB_NATIVE_ISA; default: that variable, else auto)")
    parser.add_argument("--baseline-rev", help="also run this benchmark at this git revision and print the ratios")
    args = parser.parse_args()
    if args.isa:
        os.environ["TUNELAB_NATIVE_ISA"] = args.isa

    import torch
    from bench_gemm import bandwidth_gbs, gflops
    from roofline import LAST_STEP, decode_step_limit, facts_of

    from tunelab.methods.base import MethodConfig, freeze
    from tunelab.methods.icl import FrozenAdapter
    from tunelab.models import load_model

    model, tok = load_model(args.model)
    freeze(model)
    adapter = FrozenAdapter(model, "base", MethodConfig())
    batches = [int(b) for b in args.batches.split(",")]
    prompts = prompts_of(tok, args.data, max(batches))
    bandwidth = bandwidth_gbs()
    peak = {"fp32": gflops(1024, 576, 1536, torch.float32), "bf16": gflops(1024, 576, 1536, torch.bfloat16)}
    facts = facts_of(model)
    print(f"load average {os.getloadavg()[0]:.2f}; bandwidth {bandwidth:.1f} GB/s; GEMM fp32 {peak['fp32']:.0f} / "
          f"bf16 {peak['bf16']:.0f} GFLOP/s; {torch.get_num_threads()} threads")
    from tunelab import native

    modes = [m for m in args.modes.split(",") if m != "native" or native.library() is not None]
    if "native" in args.modes.split(",") and "native" not in modes:
        print(f"native step unavailable: {native.reason()}")
    elif "native" in modes:
        print(f"native step: the {native.isa()} build ({native.ISA_ENV}="
              f"{os.environ.get(native.ISA_ENV, 'auto')}; {native.library()._name})")
    nbytes = {"fp32": 4, "bf16": 2}
    pad = tok.pad_token_id
    results: dict = {"bandwidth_gbs": bandwidth, "peak_gflops": peak, "native_isa": native.isa()}
    big = torch.ones(256 * 2**20 // 4)

    def probe() -> float:  # GB/s: the best of 3 sums over 256 MB
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            big.sum()
            best = min(best, time.perf_counter() - start)
        return big.numel() * 4 / best / 1e9

    for precision in args.precisions.split(","):
        for mode in modes:  # warm-up: the bf16 copy, the fused weights, oneDNN's kernels
            step_seconds(adapter, prompts[:2], 3, precision, mode, pad)
        for batch in batches:
            rows = (prompts * (batch // len(prompts) + 1))[:batch]
            context = sum(map(len, rows)) / batch + args.steps / 2
            bound, text = decode_step_limit(facts, batch, context, nbytes[precision], nbytes[precision],
                                            bandwidth, peak[precision])
            for mode in modes:
                times, reached, probes = [], [], []
                for _ in range(args.repeats):
                    before = probe()
                    times.append(step_seconds(adapter, rows, args.steps, precision, mode, pad))
                    probes.append(max(before, probe()))
                    reached.append(decode_step_limit(facts, batch, context, nbytes[precision], nbytes[precision],
                                                     probes[-1], peak[precision])[0] / times[-1])
                t, r = statistics.median(times), statistics.median(reached)
                results[f"{precision}_b{batch}_{mode}"] = {"step_ms": t * 1e3, "bound_ms": bound * 1e3,
                                                           "reached": r, "runs_ms": [x * 1e3 for x in times],
                                                           "probes_gbs": probes, "step": LAST_STEP[0]}
                print(f"{precision} b{batch:<3} {mode:9} (ran {LAST_STEP[0]}) {t * 1e3:8.2f} ms/step  {batch / t:8.1f} tok/s  "
                      f"reached {r:5.0%} of the bound at each run's own probe  (runs "
                      f"{', '.join(f'{x * 1e3:.1f}' for x in times)} ms; probes "
                      f"{', '.join(f'{x:.0f}' for x in probes)} GB/s)", flush=True)
            print(f"   bound at the start's probe: {text}")
    results["load_average_end"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(results))
    if args.baseline_rev:
        from baseline import compare

        compare("bench_decode.py", args.baseline_rev, results)


if __name__ == "__main__":
    main()
