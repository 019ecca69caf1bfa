"""Training throughput: tunelab's loop vs the baseline a user would write (transformers Trainer + peft).

Both sides get the same model, the same E2E examples rendered by the same template, the same batches in
the same order (the baseline reads our precomputed batch order through a sequential sampler), the same
optimizer, learning rate, constant schedule, gradient clipping and number of steps. Each (method, side)
runs in its own process so peak RSS is its own. Prints tokens/s, peak RSS and the loss each reaches,
and the ratio ours / baseline.

Run: .venv/bin/python benchmarks/bench_train.py [--steps 8] [--methods prompt_tuning,lora,...]
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
    from tunelab.formatting import build_prompt, encode, resolve_template
    from tunelab.methods import METHODS as REGISTRY

    examples = load_examples(data)[:n]
    method_impl = REGISTRY[method]
    demos = method_impl.demonstrations(method_impl.Config(), examples, seed)
    template = resolve_template("auto", tokenizer)
    return [encode(tokenizer, build_prompt(e, tokenizer, template, demos(e) if demos else ()), e.output, 512)
            for e in examples], examples


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[int]:
    from tunelab.train import batch_indices

    return [i for step in range(steps) for i in batch_indices(n, batch_size, step, seed)]


def run_ours(method: str, args) -> dict:
    from tunelab.config import TrainConfig
    from tunelab.methods import METHODS as REGISTRY
    from tunelab.models import load_model
    from tunelab.train import train

    model, tok = load_model(args.model)
    data, examples = encoded_examples(method, tok, args.data, args.examples, args.seed)
    impl = REGISTRY[method]
    adapter = impl.build(model, tok, impl.Config(), examples, args.seed)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, schedule="constant")
    stats = train(adapter, data, cfg, LR[method], tok.pad_token_id)
    return {"seconds": stats.seconds, "tokens": stats.tokens, "losses": stats.losses}


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
    order = batches(len(data), args.batch_size, args.steps, args.seed)
    rows = [{"input_ids": data[i].input_ids, "labels": data[i].labels,
             "attention_mask": [1] * len(data[i].input_ids)} for i in order]

    class InOrder(Trainer):  # the exact batches tunelab sees, in the same order
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    targs = TrainingArguments(output_dir=str(args.tmp), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=LR[method], lr_scheduler_type="constant",
                              weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                              report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                              seed=args.seed, remove_unused_columns=False)
    trainer = InOrder(model=model, args=targs, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(r["input_ids"]) for r in rows)
    del torch
    return {"seconds": seconds, "tokens": tokens, "losses": losses}


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
           "--model", args.model, "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/tunelab-bench-train"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"{'method':14} {'side':9} {'tok/s':>8} {'peak MB':>8} {'last loss':>9}   ratio (ours/baseline)")
    for method in args.methods.split(","):
        sides = {side: spawn(side, method, args) for side in ("baseline", "ours")}
        for side, r in sides.items():
            if "error" in r:
                print(f"{method:14} {side:9} error: {r['error']}")
                continue
            r["tok_s"] = r["tokens"] / r["seconds"]
            print(f"{method:14} {side:9} {r['tok_s']:8.1f} {r['peak_rss_mb']:8.0f} {r['losses'][-1]:9.4f}")
        if all("error" not in r for r in sides.values()):
            ratio = sides["ours"]["tok_s"] / sides["baseline"]["tok_s"]
            diffs = [abs(a - b) for a, b in zip(sides["ours"]["losses"], sides["baseline"]["losses"], strict=False)]
            print(f"{method:14} ratio     {ratio:8.2f}x  max |loss diff| per step {max(diffs):.4f}")
        print(json.dumps({"method": method, **sides}), file=sys.stderr)


if __name__ == "__main__":
    main()
