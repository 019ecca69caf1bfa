"""This machine's fp32 matmul throughput, the denominator of model FLOP utilisation (MFU).

Run: .venv/bin/python benchmarks/bench_gemm.py [--threads N]
Prints GFLOP/s for square and transformer-shaped matmuls; the best is the practical peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# (M, K, N): square, and SmolLM2-135M training shapes (8 x 128 tokens, hidden 576, MLP 1536, vocab 49152)
SHAPES = [(2048, 2048, 2048), (1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (256, 576, 49152)]


def gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / sorted(times)[len(times) // 2] / 1e9


def measure(threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    rows = {f"{m}x{k}x{n}": round(gflops(m, k, n, torch.float32), 1) for m, k, n in SHAPES}
    bf16 = round(gflops(1024, 576, 1536, torch.bfloat16, repeats=2), 1)
    return {"threads": torch.get_num_threads(), "fp32_gflops": rows, "fp32_peak_gflops": max(rows.values()),
            "bf16_gflops_1024x576x1536": bf16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    result = measure(args.threads)
    for shape, value in result["fp32_gflops"].items():
        print(f"fp32 {shape:>18}: {value:8.1f} GFLOP/s")
    print(f"bf16 1024x576x1536     : {result['bf16_gflops_1024x576x1536']:8.1f} GFLOP/s "
          f"({result['bf16_gflops_1024x576x1536'] / max(result['fp32_gflops']['1024x576x1536'], 1e-9):.2f}x fp32's speed)")
    print(f"peak fp32: {result['fp32_peak_gflops']} GFLOP/s on {result['threads']} threads")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
