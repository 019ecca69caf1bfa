"""This machine's two inference limits: matmul throughput (fp32, bf16) and memory read bandwidth.

- GEMM: GFLOP/s for square and SmolLM2-135M-shaped matmuls in fp32 and bf16; the best is the practical
  peak (the MFU denominator of bench_train.py, the prefill limit of bench_generate.py --roofline).
- Decode-shaped x @ W.T at 1 / 4 / 16 / 64 rows (W 1536x576, cache-resident): where bf16 starts to pay.
- Memory bandwidth: a sum over a 256 MB tensor (far larger than the caches), the decode limit at small batch
  (a decode step reads every weight once: bytes per step / bandwidth = the shortest possible step).

Run: .venv/bin/python benchmarks/bench_gemm.py [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from roofline import seconds  # noqa: E402  (the benchmarks' one median timer)

# (M, K, N): square, and SmolLM2-135M training/prefill shapes (8 x 128 tokens, hidden 576, MLP 1536, vocab 49152)
SHAPES = [(2048, 2048, 2048), (1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (256, 576, 49152)]
DECODE_ROWS = (1, 4, 16, 64)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm up (oneDNN kernel selection)
    return seconds(fn, repeats)


def gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / _median_seconds(lambda: a @ b, repeats) / 1e9


def decode_linear_us(rows: int, dtype: torch.dtype, repeats: int = 50) -> float:
    """x @ W.T (W 1536x576) at ``rows`` rows, microseconds (median of ``repeats`` blocks of 10 calls)."""
    w, x = torch.randn(1536, 576).to(dtype), torch.randn(rows, 576).to(dtype)

    def ten():
        for _ in range(10):
            F.linear(x, w)

    return _median_seconds(ten, repeats) / 10 * 1e6


def bandwidth_gbs(mbytes: int = 256, repeats: int = 5) -> float:
    """Memory read bandwidth, GB/s: a sum over an fp32 tensor of ``mbytes`` MB (larger than any cache)."""
    x = torch.ones(mbytes * 2**20 // 4)
    return x.numel() * 4 / _median_seconds(x.sum, repeats) / 1e9


def measure(threads: int | None = None, quick: bool = False) -> dict:
    """Everything above as one dict (the keys of the 2026-11 version are kept)."""
    if threads:
        torch.set_num_threads(threads)
    shapes = SHAPES[1:3] if quick else SHAPES
    rows = {f"{m}x{k}x{n}": round(gflops(m, k, n, torch.float32), 1) for m, k, n in shapes}
    bf16 = {f"{m}x{k}x{n}": round(gflops(m, k, n, torch.bfloat16, repeats=3), 1) for m, k, n in shapes}
    decode = {str(r): {"fp32_us": round(decode_linear_us(r, torch.float32), 1),
                       "bf16_us": round(decode_linear_us(r, torch.bfloat16), 1)} for r in DECODE_ROWS}
    return {"threads": torch.get_num_threads(), "fp32_gflops": rows, "fp32_peak_gflops": max(rows.values()),
            "bf16_gflops": bf16, "bf16_peak_gflops": max(bf16.values()),
            "bf16_gflops_1024x576x1536": bf16["1024x576x1536"], "decode_linear": decode,
            "bandwidth_gbs": round(bandwidth_gbs(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="two GEMM shapes only (seconds)")
    args = parser.parse_args()
    r = measure(args.threads, args.quick)
    for shape, value in r["fp32_gflops"].items():
        print(f"GEMM {shape:>16}: fp32 {value:8.1f}  bf16 {r['bf16_gflops'][shape]:8.1f} GFLOP/s "
              f"({r['bf16_gflops'][shape] / max(value, 1e-9):.2f}x)")
    for rows, t in r["decode_linear"].items():
        print(f"x @ W.T, {rows:>3} rows x 576 -> 1536: fp32 {t['fp32_us']:8.1f} us  bf16 {t['bf16_us']:8.1f} us "
              f"({t['fp32_us'] / max(t['bf16_us'], 1e-9):.2f}x)")
    print(f"memory read bandwidth: {r['bandwidth_gbs']} GB/s (sum over 256 MB)")
    print(f"peak fp32 {r['fp32_peak_gflops']} / bf16 {r['bf16_peak_gflops']} GFLOP/s on {r['threads']} threads")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
