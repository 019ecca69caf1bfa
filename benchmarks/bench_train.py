"""Training throughput: tunelab's loop vs the baseline a user would write (transformers Trainer + peft).

Default mode: ours uses its defaults (length-grouped batches, LM head at label positions only); the
baseline is a stock Trainer + peft with its default random sampler and padding to the longest in
the batch. Both see the same E2E examples rendered by the same template, the same optimizer, learning
rate, constant schedule, gradient clipping, batch size and number of steps; they draw different random
batches, so compare the final loss (mean of the last steps), not per-step losses.

``--same-batches``: both sides get identical ungrouped batches in the same order (the baseline reads
our batch order through a sequential sampler), to show the per-step losses agree (correctness).

Each (method, side) runs in its own process so peak RSS is its own; sides alternate within one run
(the machine is shared, so only ratios measured in the same run mean anything). MFU is the useful
model FLOPs per second (same count for both sides) over this machine's fp32 GEMM peak (bench_gemm).

Run: .venv/bin/python benchmarks/bench_train.py [--steps 12] [--methods prompt_tuning,lora,...] [--same-batches]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "train.jsonl"
METHODS = ("prompt_tuning", "ipt", "lora", "full_finetune")
LR = {"prompt_tuning": 3e-2, "ipt": 3e-2, "lora": 1e-3, "full_finetune": 5e-5}


def encoded_examples(method: str, tokenizer, data: Path, n: int, seed: int):
    """Our rendering of the first n examples (with retrieved demonstrations for IPT)."""
    from tunelab.data import load_examples
    from tunelab.formatting import PromptLayout, build_prompt, encode, resolve_template
    from tunelab.methods import METHODS as REGISTRY

    examples = load_examples(data)[:n]
    method_impl = REGISTRY[method]
    demos = method_impl.demonstrations(method_impl.Config(), examples, seed)
    template = resolve_template("auto", tokenizer)
    return [encode(tokenizer, build_prompt(tokenizer, PromptLayout(template, demos=demos), e), e.output, 512)
            for e in examples], examples


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[int]:
    """Our ungrouped batch order (what ``--same-batches`` feeds both sides)."""
    from tunelab.train import batch_indices

    return [i for step in range(steps) for i in batch_indices(n, batch_size, step, seed)]


def flops_per_token(model, method: str, label_fraction: float) -> float:
    """Useful training FLOPs per (non-pad) token: forward 2N + backward to activations 2N (+ 2N weight
    gradients when the base weights train), over the body; the LM head counted only at label tokens."""
    hidden = model.config.get_text_config().hidden_size
    vocab = model.config.get_text_config().vocab_size
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    k = 6 if method == "full_finetune" else 4
    return k * body + k * hidden * vocab * label_fraction


def run_ours(method: str, args) -> dict:
    from tunelab.config import TrainConfig
    from tunelab.methods import METHODS as REGISTRY
    from tunelab.models import load_model
    from tunelab.train import train

    model, tok = load_model(args.model)
    data, examples = encoded_examples(method, tok, args.data, args.examples, args.seed)
    impl = REGISTRY[method]
    adapter = impl.build(model, tok, impl.Config(), examples, args.seed)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, schedule="constant",
                      group_by_length=not args.same_batches, precision=args.precision)
    stats = train(adapter, data, cfg, LR[method], tok.pad_token_id)
    return {"seconds": stats.seconds, "tokens": stats.tokens, "losses": stats.losses, "precision": stats.precision,
            "flops_per_token": flops_per_token(model, method, _label_fraction(data))}


def _label_fraction(data) -> float:
    return sum(sum(t != -100 for t in e.labels[1:]) for e in data) / sum(len(e.input_ids) for e in data)


def run_baseline(method: str, args) -> dict:
    import torch
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunelab.methods import METHODS as REGISTRY
    from tunelab.models import load_model, model_dir

    model, tok = load_model(args.model)
    data, examples = encoded_examples(method, tok, args.data, args.examples, args.seed)
    if method in ("prompt_tuning", "ipt"):
        cfg = REGISTRY[method].Config()
        model = get_peft_model(model, PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=examples[0].instruction,
            tokenizer_name_or_path=str(model_dir(args.model))))
    elif method == "lora":
        cfg = REGISTRY["lora"].Config()
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                                                 lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules)))
    order = batches(len(data), args.batch_size, args.steps, args.seed) if args.same_batches else range(len(data))
    rows = [{"input_ids": data[i].input_ids, "labels": data[i].labels,
             "attention_mask": [1] * len(data[i].input_ids)} for i in order]

    class InOrder(Trainer):  # the exact batches tunelab sees, in the same order
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    seen = {"tokens": 0}
    pad_longest = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    def collator(features):  # count the real (non-pad) tokens the baseline trains on
        seen["tokens"] += sum(len(f["input_ids"]) for f in features)
        return pad_longest(features)

    targs = TrainingArguments(output_dir=str(args.tmp), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=LR[method], lr_scheduler_type="constant",
                              weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                              report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                              seed=args.seed, remove_unused_columns=False, bf16=args.baseline_bf16)
    trainer = (InOrder if args.same_batches else Trainer)(model=model, args=targs, train_dataset=rows,
                                                          data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del torch
    return {"seconds": seconds, "tokens": seen["tokens"], "losses": losses}


def worker(args) -> None:
    import resource

    import torch

    torch.manual_seed(args.seed)
    result = (run_ours if args.side == "ours" else run_baseline)(args.method, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(side: str, method: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--side", side, "--method", method, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--examples", str(args.examples), "--data", str(args.data),
           "--model", args.model, "--seed", str(args.seed), "--precision", args.precision] + \
        (["--same-batches"] if args.same_batches else []) + (["--baseline-bf16"] if args.baseline_bf16 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--tail", type=int, default=4, help="final loss = mean of the last TAIL steps")
    parser.add_argument("--same-batches", action="store_true",
                        help="identical ungrouped batches on both sides: per-step losses must agree")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                        help="ours: train.precision (bf16 = autocast; auto = bf16 where measured faster)")
    parser.add_argument("--baseline-bf16", action="store_true", help="baseline: TrainingArguments(bf16=True)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/tunelab-bench-train"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_gemm import measure

    gemm = measure()
    peaks = {"fp32": gemm["fp32_peak_gflops"], "bf16": gemm["bf16_gflops_1024x576x1536"]}
    mode = "identical ungrouped batches" if args.same_batches else "ours: grouped batches; baseline: Trainer random sampler"
    print(f"GEMM peak fp32 {peaks['fp32']} / bf16 {peaks['bf16']} GFLOP/s; {args.steps} steps x batch "
          f"{args.batch_size}; {mode}; MFU is over the peak of the side's precision")
    print(f"{'method':14} {'side':9} {'prec':>5} {'tok/s':>8} {'MFU':>6} {'peak MB':>8} {'final loss':>10}   "
          "ratio (ours/baseline)")
    for k, method in enumerate(args.methods.split(",")):
        order = ("baseline", "ours") if k % 2 == 0 else ("ours", "baseline")  # alternate who runs first
        sides = {side: spawn(side, method, args) for side in order}
        sides = {side: sides[side] for side in ("baseline", "ours")}
        fpt = sides["ours"].get("flops_per_token")
        for side, r in sides.items():
            if "error" in r:
                print(f"{method:14} {side:9} error: {r['error']}")
                continue
            r["tok_s"] = r["tokens"] / r["seconds"]
            r["final_loss"] = sum(r["losses"][-args.tail:]) / len(r["losses"][-args.tail:])
            prec = r.get("precision") or ("bf16" if args.baseline_bf16 else "fp32")
            r["mfu"] = r["tok_s"] * fpt / (peaks[prec] * 1e9) if fpt else float("nan")
            print(f"{method:14} {side:9} {prec:>5} {r['tok_s']:8.1f} {r['mfu']:6.1%} {r['peak_rss_mb']:8.0f} "
                  f"{r['final_loss']:10.4f}")
        if all("error" not in r for r in sides.values()):
            ratio = sides["ours"]["tok_s"] / sides["baseline"]["tok_s"]
            diffs = [abs(a - b) for a, b in zip(sides["ours"]["losses"], sides["baseline"]["losses"], strict=False)]
            note = f"max |loss diff| per step {max(diffs):.4f}" if args.same_batches else \
                f"final loss diff {sides['ours']['final_loss'] - sides['baseline']['final_loss']:+.4f}"
            print(f"{method:14} ratio     {ratio:8.2f}x  {note}", flush=True)
        print(json.dumps({"method": method, **sides}), file=sys.stderr)


if __name__ == "__main__":
    main()
