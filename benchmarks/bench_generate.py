"""Scoring (prefill) and greedy generation speed: tunelab's fast path vs peft's default path.

Methods: the base model, prompt tuning and IPT (20 virtual tokens, IPT with one demonstration per input),
prefix tuning (20 virtual tokens), and ``icl``: the base model on IPT's prompts (IPT's speed reference), all
on one loaded model, on E2E test inputs.

- Scoring: log-likelihood of the reference output after the prompt (rank classification, loss
  evaluation) of ``--score-examples`` sequences, batches of 16. Ours: ``modeling.score_sequences``
  (length-sorted batches, virtual tokens from the per-adapter cache, LM head only at label positions).
  peft: batches in data order, ``PeftModel(input_ids, attention_mask)`` full logits, then the same gather.
- Generation: greedy, ``--new-tokens`` tokens, batch 1 and 16. Ours: ``generate.generate``; peft:
  ``PeftModel.generate`` (the base model: ``model.generate``). The goal compares our prompt-learning
  methods with the base model at the same batch size.
- Checks: our batched output == our one-by-one output == one-by-one with the transformers forward as the decode
  step (``inference.steps.prefer("transformers")``); for peft, how many rows differ between its batched and
  one-by-one output. The decode step that ran (``inference.steps``) is printed and in RESULT.

- Paths (``--path before|now|both``): "before" is fp32 on this tree's engine; "now" is ``--precision`` (default
  auto: bf16 per phase where the CPU has bf16 units). With both, every row prints before / now / peft side by
  side, and the share of greedy outputs "now" keeps identical to "before". Old code is not kept alive here:
  ``--baseline-rev REV`` runs this benchmark with the same arguments at git revision REV (``baseline.py``) and
  prints its RESULT and the ratios of every shared number.
- ``--roofline``: the machine's limits (bench_gemm: GEMM peaks, memory bandwidth), then prefill tok/s at
  batch 16 and the time per decode step at batch 1 / 16 / 64 for before, now and peft (the base model;
  per-step times of the other methods at batch 16 show what their virtual tokens cost per step), each
  against its limit (``roofline.py``: the arithmetic is printed).

Ours and peft alternate within one run (the machine is shared; only same-run ratios mean anything).
Run: .venv/bin/python benchmarks/bench_generate.py [--examples 16] [--new-tokens 24] [--repeats 2]
     .venv/bin/python benchmarks/bench_generate.py --quick     # everything of issue 16 in ~5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"
sys.path.insert(0, str(Path(__file__).parent))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def build(args):
    from tunelab.data import load_examples
    from tunelab.formatting import PromptLayout, build_prompt, encode, encode_prompt, resolve_template
    from tunelab.methods import METHODS
    from tunelab.methods.base import MethodConfig, freeze
    from tunelab.methods.icl import FrozenAdapter
    from tunelab.models import load_model

    model, tok = load_model(args.model)
    freeze(model)
    train = load_examples(args.data / "train.jsonl")[:200]
    test = load_examples(args.data / "test.jsonl")[: max(args.examples, args.score_examples)]
    template = resolve_template("auto", tok)
    adapters = {"base": FrozenAdapter(model, "base", MethodConfig())}
    for name in ("prompt_tuning", "ipt", "prefix_tuning"):
        impl = METHODS[name]
        extra = {"selection": "random"} if name == "ipt" else {}
        cfg = impl.Config(num_virtual_tokens=20, **extra)
        adapters[name] = impl.build(model, tok, cfg, train, 0)
        if name == "prefix_tuning":  # a trained-looking (non-zero) prefix
            with torch.no_grad():
                for p in adapters[name].trainable_parameters():
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    # the base model on IPT's prompts (same demonstration): the reference for IPT's generation speed
    adapters["icl"] = FrozenAdapter(model, "icl", MethodConfig())
    ipt_demos = METHODS["ipt"].demonstrations(adapters["ipt"].config, train, 0)
    data = {}
    for name in adapters:
        demos = ipt_demos if name in ("ipt", "icl") else None
        texts = [build_prompt(tok, PromptLayout(template, demos=demos), e) for e in test]
        data[name] = ([encode_prompt(tok, t, 1024) for t in texts[: args.examples]],
                      [encode(tok, t, e.output, 1024) for t, e in zip(texts, test, strict=True)][: args.score_examples])
    return model, tok, adapters, data


def peft_of(adapter):
    return getattr(adapter, "peft_model", None) or adapter.model


SCORE_BATCH = 16


def score_ours(adapter, encoded, path="now"):
    from tunelab.modeling import score_sequences

    return torch.tensor(score_sequences(adapter, encoded, 2, SCORE_BATCH, precision=PATHS[path][0]))


def score_peft(adapter, encoded):
    """What a user writes: batches of 16 in data order, padded to the longest, full logits, then a gather."""
    from tunelab.modeling import mask_for, pad_batch

    out = []
    for start in range(0, len(encoded), SCORE_BATCH):
        chunk = encoded[start:start + SCORE_BATCH]
        ids = [e.input_ids for e in chunk]
        labels = pad_batch([e.labels for e in chunk], -100)
        with torch.no_grad():
            logits = peft_of(adapter)(input_ids=pad_batch(ids, 2), attention_mask=mask_for(ids)).logits
        logits = logits[:, -labels.shape[1]:]  # peft prepends the virtual tokens' logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        target = labels[:, 1:]
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((picked * (target != -100)).sum(-1))
    return torch.cat(out)


PATHS = {"before": ("fp32",)}  # path -> (precision,); "now" is filled from --precision
STEPS_USED: set[str] = set()  # the decode steps our generation ran (inference.steps.BACKENDS)


def gen_ours(adapter, tok, prompts, new, batch, path="now"):
    from tunelab.generate import GenerationConfig
    from tunelab.inference.engine import Engine

    engine = Engine(tok, GenerationConfig(max_new_tokens=new, precision=PATHS[path][0]), batch)
    out = engine.run([(adapter, list(p)) for p in prompts])
    STEPS_USED.update(engine.steps_used)
    return out


def gen_peft(adapter, tok, prompts, new, batch):
    from tunelab.modeling import mask_for, pad_batch

    model = peft_of(adapter)
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        ids, mask = pad_batch(chunk, tok.pad_token_id, "left"), mask_for(chunk, "left")
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
        out.extend(tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in seqs)
    return out


def n_tokens(tok, texts) -> int:
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + EOS (or cut)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=16, help="prompts generated")
    parser.add_argument("--score-examples", type=int, default=64, help="sequences scored (batches of 16)")
    parser.add_argument("--single", type=int, default=4, help="prompts generated one by one (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="base,prompt_tuning,icl,ipt,prefix_tuning",
                        help="icl = the base model on IPT's prompts (IPT's speed reference)")
    parser.add_argument("--score-only", action="store_true", help="skip generation (minutes) and its checks")
    parser.add_argument("--path", choices=("before", "now", "both"), default="both",
                        help="before = fp32 on this tree; now = --precision")
    parser.add_argument("--baseline-rev", help="also run this benchmark at this git revision and print the ratios")
    parser.add_argument("--precision", default="auto", help="fp32 | bf16 | auto: the 'now' path's precision")
    parser.add_argument("--roofline", action="store_true", help="also measure prefill / decode steps vs the limits")
    parser.add_argument("--roofline-steps", type=int, default=16, help="decode steps timed per batch size")
    parser.add_argument("--quick", action="store_true",
                        help="~5 minutes: --examples 16 --single 2 --new-tokens 16 --repeats 1 --score-examples 16 "
                             "--methods base,prompt_tuning,ipt,icl,prefix_tuning --roofline --roofline-steps 8")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.single, args.new_tokens, args.repeats, args.score_examples = 16, 2, 16, 1, 16
        args.methods, args.roofline, args.roofline_steps = "base,prompt_tuning,ipt,icl,prefix_tuning", True, 8
    from tunelab import precision as prec
    from tunelab.inference import steps as step_table

    PATHS["now"] = (args.precision,)
    paths = ["before", "now"] if args.path == "both" else [args.path]
    phases = prec.resolve(args.precision, "cpu")
    print(f"now = precision {args.precision} -> prefill {phases.prefill}, decode {phases.decode}; "
          f"before = fp32")
    if args.roofline:
        args.examples = max(args.examples, 64)  # decode at batch 64 needs 64 prompts
    model, tok, adapters, data = build(args)
    results = {}
    head = " ".join(f"{p:>9}" for p in paths)
    print(f"{'method':14} {'measure':16} {head} {'peft':>9} {'now/peft':>8}  check")
    main_path = paths[-1]
    for name in args.methods.split(","):
        adapter, (prompts, encoded) = adapters[name], data[name]
        prompts = prompts[:16] if args.roofline else prompts
        real = sum(len(e.input_ids) for e in encoded)
        row = results[name] = {}
        # scoring: interleave ours / peft
        t_peft, s_peft = timed(lambda: score_peft(adapter, encoded), args.repeats)  # noqa: B023
        ours = {p: timed(lambda p=p: score_ours(adapter, encoded, p), args.repeats) for p in paths}  # noqa: B023
        diffs = {p: float((s - s_peft).abs().max()) for p, (_, s) in ours.items()}
        row["score"] = {**{f"{p}_tok_s": real / t for p, (t, _) in ours.items()}, "peft_tok_s": real / t_peft,
                        **{f"{p}_max_abs_diff": d for p, d in diffs.items()}}
        cells = " ".join(f"{real / ours[p][0]:9.1f}" for p in paths)
        print(f"{name:14} {'score tok/s':16} {cells} {real / t_peft:9.1f} {t_peft / ours[main_path][0]:8.2f}  "
              f"max |logprob diff| vs peft {', '.join(f'{p} {d:.1e}' for p, d in diffs.items())}", flush=True)
        if args.score_only:
            continue
        single = prompts[: args.single]
        for batch, subset in ((1, single), (16, prompts)):
            t_p, out_p = timed(lambda s=subset, b=batch: gen_peft(adapter, tok, s, args.new_tokens, b), 1)  # noqa: B023
            outs = {p: timed(lambda s=subset, b=batch, p=p: gen_ours(adapter, tok, s, args.new_tokens, b, p), 1)  # noqa: B023
                    for p in paths}
            rate = {p: n_tokens(tok, o) / t for p, (t, o) in outs.items()}
            peft_rate = n_tokens(tok, out_p) / t_p
            row[f"gen_b{batch}"] = {**{f"{p}_tok_s": r for p, r in rate.items()}, "peft_tok_s": peft_rate,
                                    **{p: o for p, (_, o) in outs.items()}, "peft": out_p}
            same = ""
            if len(paths) == 2:
                same_rows = sum(a == b for a, b in zip(outs["before"][1], outs["now"][1], strict=True))
                row[f"gen_b{batch}"]["now_identical_to_before"] = same_rows / len(subset)
                same = f"now == before on {same_rows}/{len(subset)} rows; now/before {rate['now'] / rate['before']:.2f}x"
            cells = " ".join(f"{rate[p]:9.1f}" for p in paths)
            print(f"{name:14} {f'gen b={batch} tok/s':16} {cells} {peft_rate:9.1f} {rate[main_path] / peft_rate:8.2f}  "
                  f"{same}", flush=True)
        # correctness: batched == one-by-one (each path, and peft) on the batch-1 subset, and == the transformers
        # forward as the decode step, one by one
        with step_table.prefer("transformers"):
            plain = [gen_ours(adapter, tok, [p], args.new_tokens, 1, "before")[0] for p in single]
        peft_b16 = row["gen_b16"]["peft"][: args.single]
        row["check"] = {**{f"{p}_batched_eq_single": row["gen_b16"][p][: args.single] == row["gen_b1"][p]
                           for p in paths},
                        "fp32_eq_transformers_step": row["gen_b1"]["before" if "before" in paths else "now"] == plain,
                        "peft_rows_differing_batched_vs_single": sum(
                            a != b for a, b in zip(peft_b16, row["gen_b1"]["peft"], strict=True))}
        print(f"{name:14} {'check':16} {json.dumps(row['check'])}", flush=True)
    if not args.score_only:
        print("\nvs the base model on the same text at the same batch size (IPT's reference is ICL with its"
              " demonstrations):")
        for name in results:
            reference = "icl" if name == "ipt" else "base"
            if name not in ("base", "icl") and reference in results:
                for b in (1, 16):
                    r = {p: results[name][f"gen_b{b}"][f"{p}_tok_s"] / results[reference][f"gen_b{b}"][f"{p}_tok_s"]
                         for p in paths}
                    print(f"{name:14} gen b={b:<3} " + "  ".join(f"{p} {v:5.2f}x" for p, v in r.items()) + f" {reference}")
    if args.roofline:
        results["roofline"] = roofline(args, model, tok, adapters, data, paths)
    result = {k: {m: ({x: y for x, y in v.items() if x not in ("before", "now", "peft")}
                      if isinstance(v, dict) else v) for m, v in r.items()} for k, r in results.items()}
    result["decode_steps"] = sorted(STEPS_USED)
    print(f"decode step(s) that ran: {', '.join(sorted(STEPS_USED)) or 'none'}")
    print("RESULT " + json.dumps(result))
    if args.baseline_rev:
        from baseline import compare

        compare("bench_generate.py", args.baseline_rev, result)


def roofline(args, model, tok, adapters, data, paths) -> dict:
    """Prefill tok/s at batch 16 and decode step times at batch 1 / 16 / 64 against the machine's limits."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_gemm import measure
    from roofline import (
        decode_step_limit,
        facts_of,
        prefill_limit,
        time_ours,
        time_peft,
    )

    from tunelab import precision as prec

    hw = measure(quick=True)
    facts = facts_of(model)
    print(f"\nroofline: GEMM peak fp32 {hw['fp32_peak_gflops']} / bf16 {hw['bf16_peak_gflops']} GFLOP/s, "
          f"memory {hw['bandwidth_gbs']} GB/s; {facts.params / 1e6:.1f}M parameters "
          f"({facts.embedding / 1e6:.1f}M embedding/head), KV {facts.kv_bytes_per_token(4) / 1024:.0f} KB/token in fp32")
    peak = {"fp32": hw["fp32_peak_gflops"], "bf16": hw["bf16_peak_gflops"]}
    nbytes = {"fp32": 4, "bf16": 2}
    sides = {p: PATHS[p] for p in paths}
    out: dict = {"hardware": hw}
    prompts = data["base"][0]
    steps = args.roofline_steps
    pad = tok.pad_token_id
    base = adapters["base"]
    time_ours(base, prompts[:2], 2, PATHS[paths[-1]][0], pad)  # warm-up (and the bf16 copy)
    print(f"{'phase':12} {'side':7} {'measured':>12} {'limit':>12} {'reached':>8}  limit arithmetic")
    for batch in (1, 16, 64):
        rows = (prompts * (batch // len(prompts) + 1))[:batch]
        context = sum(map(len, rows)) / batch + steps / 2
        measured = {}
        for side, (precision,) in sides.items():
            pre, step = time_ours(base, rows, steps, precision, pad)
            p = prec.resolve(precision, "cpu")
            measured[side] = (pre, step, p)
        measured["peft"] = (*time_peft(model, rows, steps, pad), prec.PhasePrecision())
        for side, (pre, step, p) in measured.items():
            if batch == 16:
                tokens = sum(map(len, rows))
                limit, text = prefill_limit(facts, peak[p.prefill], (context - steps / 2) / 2)  # causal: T/2
                out[f"prefill_{side}"] = {"tok_s": tokens / pre, "limit_tok_s": limit}
                print(f"{'prefill b16':12} {side:7} {tokens / pre:8.0f} t/s {limit:8.0f} t/s {tokens / pre / limit:7.0%}  "
                      f"{p.prefill}: {text}")
            t_min, text = decode_step_limit(facts, batch, context, nbytes[p.decode], nbytes[p.decode],
                                            hw["bandwidth_gbs"], peak[p.decode])
            out[f"decode_b{batch}_{side}"] = {"step_ms": step * 1e3, "tok_s": batch / step,
                                              "limit_tok_s": batch / t_min, "reached": t_min / step}
            print(f"{f'decode b{batch}':12} {side:7} {batch / step:8.1f} t/s {batch / t_min:8.1f} t/s "
                  f"{t_min / step:7.0%}  {p.decode}: {step * 1e3:.1f} ms/step vs {text}", flush=True)
    print("\nper decode step at batch 16, by method (what virtual tokens cost per step):")
    for name in args.methods.split(","):
        rows = data[name][0][:16]
        times = {side: time_ours(adapters[name], rows, steps, precision, pad)[1]
                 for side, (precision,) in sides.items()}
        out[f"step_b16_{name}"] = {f"{side}_ms": t * 1e3 for side, t in times.items()}
        print(f"{name:14} " + "  ".join(f"{side} {t * 1e3:7.1f} ms" for side, t in times.items()), flush=True)
    return out


if __name__ == "__main__":
    main()
