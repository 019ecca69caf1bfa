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
- Checks: our batched output == our one-by-one output == the plain per-row path with the cache off;
  for peft, how many rows differ between its batched and one-by-one output.

Ours and peft alternate within one run (the machine is shared; only same-run ratios mean anything).
Run: .venv/bin/python benchmarks/bench_generate.py [--examples 16] [--new-tokens 24] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


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


def score_ours(adapter, encoded):
    from tunelab.modeling import score_sequences

    return torch.tensor(score_sequences(adapter, encoded, 2, SCORE_BATCH))


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


def gen_ours(adapter, tok, prompts, new, batch):
    from tunelab.generate import GenerationConfig, generate

    return generate(adapter, tok, prompts, GenerationConfig(max_new_tokens=new), batch_size=batch)


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
    args = parser.parse_args()
    from tunelab.generate import _eos_ids, generate_ids
    from tunelab.modeling import virtual_kv_cache

    model, tok, adapters, data = build(args)
    results = {}
    print(f"{'method':14} {'measure':16} {'ours':>9} {'peft':>9} {'ratio':>6}  check")
    for name in args.methods.split(","):
        adapter, (prompts, encoded) = adapters[name], data[name]
        real = sum(len(e.input_ids) for e in encoded)
        row = results[name] = {}
        # scoring: interleave ours / peft
        t_peft, s_peft = timed(lambda: score_peft(adapter, encoded), args.repeats)  # noqa: B023
        t_ours, s_ours = timed(lambda: score_ours(adapter, encoded), args.repeats)  # noqa: B023
        diff = float((s_ours - s_peft).abs().max())
        row["score"] = {"ours_tok_s": real / t_ours, "peft_tok_s": real / t_peft, "max_abs_diff": diff}
        print(f"{name:14} {'score tok/s':16} {real / t_ours:9.1f} {real / t_peft:9.1f} {t_peft / t_ours:6.2f}  "
              f"max |logprob diff| {diff:.1e}", flush=True)
        if args.score_only:
            continue
        single = prompts[: args.single]
        for batch, subset in ((1, single), (16, prompts)):
            t_p, out_p = timed(lambda s=subset, b=batch: gen_peft(adapter, tok, s, args.new_tokens, b), 1)  # noqa: B023
            t_o, out_o = timed(lambda s=subset, b=batch: gen_ours(adapter, tok, s, args.new_tokens, b), 1)  # noqa: B023
            row[f"gen_b{batch}"] = {"ours_tok_s": n_tokens(tok, out_o) / t_o, "peft_tok_s": n_tokens(tok, out_p) / t_p,
                                    "ours": out_o, "peft": out_p}
            print(f"{name:14} {f'gen b={batch} tok/s':16} {n_tokens(tok, out_o) / t_o:9.1f} "
                  f"{n_tokens(tok, out_p) / t_p:9.1f} {(n_tokens(tok, out_o) / t_o) / (n_tokens(tok, out_p) / t_p):6.2f}",
                  flush=True)
        # correctness: batched == one-by-one (ours, and peft) on the batch-1 subset, and == the plain path
        ours_b16 = row["gen_b16"]["ours"][: args.single]
        with virtual_kv_cache(False):
            plain = [tok.decode(generate_ids(adapter, [p], _gen_cfg(args), _eos_ids(model, tok), tok.pad_token_id)[0],
                                skip_special_tokens=True) for p in single]
        peft_b16 = row["gen_b16"]["peft"][: args.single]
        row["check"] = {"ours_batched_eq_single": ours_b16 == row["gen_b1"]["ours"],
                        "ours_eq_plain_path": row["gen_b1"]["ours"] == plain,
                        "peft_rows_differing_batched_vs_single": sum(
                            a != b for a, b in zip(peft_b16, row["gen_b1"]["peft"], strict=True))}
        print(f"{name:14} {'check':16} {json.dumps(row['check'])}", flush=True)
    print("\nvs the base model on the same text at the same batch size (ours; IPT's reference is ICL with its"
          " demonstrations):")
    for name in results:
        reference = "icl" if name == "ipt" else "base"
        if name not in ("base", "icl") and reference in results and not args.score_only:
            for b in (1, 16):
                r = results[name][f"gen_b{b}"]["ours_tok_s"] / results[reference][f"gen_b{b}"]["ours_tok_s"]
                print(f"{name:14} gen b={b:<3} {r:6.2f}x {reference}")
    print("RESULT " + json.dumps({k: {m: {x: y for x, y in v.items() if x not in ("ours", "peft")}
                                      for m, v in r.items()} for k, r in results.items()}))


def _gen_cfg(args):
    from tunelab.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.new_tokens)


if __name__ == "__main__":
    main()
