"""`tunelab serve` under load: many soft-prompt adapters mixed in one batch vs one adapter at a time.

Run: .venv/bin/python benchmarks/bench_serve.py [--model smollm2-135m] [--clients 8] [--requests 96]
     .venv/bin/python benchmarks/bench_serve.py --poisson --adapters 100 --rates 2,8,32 [--prefix-share 0.25]
     .venv/bin/python benchmarks/bench_serve.py --quick      # all of --poisson, small, <= ~8 min on 2 cores

``--poisson`` (issue 18): open-loop Poisson arrivals at each of ``--rates`` requests/s over ``--adapters``
adapters (random prompt-tuning, ``--prefix-share`` prefix-tuning, ``--lora-share`` LoRA adapters, and
``--ipt-share`` IPT adapters: copies of one `tunelab run` of IPT with one training step, so their
demonstrations come from a real run's pool), streaming, for the ``continuous`` scheduler and the
``static`` batcher, mixed over all adapters and on one adapter only: throughput, p50/p95 time to first
token (first streamed piece), p50/p95 time per output token, and the unloaded TTFT (one request at a time)
of each scheduler; the share of a streamed 64-token completion's time spent before its first token; the
memory each extra adapter of each kind adds (LoRA: one slot of the stacked factors, no model copy); plus the
ratios the issue's "done when" names. ``--quick`` runs all of it small and prints those ratios. Before the
clock starts every adapter serves one request (the steady state of a running server: its soft prompts'
key/values cached, its LoRA slots filled). "One adapter" traffic uses one adapter of each kind, request i
of the same kind as in the mixed traffic (same arrival time and prompt): only the number of adapters differs.

Starts the server on 127.0.0.1 (a free port) over ``--adapters`` random prompt-tuning adapters
(20 virtual tokens, written through the method's save path; untrained, which changes no cost) and
sends ``--requests`` greedy /v1/completions from ``--clients`` concurrent clients in three modes:

- ``single``: every request names the same adapter (the best case for batching);
- ``mixed``: requests cycle over all adapters, rows of different adapters share forward passes;
- ``mixed_unbatched``: the same mixed traffic, but each adapter's rows run in their own forward pass
  (what serving one adapter at a time gives).

Reports throughput (requests/s, generated tokens/s), p50/p95 latency, and the memory each extra
soft-prompt adapter adds (RSS delta over loading the adapters, and its tensor bytes) and what a hot
adapter's cached virtual-token key/values add (at most ``hot_prompts`` of them are kept). Each mode stops
after ``--requests`` or ``--max-seconds``, whichever comes first. Writes --out (JSON) when given.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

from tunelab.modeling import virtual_kv
from tunelab.models import load_model
from tunelab.serve.app import ServeLimits, create_app
from tunelab.serve.batcher import SoftPromptRow
from tunelab.serve.examples import write_lora_adapters, write_prefix_adapters, write_prompt_adapters
from tunelab.serve.local import serve_in_thread
from tunelab.serve.registry import AdapterRegistry

INPUTS = ["The meeting is on 2024-03-05.", "Summarise: the cat sat on the mat all day.",
          "Translate to French: good morning", "name[Blue Spice], food[Chinese], area[riverside]",
          "What is 17 plus 25?", "List three colours.", "Convert 03/07/2021 to ISO format.",
          "Is this review positive? The food was cold and late."]


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not got back (glibc ``mallinfo2``, all arenas; torch's CPU tensors
    come from malloc). Unlike RSS it sees allocations that reuse freed heap; None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def measure_memory(root: str, model, tokenizer, model_name: str, names: list[str], copies: int) -> dict:
    """RSS added per loaded soft-prompt adapter, over ``copies`` registries each loading every adapter
    (so enough adapters load to rise above the allocator's noise), next to the tensor bytes, and the
    bytes of one adapter's cached virtual-token key/values (kept only for the hot ones, see HotPrompts)."""
    warm = AdapterRegistry(root, model, tokenizer, model_name, max_loaded=len(names))
    warm.get(names[0])  # the first load pays for imports and peft's one-time setup
    gc.collect()
    before, heap_before = rss_bytes(), heap_in_use()
    registries = [AdapterRegistry(root, model, tokenizer, model_name, max_loaded=len(names)) for _ in range(copies)]
    for registry in registries:
        for name in names:
            registry.get(name)
    gc.collect()
    after, heap_after = rss_bytes(), heap_in_use()
    loaded = copies * len(names)
    soft = registries[0].get(names[0]).soft
    kv = virtual_kv(SoftPromptRow(model, soft))
    return {"adapters_loaded": loaded, "rss_delta_bytes": after - before,
            "rss_bytes_per_adapter": round((after - before) / loaded),
            "heap_bytes_per_adapter": round((heap_after - heap_before) / loaded) if heap_before is not None else None,
            "tensor_bytes_per_adapter": soft.numel() * soft.element_size(), "soft_prompt_shape": list(soft.shape),
            "hot_kv_bytes_per_adapter": sum(t.numel() * t.element_size() for t in kv.keys + kv.values)}


def memory_in_fresh_process(root: str, model_name: str, names: list[str], copies: int) -> dict:
    """``measure_memory`` in a new process that has done nothing else, so the adapters cannot reuse heap
    that earlier work (writing adapters, generating) freed, which hides them from RSS."""
    code = ("import json; from benchmarks.bench_serve import measure_memory; "
            f"from tunelab.models import load_model; m, t = load_model({model_name!r}); "
            f"print(json.dumps(measure_memory({root!r}, m, t, {model_name!r}, {names!r}, {copies})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def load(url: str, names: list[str], clients: int, requests: int, max_tokens: int, max_seconds: float) -> dict:
    """Send ``requests`` completions from ``clients`` threads (adapter i mod len(names)); latency per request."""
    latencies: list[float] = []
    tokens, errors = [0], [0]
    counter, lock = [0], threading.Lock()
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                if i >= requests:
                    return
                body = {"model": names[i % len(names)], "prompt": INPUTS[i % len(INPUTS)], "max_tokens": max_tokens,
                        "temperature": 0}
                start = time.perf_counter()
                r = http.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if r.status_code != 200:
                        errors[0] += 1
                        continue
                    latencies.append(elapsed)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "errors": errors[0], "seconds": round(wall, 2),
            "requests_per_second": round(len(latencies) / wall, 3),
            "tokens_per_second": round(tokens[0] / wall, 1),
            "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_latency_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)
            if latencies else None}


def run_mode(registry: AdapterRegistry, names: list[str], mix: bool, args) -> dict:
    app = create_app(registry, ServeLimits(), window_ms=args.window_ms, max_batch=args.clients, mix_adapters=mix)
    with serve_in_thread(app) as url:
        load(url, names, args.clients, args.clients, args.max_tokens, args.max_seconds)  # warm-up round
        before = dict(vars(app.state.batcher.stats))
        result = load(url, names, args.clients, args.requests, args.max_tokens, args.max_seconds)
        after = vars(app.state.batcher.stats)
    calls = after["calls"] - before["calls"]
    result["rows_per_forward_call"] = round((after["rows"] - before["rows"]) / calls, 2) if calls else None
    return result


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


def poisson_load(url: str, names: list[str], rate: float, requests: int, max_tokens: int, seed: int = 0,
                 prompts: list[str] | None = None, extra: dict | None = None,
                 texts: dict[int, str] | None = None) -> dict:
    """Open loop: ``requests`` streamed completions whose start times are a Poisson process of ``rate``/s
    (each on its own thread, so a slow answer never delays the next arrival); per request its time to the
    first streamed piece and its time per output token after that.

    ``prompts`` (default ``INPUTS``): request i sends ``prompts[i % len]``; ``extra``: fields added to every
    body (a server's own options); ``texts``: filled with request i's streamed text, for the requests that
    finished (bench_vs_vllm.py counts tokens and compares outputs from it)."""
    import random

    rng, pick = random.Random(seed), random.Random(seed + 1)  # the same arrival times for every adapter pool
    ttft: list[float] = []
    tpot: list[float] = []
    tokens, errors, lock = [0], [0], threading.Lock()
    inputs = prompts or INPUTS

    def one(i: int, adapter: int) -> None:
        body = {"model": names[adapter],
                "prompt": inputs[i % len(inputs)], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                **(extra or {})}
        start, first, pieces, text = time.perf_counter(), None, 0, []
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                if r.status_code != 200:
                    raise RuntimeError(r.status_code)
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"])
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        pieces += 1
                        first = first or time.perf_counter()
                        text.append(chunk["choices"][0]["text"])
        except Exception:
            with lock:
                errors[0] += 1
            return
        end = time.perf_counter()
        with lock:
            tokens[0] += pieces
            if texts is not None:
                texts[i] = "".join(text)
            if first is not None:
                ttft.append(first - start)
                if pieces > 1:
                    tpot.append((end - first) / (pieces - 1))

    threads, start = [], time.perf_counter()
    for i in range(requests):
        t = threading.Thread(target=one, args=(i, pick.randrange(len(names))))
        t.start()
        threads.append(t)
        time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"rate": rate, "requests": requests, "errors": errors[0], "seconds": round(wall, 2),
            "streamed_pieces_per_second": round(tokens[0] / wall, 1),
            "p50_ttft_s": _quantile(ttft, 0.5), "p95_ttft_s": _quantile(ttft, 0.95),
            "p50_tpot_s": _quantile(tpot, 0.5), "p95_tpot_s": _quantile(tpot, 0.95)}


def warm_every_adapter(url: str, names: list[str], concurrency: int = 16) -> None:
    """One 1-token completion per adapter, ``concurrency`` at a time: the server's per-adapter state (the
    virtual-token key/values of ``--hot-prompts`` soft prompts, LoRA slots) is filled before the clock starts,
    as in a server that has been up for a while (S-LoRA and Punica also measure the steady state)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> None:
        r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": INPUTS[0], "max_tokens": 1,
                                                      "temperature": 0}, timeout=600)
        r.raise_for_status()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, names))


def poisson_modes(registry: AdapterRegistry, names: list[str], args, single: list[str] | None = None) -> dict:
    """Every (scheduler, traffic, rate) cell of the ``--poisson`` benchmark, and the issue's ratios.

    ``single``: the one-adapter pool, as long as ``names`` with each name replaced by its kind's first adapter,
    so that request i has the same arrival time, prompt and kind (prompt tuning, prefix, LoRA or IPT: IPT rows
    carry a demonstration, so kinds differ in work) in both traffics and only the number of adapters differs;
    default ``names[:1]``."""
    rates = [float(r) for r in args.rates.split(",")]
    out: dict = {}
    for scheduler in ("continuous", "static"):
        app = create_app(registry, ServeLimits(max_tokens=max(512, args.max_tokens)), window_ms=args.window_ms,
                         max_batch=args.max_batch, scheduler=scheduler)
        with serve_in_thread(app) as url:
            for name in names:  # load every adapter before timing
                registry.get(name)
            warm_every_adapter(url, names)  # steady state: each adapter served once (its caches filled)
            poisson_load(url, names, 1000, min(8, args.requests), args.max_tokens)  # warm-up
            cell = {"unloaded": poisson_load(url, names, 0.5, 4, args.max_tokens)}
            for traffic, pool in (("mixed", names), ("single", single or names[:1])):
                for rate in rates:
                    cell[f"{traffic}@{rate:g}"] = poisson_load(url, pool, rate, args.requests, args.max_tokens)
        if app.state.scheduler is not None:  # the decode step that ran (inference.steps), as /metrics counts it
            cell["decode_step"] = app.state.scheduler.stats.step
        out[scheduler] = cell
    ratios = {}
    for rate in rates:
        c, s = out["continuous"], out["static"]
        one = c[f"single@{rate:g}"]["streamed_pieces_per_second"]
        ratios[f"mixed_over_single_throughput@{rate:g}"] = (
            round(c[f"mixed@{rate:g}"]["streamed_pieces_per_second"] / one, 3) if one else None)
        if s[f"mixed@{rate:g}"]["p95_ttft_s"] and c[f"mixed@{rate:g}"]["p95_ttft_s"]:
            ratios[f"continuous_over_static_p95_ttft@{rate:g}"] = round(
                c[f"mixed@{rate:g}"]["p95_ttft_s"] / s[f"mixed@{rate:g}"]["p95_ttft_s"], 3)
            if s["unloaded"]["p95_ttft_s"]:
                ratios[f"static_p95_ttft_over_unloaded@{rate:g}"] = round(
                    s[f"mixed@{rate:g}"]["p95_ttft_s"] / s["unloaded"]["p95_ttft_s"], 3)
    loaded = [r for r in rates if (s := out["static"][f"mixed@{r:g}"]["p95_ttft_s"]) and out["static"]["unloaded"]
              ["p95_ttft_s"] and s > 3 * out["static"]["unloaded"]["p95_ttft_s"]]
    # the load: the lowest rate at which the static batcher's p95 TTFT is > 3x its unloaded value
    ratios["static_loaded_rate"] = loaded[0] if loaded else None
    ratios["continuous_over_static_p95_ttft_at_loaded_rate"] = (
        ratios.get(f"continuous_over_static_p95_ttft@{loaded[0]:g}") if loaded else None)
    out["ratios"] = ratios
    return out


def stream_share(registry: AdapterRegistry, names: list[str], max_tokens: int = 64, repeats: int = 3) -> dict:
    """Unloaded streamed completions of ``max_tokens`` tokens (continuous scheduler): time to the first piece
    over the total time, median over ``repeats`` adapters; the issue asks for < 0.25 at 64 tokens."""
    app = create_app(registry, ServeLimits(max_tokens=max(512, max_tokens)), scheduler="continuous")
    shares, pieces = [], []
    with serve_in_thread(app) as url:
        for name in names[:repeats]:
            body = {"model": name, "prompt": "Count from one to one hundred in words, one per line.",
                    "max_tokens": max_tokens, "temperature": 0, "stream": True}
            start, first, n = time.perf_counter(), None, 0
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        n += 1
                        first = first or time.perf_counter()
            total = time.perf_counter() - start
            if first is not None:
                shares.append((first - start) / total)
                pieces.append(n)
    return {"max_tokens": max_tokens, "first_token_over_total": round(statistics.median(shares), 4) if shares else None,
            "streamed_pieces": pieces}


def memory_by_kind(registry: AdapterRegistry, by_kind: dict[str, list[str]]) -> dict:
    """Bytes each extra loaded adapter of each kind holds: its soft prompt, its prefix key/values, or its
    LoRA slot (the stacked factors' bytes per slot; no model copy), and the RSS added loading them all."""
    gc.collect()
    before = rss_bytes()
    out: dict = {}
    for kind, names in by_kind.items():
        if not names:
            continue
        served = [registry.get(n) for n in names]
        one = served[0]
        if one.lora is not None:
            for s in served[: registry.lora.capacity]:
                registry.lora.release(registry.lora.acquire(s.name, s.lora) or 0)
            slots = len(registry.lora.loaded())
            out[kind] = {"tensor_bytes_per_adapter": one.lora.nbytes,
                         "slot_bytes_per_adapter": round(registry.lora.nbytes() / max(1, slots)), "slots": slots}
        elif one.soft is not None:
            out[kind] = {"tensor_bytes_per_adapter": one.soft.numel() * one.soft.element_size()}
        else:
            base_ids = {id(p) for p in registry.model.parameters()}
            params = [p for p in one.adapter.parameters() if id(p) not in base_ids]
            out[kind] = {"tensor_bytes_per_adapter": sum(p.numel() * p.element_size() for p in params)}
    gc.collect()
    out["rss_delta_bytes_all_loaded"] = rss_bytes() - before
    return out


def write_ipt_adapters(model_name: str, root: Path, count: int, work: Path) -> list[str]:
    """``count`` copies of one IPT run (one training step on the built-in date_format task, 20 virtual
    tokens), so that each loads and serves like a trained IPT adapter, demonstrations drawn from its run."""
    import shutil

    from tunelab.config import build_config
    from tunelab.run import run

    if count == 0:
        return []
    out = work / "ipt_run"
    run(build_config(None, ["data.task=date_format", f"model.name={model_name}", "method.name=ipt", "train.steps=1",
                            "train.batch_size=2", "data.max_train=16", "data.max_eval=1", f"out={out}"]),
        progress=False)
    names = []
    for i in range(count):
        names.append(f"ipt{i:02d}")
        shutil.copytree(out / "adapter", root / names[-1])
        if (out / "result.json").is_file():  # older adapters keep the run config beside the adapter
            shutil.copy(out / "result.json", root / names[-1] / "result.json")
    return names


def poisson_main(model, tokenizer, args) -> dict:
    """``--poisson`` / ``--quick``: write the mixed adapters, run every cell, add streaming and memory."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as work:
        root = Path(tmp)
        counts = {kind: round(args.adapters * share) for kind, share in
                  (("prefix_tuning", args.prefix_share), ("lora", args.lora_share), ("ipt", args.ipt_share))}
        counts["prompt_tuning"] = args.adapters - sum(counts.values())
        by_kind = {"prompt_tuning": write_prompt_adapters(model, tokenizer, args.model, root, counts["prompt_tuning"]),
                   "prefix_tuning": write_prefix_adapters(model, tokenizer, args.model, root, counts["prefix_tuning"]),
                   "lora": write_lora_adapters(model, tokenizer, args.model, root, counts["lora"]),
                   "ipt": write_ipt_adapters(args.model, root, counts["ipt"], Path(work))}
        names = [n for i in range(args.adapters) for kind in by_kind.values() if i < len(kind) for n in [kind[i]]]
        first = {n: kind[0] for kind in by_kind.values() for n in kind}  # one adapter per kind: the single pool
        registry = AdapterRegistry(tmp, model, tokenizer, args.model, max_loaded=args.adapters,
                                   max_lora_adapters=args.max_lora_adapters)
        report = {"model": args.model, "adapters": counts, "max_tokens": args.max_tokens,
                  "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "load_average": os.getloadavg(), "memory_by_kind": memory_by_kind(registry, by_kind),
                  **poisson_modes(registry, names, args, [first[n] for n in names])}
        report["stream"] = stream_share(registry, names)
        report["lora_slots"] = vars(registry.lora.stats)
    r = report["ratios"]
    report["done_when"] = {
        "mixed_over_single_throughput (>= 0.9)": {k.split("@")[1]: v for k, v in r.items()
                                                  if k.startswith("mixed_over_single")},
        "continuous_over_static_p95_ttft_at_loaded_rate (<= 0.5)": r["continuous_over_static_p95_ttft_at_loaded_rate"],
        "static_loaded_rate": r["static_loaded_rate"],
        "stream_first_token_over_total_64 (< 0.25)": report["stream"]["first_token_over_total"]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96, help="per mode")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=240, help="per mode")
    parser.add_argument("--window-ms", type=float, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-copies", type=int, default=10, help="registries loading every adapter")
    parser.add_argument("--out", default=None)
    parser.add_argument("--poisson", action="store_true", help="the open-loop scheduler benchmark (see above)")
    parser.add_argument("--rates", default="2,8,32", help="--poisson: arrival rates, requests/s")
    parser.add_argument("--prefix-share", type=float, default=0.25, help="--poisson: share of prefix adapters")
    parser.add_argument("--lora-share", type=float, default=0.25, help="--poisson: share of LoRA adapters")
    parser.add_argument("--ipt-share", type=float, default=0.1, help="--poisson: share of IPT adapters")
    parser.add_argument("--max-lora-adapters", type=int, default=32, help="--poisson: LoRA slots")
    parser.add_argument("--max-batch", type=int, default=32, help="--poisson: rows per forward pass")
    parser.add_argument("--quick", action="store_true",
                        help="--poisson with 100 adapters, rates 1,4, 20 requests per cell, 16 tokens (<= ~8 min)")
    args = parser.parse_args()
    if args.quick:
        args.poisson, args.adapters, args.rates, args.requests, args.max_tokens = True, 100, "1,4", 20, 16
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    if args.poisson:
        report = poisson_main(model, tokenizer, args)
        print(json.dumps(report, indent=2))
        if args.quick:
            print("done-when ratios:", json.dumps(report["done_when"]))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        names = write_prompt_adapters(model, tokenizer, args.model, Path(tmp), args.adapters)
        memory = memory_in_fresh_process(tmp, args.model, names, args.memory_copies)
        registry = AdapterRegistry(tmp, model, tokenizer, args.model, max_loaded=args.adapters)
        modes = {"single": run_mode(registry, names[:1], True, args),
                 "mixed": run_mode(registry, names, True, args),
                 "mixed_unbatched": run_mode(registry, names, False, args)}
    ratio = modes["mixed"]["tokens_per_second"] / modes["single"]["tokens_per_second"]
    report = {"model": args.model, "adapters": args.adapters, "clients": args.clients, "max_tokens": args.max_tokens,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "memory": memory,
              "modes": modes, "mixed_over_single_throughput": round(ratio, 3),
              "mixed_over_unbatched_throughput": round(
                  modes["mixed"]["tokens_per_second"] / modes["mixed_unbatched"]["tokens_per_second"], 3)}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
