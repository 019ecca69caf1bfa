"""Speed on one device with random-weight models (``random:smollm2-135m``, ``random:llama-3.2-1b``): the numbers
benchmarks/gpu_check.sh collects. Quality is not meaningful here (random weights); every figure is a speed.

- ``train``: tokens/s and MFU of prompt tuning, LoRA and full fine-tuning, tunelab's loop vs transformers'
  ``Trainer`` + peft on the same device, data, batch size and steps (same process, one after the other, so the
  ratio is measured on one card in one run). MFU = useful FLOPs/token (bench_train.flops_per_token) x tok/s over
  the card's bf16 dense peak.
- ``generate``: greedy decode tok/s at batch 1 / 16 / 64 (EOS never stops a row) against the memory-bandwidth
  bound of a decode step (roofline.decode_step_limit: every weight and every cached key/value read once).
- ``serve``: the continuous scheduler in process (no HTTP): generated tok/s over 100 random prompt-tuning
  adapters mixed in the batch vs the same requests all on one adapter.

Each part writes OUT/PART.json as it ends (a part that fails writes its error there and the next one runs).
Run: python benchmarks/gpu_speed.py --parts train,generate,serve --device cuda --out OUT
     python benchmarks/gpu_speed.py --device cpu --dry-run --out /tmp/x   # the tiny model at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train / roofline beside this file

# bf16 dense tensor-core peaks (TFLOP/s) and HBM bandwidth (GB/s) from the vendors' data sheets, by device name
CARDS = {"H200": (989.0, 4800.0), "H100 PCIe": (756.0, 2000.0), "H100": (989.0, 3350.0),
         "A100-SXM4-80GB": (312.0, 2039.0), "A100": (312.0, 1555.0), "L40S": (362.0, 864.0)}
LR = {"prompt_tuning": 3e-2, "lora": 1e-3, "full_finetune": 5e-5}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_limits(device: torch.device, name: str) -> dict:
    """The data-sheet peak and bandwidth where the card is known, and the bandwidth measured by a copy."""
    peak, sheet_bw = next((v for k, v in CARDS.items() if k in name), (None, None))
    n = (1 << 28) if device.type == "cuda" else (1 << 22)  # 1 GiB of fp32 on a GPU, 16 MiB on the CPU
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    measured = 5 * 2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9  # read + write
    return {"bf16_peak_tflops": peak, "hbm_gbs_datasheet": sheet_bw, "copy_gbs_measured": round(measured, 1)}


def examples(n: int, words: int, seed: int):
    """``n`` procedural examples of ~``words`` random words each (only lengths matter for speed)."""
    from tunelab.data.example import Example

    rng = random.Random(seed)
    vocab = ["alpha", "river", "stone", "cloud", "seven", "green", "quiet", "market", "paper", "light"]
    return [Example(id=str(i), task="speed", instruction="Repeat the last three words.",
                    input=" ".join(rng.choice(vocab) for _ in range(words)),
                    output=" ".join(rng.choice(vocab) for _ in range(8))) for i in range(n)]


def encoded(tok, rows, max_length: int):
    from tunelab.formatting import PromptLayout, build_prompt, encode

    layout = PromptLayout("plain", max_length=max_length)
    return [encode(tok, build_prompt(tok, layout, e), e.output, max_length) for e in rows]


def train_ours(method: str, args, device, rows, data) -> dict:
    from bench_train import flops_per_token

    from tunelab.config import TrainConfig
    from tunelab.methods import METHODS
    from tunelab.models import load_model
    from tunelab.train import train

    model, tok = load_model(args.model, seed=args.seed)
    impl = METHODS[method]
    adapter = impl.build(model, tok, impl.Config(), rows, args.seed).to(device)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, schedule="constant",
                      group_by_length=False, precision="auto")
    train(adapter, data, TrainConfig(steps=2, batch_size=args.batch_size, precision="auto"), LR[method],
          tok.pad_token_id)  # warm-up: kernels chosen, allocator grown
    sync(device)
    stats = train(adapter, data, cfg, LR[method], tok.pad_token_id)
    sync(device)
    labels = sum(sum(t != -100 for t in e.labels[1:]) for e in data) / sum(len(e.input_ids) for e in data)
    return {"seconds": stats.seconds, "tokens": stats.tokens, "precision": stats.precision,
            "tokens_per_second": stats.tokens / stats.seconds, "final_loss": stats.final_loss,
            "flops_per_token": flops_per_token(model, method, labels),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}


def train_baseline(method: str, args, device, rows, data, bf16: bool) -> dict:
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunelab.methods import METHODS
    from tunelab.models import load_model

    model, tok = load_model(args.model, seed=args.seed)
    if method == "prompt_tuning":
        model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                         num_virtual_tokens=METHODS[method].Config().num_virtual_tokens))
    elif method == "lora":
        cfg = METHODS["lora"].Config()
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                                                 lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules)))
    seen: list[int] = []  # real tokens of each batch, in the order the steps take them
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collate(features):
        seen.append(sum(len(f["input_ids"]) for f in features))
        return pad(features)

    rows_in = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in data]
    targs = TrainingArguments(output_dir=str(args.tmp), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps + 2, learning_rate=LR[method], lr_scheduler_type="constant",
                              weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                              report_to=[], use_cpu=device.type == "cpu", disable_tqdm=True,
                              dataloader_num_workers=0, seed=args.seed, remove_unused_columns=False, bf16=bf16)
    trainer = Trainer(model=model, args=targs, train_dataset=rows_in, data_collator=collate)
    times: list[float] = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # per-step wall times: the first two steps are the warm-up, as ours
        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter())

    trainer.add_callback(Clock())
    sync(device)
    trainer.train()
    steps = len(times) - 2
    seconds = times[-1] - times[1]
    tokens = sum(seen[2:2 + steps])  # the timed steps' batches
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds, "bf16": bf16}


def run_train(args, device, info) -> dict:
    rows = examples(args.examples, args.words, args.seed)
    out = {}
    for method in args.methods.split(","):
        from tunelab.models import load_tokenizer

        data = encoded(load_tokenizer(args.model), rows, args.max_length)
        ours = train_ours(method, args, device, rows, data)
        free(device)
        base = train_baseline(method, args, device, rows, data, bf16=ours["precision"] == "bf16")
        free(device)
        peak = (info["limits"]["bf16_peak_tflops"] or 0) * 1e12
        for side in (ours, base):
            side["mfu"] = ours["flops_per_token"] * side["tokens_per_second"] / peak if peak else None
        out[method] = {"ours": ours, "trainer_peft": base,
                       "speedup": ours["tokens_per_second"] / base["tokens_per_second"]}
        print(f"train {method}: ours {ours['tokens_per_second']:.0f} tok/s, Trainer+peft "
              f"{base['tokens_per_second']:.0f} tok/s, x{out[method]['speedup']:.2f}", flush=True)
    return out


def free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def decode_seconds(adapter, prompts: list[list[int]], new: int, pad_id: int, device: torch.device) -> float:
    """Wall time of greedy generation of ``new`` tokens per row (no EOS: every row runs to the end)."""
    from tunelab.inference import engine
    from tunelab.inference.sampling import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new, precision="auto")
    sync(device)
    start = time.perf_counter()
    batch = engine.Batch.on(adapter.model, "auto")
    batch.admit([(adapter, p) for p in prompts], pad_id)
    engine.run_to_completion(batch, cfg, [], pad_id)
    sync(device)
    return time.perf_counter() - start


def run_generate(args, device, info) -> dict:
    from roofline import decode_step_limit, facts_of

    from tunelab.methods.io import load_base
    from tunelab.models import load_tokenizer, random_model

    out = {}
    precision = info["inference_precision_auto"]
    for name in args.gen_models.split(","):
        tok = load_tokenizer(name)
        model = random_model(name, len(tok), args.seed, "bfloat16" if precision == "bf16" else "float32", device)
        model.eval()
        adapter = load_base(model, tok).adapter
        facts = facts_of(model)
        rng = random.Random(args.seed)
        rows = {}
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = [[rng.randrange(3, len(tok)) for _ in range(args.prompt_tokens)] for _ in range(batch)]
            decode_seconds(adapter, prompts, 2, tok.pad_token_id, device)  # warm-up
            one = decode_seconds(adapter, prompts, 1, tok.pad_token_id, device)
            many = decode_seconds(adapter, prompts, args.new_tokens, tok.pad_token_id, device)
            step = (many - one) / (args.new_tokens - 1)
            context = args.prompt_tokens + args.new_tokens / 2
            bw = info["limits"]["hbm_gbs_datasheet"] or info["limits"]["copy_gbs_measured"]
            peak = (info["limits"]["bf16_peak_tflops"] or 1.0) * 1e3
            wbytes = 2 if precision == "bf16" else 4
            limit, arithmetic = decode_step_limit(facts, batch, context, wbytes, wbytes, bw, peak)
            rows[batch] = {"decode_step_ms": step * 1e3, "tokens_per_second": batch / step,
                           "bound_tokens_per_second": batch / limit, "of_bound": limit / step,
                           "prefill_seconds": one, "bound": arithmetic}
            print(f"generate {name} batch {batch}: {batch / step:.0f} tok/s = {limit / step:.0%} of the "
                  f"bandwidth bound", flush=True)
        out[name] = {"precision": precision, "params": facts.params, "batches": rows}
        del model, adapter
        free(device)
    return out


def run_serve(args, device, info) -> dict:
    from tunelab.generate import GenerationConfig
    from tunelab.models import load_model
    from tunelab.serve.examples import write_prompt_adapters
    from tunelab.serve.registry import AdapterRegistry
    from tunelab.serve.scheduler import Request, Scheduler

    model, tok = load_model(args.model, seed=args.seed)
    root = Path(args.tmp) / "adapters"
    names = write_prompt_adapters(model, tok, args.model, root, args.adapters, num_virtual_tokens=20)
    model.to(device).eval()
    registry = AdapterRegistry(root, model, tok, args.model, max_loaded=args.adapters + 8)
    scheduler = Scheduler(tok, max_batch=args.max_batch)
    cfg = GenerationConfig(max_new_tokens=args.serve_tokens, precision="auto")
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, len(tok)) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]

    def load(adapters: list[str]) -> dict:
        sync(device)
        start = time.perf_counter()
        futures = [scheduler.submit(Request(registry.get(adapters[i % len(adapters)]), p, cfg))
                   for i, p in enumerate(prompts)]
        tokens = sum(f.result().completion_tokens for f in futures)
        seconds = time.perf_counter() - start
        return {"requests": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}

    for name in names:  # every adapter loaded and its virtual tokens cached: a running server's steady state
        scheduler.submit(Request(registry.get(name), prompts[0], GenerationConfig(max_new_tokens=1))).result()
    mixed, single = load(names), load(names[:1])
    out = {"adapters": len(names), "mixed": mixed, "one_adapter": single,
           "mixed_over_one": mixed["tokens_per_second"] / single["tokens_per_second"]}
    print(f"serve {len(names)} mixed adapters {mixed['tokens_per_second']:.0f} tok/s, one adapter "
          f"{single['tokens_per_second']:.0f} tok/s (x{out['mixed_over_one']:.2f})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="train,generate,serve", help="any of train, generate, serve")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny model and sizes: checks the script, no figures")
    parser.add_argument("--out", type=Path, required=True, help="folder for PART.json")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/tunelab-gpu-speed"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="random:smollm2-135m", help="train and serve")
    parser.add_argument("--gen-models", default="random:smollm2-135m,random:llama-3.2-1b")
    parser.add_argument("--methods", default="prompt_tuning,lora,full_finetune")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--words", type=int, default=120, help="input words per training example")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--serve-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    if args.dry_run:  # the same code paths on the tiny model, a few seconds on a CPU
        args.model = args.gen_models = "tiny"
        args.steps, args.batch_size, args.examples, args.words, args.max_length = 2, 2, 8, 8, 64
        args.batches, args.prompt_tokens, args.new_tokens = "1,4", 8, 4
        args.adapters, args.requests, args.serve_tokens, args.max_batch = 3, 6, 3, 4
    args.tmp.mkdir(parents=True, exist_ok=True)
    from tunelab.distributed import describe, resolve_device

    device = resolve_device(args.device)
    info = describe(device)
    info["limits"] = card_limits(device, info["name"])
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"train": run_train, "generate": run_generate, "serve": run_serve}
    failed = False
    for part in args.parts.split(","):
        result = {"part": part, "device": info, "dry_run": args.dry_run,
                  "quality_meaningful": False,  # random weights: speed only
                  "models": sorted({args.model, *args.gen_models.split(",")})}
        try:
            result[part] = parts[part](args, device, info)
        except Exception as exc:  # one part's failure (an OOM, a missing package) must not hide the others
            import traceback

            failed = True
            result["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            print(f"{part} FAILED: {result['error']}", flush=True)
        free(device)
        (args.out / f"{part}.json").write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.out / f'{part}.json'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
