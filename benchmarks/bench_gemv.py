"""Batch-1 GEMV over SmolLM2-135M-shaped weights: how close each kernel streams to the memory bandwidth.

A batch-1 decode step reads every weight once, so its floor is (weight bytes) / (bandwidth). This probe
times only the matrix-vector products of one step (30 layers x q/k/v, o, gate/up, down, plus the LM head;
random weights of the real shapes, 538 MB fp32 / 269 MB bf16, far larger than the caches) with:
- ``packed``: ``torch_step._prepare`` (oneDNN packed weights, split at ``MAX_K`` columns): the lean step's kernel;
- ``F.linear``, ``torch.mv``, ``x @ W.T``: what a user would write;
- ``numpy`` (fp32 only): OpenBLAS's GEMV, a second opinion on what the hardware gives;
against a ``sum`` over a 256 MB tensor (the bandwidth probe of bench_gemm.py). The gap between a decode step
(bench_decode.py) and the packed GEMVs here is the step's non-GEMV work (norms, RoPE, attention, dispatch).

Run: .venv/bin/python benchmarks/bench_gemv.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tunelab.inference import torch_step

HIDDEN, MLP, VOCAB, LAYERS, QKV = 576, 1536, 49152, 30, 960  # SmolLM2-135M: q 576 + k 192 + v 192


def shapes() -> list[tuple[int, int]]:
    per_layer = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * MLP, HIDDEN), (HIDDEN, MLP)]
    return per_layer * LAYERS + [(VOCAB, HIDDEN)]


def median_seconds(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernels(dtype: torch.dtype) -> tuple[int, dict]:
    """The weight bytes of one step's GEMVs in ``dtype`` and each kernel's run over all of them."""
    weights = [torch.randn(o, i).to(dtype) for o, i in shapes()]
    x = {i: torch.randn(1, i).to(dtype) for i in (HIDDEN, MLP)}
    packed = [torch_step._prepare(w, None, pack=True) for w in weights]
    out = {
        "packed (lean step)": lambda: [p(x[w.shape[1]]) for p, w in zip(packed, weights, strict=True)],
        "F.linear": lambda: [F.linear(x[w.shape[1]], w) for w in weights],
        "torch.mv": lambda: [torch.mv(w, x[w.shape[1]][0]) for w in weights],
        "x @ W.T": lambda: [x[w.shape[1]] @ w.T for w in weights],
    }
    if dtype == torch.float32:
        arrays, vectors = [w.numpy() for w in weights], {k: v[0].numpy() for k, v in x.items()}
        out["numpy (OpenBLAS)"] = lambda: [a @ vectors[a.shape[1]] for a in arrays]
    return sum(w.numel() * w.element_size() for w in weights), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    big = torch.ones(256 * 2**20 // 4)
    bandwidth = big.numel() * 4 / median_seconds(big.sum, args.repeats) / 1e9
    print(f"sum over 256 MB: {bandwidth:.1f} GB/s ({torch.get_num_threads()} threads)")
    for dtype in (torch.float32, torch.bfloat16):
        nbytes, runs = kernels(dtype)
        print(f"{str(dtype).removeprefix('torch.')}: {nbytes / 1e6:.0f} MB in {len(shapes())} matrices, "
              f"floor {nbytes / bandwidth / 1e6:.2f} ms")
        for name, fn in runs.items():
            seconds = median_seconds(fn, args.repeats)
            print(f"  {name:20s} {seconds * 1e3:7.2f} ms  {nbytes / seconds / 1e9:5.1f} GB/s  "
                  f"{nbytes / seconds / 1e9 / bandwidth:5.0%} of the sum probe")
        del runs


if __name__ == "__main__":
    main()
