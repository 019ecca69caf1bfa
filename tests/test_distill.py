"""`tunelab export --to lora`: a soft prompt distilled into a LoRA that plain peft and tunelab both load."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_cli import tunelab

from tunelab.config import build, build_config
from tunelab.errors import ConfigError
from tunelab.export import ExportConfig, export
from tunelab.run import run


def _run(out, *overrides):
    cfg = build_config(None, ["model.name=tiny", "data.task=date_format", "data.max_train=16", "data.max_eval=6",
                              "eval.max_new_tokens=4", "eval.loss=false", "train.batch_size=4", f"out={out}",
                              *overrides])
    run(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A prompt-tuning run on the tiny model (its adapter/ is the teacher)."""
    return _run(tmp_path_factory.mktemp("pt") / "run", "method.name=prompt_tuning", "method.num_virtual_tokens=4",
                "train.steps=8")


@pytest.fixture(scope="module")
def exported(teacher, tmp_path_factory):
    """The teacher exported through the CLI, as a user runs it."""
    out = tmp_path_factory.mktemp("export") / "lora"
    proc = tunelab("export", str(teacher), "--to", "lora", str(out), "--rank", "4", "--steps", "30", "--lr", "1e-2",
                   "--batch-size", "4", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_export_writes_a_lora_directory_with_card_and_report(exported, teacher):
    out, stdout = exported
    assert {"adapter_model.safetensors", "adapter_config.json", "tunelab_adapter.json", "README.md",
            "distill.json"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "tunelab_adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 4 and meta["config"]["alpha"] == 8
    assert meta["distilled_from"] == {"adapter": str((teacher / "adapter").resolve()), "method": "prompt_tuning"}
    assert meta["base_model"] == "tiny" and meta["template"] in ("chat", "alpaca")
    report = json.loads((out / "distill.json").read_text())
    # the teacher is scored as its run scored it: the same rows, layout and metrics
    assert report["teacher"]["metrics"] == json.loads((teacher / "result.json").read_text())["metrics"]
    assert set(report["student"]["metrics"]) == set(report["teacher"]["metrics"])
    assert report["n_train"] == 16 and report["n_eval"] == 6 and len(report["distill"]["losses"]) == 30
    assert report["distill"]["cpu_seconds"] > 0
    card = (out / "README.md").read_text()
    assert "## Distilled from" in card and str(teacher / "adapter") in card and "prompt_tuning" in card
    assert "tunelab export" in card and "--rank 4" in card
    assert "teacher (soft prompt)" in stdout and "student (LoRA)" in stdout and "KL(teacher || student)" in stdout


def test_distillation_moves_the_student_towards_the_teacher(exported):
    report = json.loads((exported[0] / "distill.json").read_text())
    before, after = report["kl"]["before"], report["kl"]["after"]  # held-out eval rows, output positions
    assert before > 0 and after < 0.8 * before, report["kl"]
    losses = report["distill"]["losses"]  # the training KL went down too
    assert sum(losses[-5:]) < sum(losses[:5])


def test_export_loads_in_plain_peft_and_generates(exported):
    from peft import PeftModel

    from tunelab.generate import GenerationConfig, generate
    from tunelab.methods.base import Adapter
    from tunelab.methods.io import load_adapter
    from tunelab.models import load_model

    out = exported[0]
    base, tok = load_model("tiny")
    prompts = [tok(t)["input_ids"] for t in ["2024-01-05", "March 3, 2021 in ISO"]]
    cfg = GenerationConfig(max_new_tokens=6)
    with torch.no_grad():
        base_logits = base(input_ids=torch.tensor([prompts[1]])).logits
    peft_model = PeftModel.from_pretrained(load_model("tiny")[0], str(out))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft_model.named_parameters())
    plain = Adapter(peft_model.get_base_model(), "lora", None)  # type: ignore[arg-type]
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=torch.tensor([prompts[1]])).logits, base_logits)
    texts = generate(plain, tok, prompts, cfg)
    loaded = load_adapter(out, load_model("tiny")[0], tok, base_model="tiny")
    assert loaded.method_name == "lora" and loaded.layout.template in ("chat", "alpaca")
    assert generate(loaded.adapter, tok, prompts, cfg) == texts and all(isinstance(t, str) for t in texts)


def test_teacher_and_student_logits_are_matched_on_the_text_positions(fresh_tiny):
    """target_logits drops the virtual tokens: the teacher's logits equal a hand-built [soft prompt ; text] forward."""
    from tests.conftest import base_and_soft_prompt

    from tunelab.data import load_task
    from tunelab.distill import mean_kl, target_logits, token_kl
    from tunelab.formatting import PromptLayout, encode_example
    from tunelab.methods.base import Adapter
    from tunelab.train import collate

    model, tok, (base, soft) = base_and_soft_prompt(fresh_tiny)
    rows = load_task("date_format").train[:3]
    layout = PromptLayout("alpaca")
    ids, mask, labels = collate([encode_example(tok, layout, e) for e in rows], tok.pad_token_id)
    n = soft.soft_prompt(1).shape[1]
    with torch.no_grad():
        embeds = torch.cat([soft.soft_prompt(len(rows)), model.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(len(rows), n, dtype=mask.dtype), mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions).logits[:, n:]
        rows_i, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        expected = logits[:, :-1][rows_i, cols]
        torch.testing.assert_close(target_logits(soft, ids, mask, labels), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target_logits(soft, ids, mask, labels).detach(), expected, atol=1e-4, rtol=1e-4)
    assert isinstance(base, Adapter) and target_logits(base, ids, mask, labels).shape == expected.shape
    assert float(token_kl(expected, expected).abs().max()) < 1e-6
    assert mean_kl(soft, soft, tok, layout, rows) < 1e-6 < mean_kl(soft, base, tok, layout, rows)


def test_eligibility_comes_from_capabilities_not_names(tmp_path):
    from tunelab.distill import check_distillable
    from tunelab.methods.base import Capabilities

    class Declared:
        def __init__(self, name, **caps):
            self.name, self.capabilities = name, Capabilities(trains=True, **caps)

        def capabilities_for(self, config):
            return self.capabilities

    check_distillable(tmp_path, Declared("my_prompt", soft_prompt=True), None, {})  # any name, a plain soft prompt
    for caps in ({"soft_prompt": True, "demonstrations": True}, {"prefix": True}, {"changes_weights": True}):
        with pytest.raises(ConfigError, match="declares"):
            check_distillable(tmp_path, Declared("prompt_tuning", **caps), None, {})
    with pytest.raises(ConfigError, match="folded"):
        check_distillable(tmp_path, Declared("p", soft_prompt=True), None, {"folded_from": "/x"})


def test_lora_adapter_is_refused_in_one_line_exit_2(tmp_path):
    lora = _run(tmp_path / "lora", "method.name=lora", "method.r=2", "train.steps=1")
    out = tmp_path / "out"
    proc = tunelab("export", str(lora), "--to", "lora", str(out), "-q")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "soft_prompt" in proc.stdout and "changes_weights" in proc.stdout and not out.exists()


def test_ipt_with_demonstrations_is_refused(tmp_path):
    ipt = _run(tmp_path / "ipt", "method.name=ipt", "method.k=1", "method.selection=random",
               "method.num_virtual_tokens=2", "train.steps=1")
    cfg = build(ExportConfig, flags={"adapter": str(ipt), "out": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="ipt adapter declares .*demonstrations"):
        export(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_target_and_foreign_out_are_refused(teacher, tmp_path):
    with pytest.raises(ConfigError, match="to: got 'gguf', expected one of lora"):
        build(ExportConfig, flags={"adapter": str(teacher), "out": str(tmp_path / "o"), "to": "gguf"})
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an earlier export"):
        export(build(ExportConfig, flags={"adapter": str(teacher), "out": str(occupied)}), progress=False)
    with pytest.raises(ConfigError, match="holds the adapter being exported"):
        export(build(ExportConfig, flags={"adapter": str(teacher), "out": str(teacher)}), progress=False)
    assert (occupied / "notes.txt").read_text() == "mine"
