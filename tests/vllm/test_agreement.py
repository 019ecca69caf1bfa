"""vLLM and the tunelab engine agree (fp32, greedy) on the same rows: base model, LoRA and prompt tuning, mixed in
one vLLM call; a LoRA saved by `tunelab run` loads in plain vLLM as it is; `tunelab eval --engine vllm` scores
like the tunelab engine; `tunelab export --to vllm`'s script generates the same text; what vLLM cannot take is
refused in one line before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunelab.config import EvalCommandConfig, build
from tunelab.errors import ConfigError

ROWS = 10
MAX_NEW = 24


@pytest.fixture(scope="module")
def examples(e2e):
    from tunelab.data import load_task

    return load_task(str(e2e)).eval[:ROWS]


@pytest.fixture(scope="module")
def loaded(trained):
    """The base model and the LoRA and prompt-tuning adapters, each loaded as `tunelab eval` loads them."""
    from tunelab.protocols import load_for_eval

    return {"base": load_for_eval("smollm2-135m", None, template="chat"),
            **{m: load_for_eval(None, str(trained[m])) for m in ("lora", "prompt_tuning")}}


def _rows(loaded, examples):
    from tunelab.evaluate import prompts_for

    return {name: [(m.adapter, p) for p in prompts_for(m.tokenizer, m.layout, examples)] for name, m in loaded.items()}


@pytest.fixture(scope="module")
def outputs(loaded, examples):
    """name -> (tunelab engine's new ids, vLLM's new ids); vLLM runs all three kinds of rows in one call."""
    from tunelab.inference.engine import Engine
    from tunelab.inference.sampling import GenerationConfig
    from tunelab.inference.vllm_engine import VllmEngine

    rows = _rows(loaded, examples)
    tokenizer = loaded["base"].tokenizer
    cfg = GenerationConfig(max_new_tokens=MAX_NEW)
    ours = {name: Engine(tokenizer, cfg, batch_size=4).run_ids(r) for name, r in rows.items()}
    everything = [row for r in rows.values() for row in r]
    engine = VllmEngine(tokenizer, cfg)
    theirs_flat = engine.run_ids(everything)
    assert engine.steps_used == {"vllm"}
    theirs, start = {}, 0
    for name, r in rows.items():
        theirs[name] = theirs_flat[start:start + len(r)]
        start += len(r)
    return ours, theirs


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["base", "lora", "prompt_tuning"])
def test_greedy_output_agrees(outputs, name):
    ours, theirs = outputs
    same = sum(a == b for a, b in zip(ours[name], theirs[name], strict=True))
    assert all(ours[name]) and all(theirs[name])  # both generated something for every row
    assert same >= ROWS - 1, f"{name}: {same}/{ROWS} identical rows; first differing: " + next(
        f"{a} vs {b}" for a, b in zip(ours[name], theirs[name], strict=True) if a != b)


@pytest.mark.real_model
def test_adapters_change_the_output(outputs):
    """The agreement above is not the base model's text three times: the trained adapters answer differently."""
    ours, _ = outputs
    assert ours["lora"] != ours["base"] and ours["prompt_tuning"] != ours["base"]


@pytest.mark.real_model
def test_saved_lora_loads_in_plain_vllm(trained, outputs, loaded, examples):
    """The LoRA directory `tunelab run` wrote, as it is, through vLLM's own LoRARequest."""
    from vllm.lora.request import LoRARequest

    from tunelab.inference import vllm_engine
    from vllm import SamplingParams

    ours, _ = outputs
    llm = next(iter(vllm_engine._LLMS.values()))  # the engine the mixed call started (enable_lora=True)
    request = LoRARequest("from-run", 77, str(trained["lora"]))
    prompts = [{"prompt_token_ids": ids} for _, ids in _rows(loaded, examples)["lora"]]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop_token_ids=[2], detokenize=False)
    got = [[t for t in o.outputs[0].token_ids if t != 2] for o in llm.generate(prompts, params, lora_request=request)]
    assert sum(a == b for a, b in zip(ours["lora"], got, strict=True)) >= ROWS - 1


@pytest.mark.real_model
def test_eval_engine_vllm_scores_like_tunelab(trained, e2e):
    from tunelab.protocols import run_eval

    reports = {}
    for engine in ("tunelab", "vllm"):
        req = build(EvalCommandConfig, overrides=[f"adapter={trained['prompt_tuning']}", f"data={e2e}", "max_eval=6",
                                                  f"eval.max_new_tokens={MAX_NEW}", f"eval.engine={engine}"])
        reports[engine] = run_eval(req)
    a, b = ([p["prediction"] for p in reports[e].predictions] for e in ("tunelab", "vllm"))
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 5
    assert abs(reports["tunelab"].metrics["bleu"] - reports["vllm"].metrics["bleu"]) < 5


@pytest.mark.real_model
def test_export_script_generates_the_same_text(trained, tmp_path, loaded, examples, outputs):
    from tunelab.export import ExportConfig, export

    out = tmp_path / "pt-vllm"
    written = export(ExportConfig(adapter=str(trained["prompt_tuning"]), out=str(out), to="vllm"), progress=False)
    assert "soft_prompt.safetensors" in written["parts"]
    inputs = [e.input for e in examples[:2]]
    proc = subprocess.run([sys.executable, str(out / "serve_with_vllm.py"), *inputs, "--max-tokens", str(MAX_NEW)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    texts = [json.loads(line)["text"] for line in proc.stdout.splitlines() if line.startswith("{")]
    tokenizer = loaded["base"].tokenizer
    ours, _ = outputs
    assert texts == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in ours["prompt_tuning"][:2]]


def test_prefix_tuning_is_refused_before_loading(trained, e2e, monkeypatch):
    from tunelab import models
    from tunelab.protocols import run_eval

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(models, "load_model", no_loading)
    req = build(EvalCommandConfig, overrides=[f"adapter={trained['prefix_tuning']}", f"data={e2e}", "max_eval=2",
                                              "eval.engine=vllm"])
    with pytest.raises(ConfigError, match="prefix_tuning with engine vllm.*engine tunelab"):
        run_eval(req)
