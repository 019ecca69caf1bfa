"""Evaluation: per-example rows, intervals, rank classification through the shared forward path."""

import json

import pytest
import torch

from tunelab.config import EvalConfig, build_config
from tunelab.data import Example, load_task
from tunelab.errors import DataError
from tunelab.evaluate import derive_max_new_tokens, evaluate, rank_options
from tunelab.formatting import PromptLayout, build_prompt, encode, target_text
from tunelab.methods import METHODS
from tunelab.methods.prompt_tuning import PromptTuningMethodConfig
from tunelab.modeling import sequence_logprobs

OPTIONS = ("positive", "negative", "neutral")


def _classification(n=6) -> list[Example]:
    texts = ["I loved it", "Terrible service, never again", "It was fine I guess", "Great!", "Bad.", "Okay."]
    return [Example(id=str(i), task="sentiment", instruction="Classify the sentiment.", input=texts[i],
                    output=OPTIONS[i % 3], options=OPTIONS) for i in range(n)]


def _prompt_tuned(model_tok):
    model, tok = model_tok
    cfg = PromptTuningMethodConfig(num_virtual_tokens=3, init="random")
    return METHODS["prompt_tuning"].build(model, tok, cfg, [], 0), tok


def test_rank_options_equal_unbatched_log_likelihoods(fresh_tiny):
    adapter, tok = _prompt_tuned(fresh_tiny)
    examples = _classification()
    batched = rank_options(adapter, tok, PromptLayout("chat"), examples, batch_size=4)
    for e, scores in zip(examples, batched, strict=True):
        prompt = build_prompt(tok, "chat", e)
        for option, got in zip(e.options, scores, strict=True):
            enc = encode(tok, prompt, target_text("chat", Example("x", "t", "", output=option)), 1024)
            ids = torch.tensor([enc.input_ids])
            with torch.no_grad():
                alone = sequence_logprobs(adapter, ids, torch.ones_like(ids), torch.tensor([enc.labels]))
            assert got == pytest.approx(float(alone[0]), abs=1e-4)


def test_rank_accuracy_scores_the_top_option(fresh_tiny):
    adapter, tok = _prompt_tuned(fresh_tiny)
    examples = _classification()
    result = evaluate(adapter, tok, "chat", examples, ["rank_accuracy"], EvalConfig(batch_size=4))
    rows = result.predictions
    expected = [100.0 * (r["ranked_prediction"] == e.output) for r, e in zip(rows, examples, strict=True)]
    assert [r["scores"]["rank_accuracy"] for r in rows] == expected
    assert result.metrics["rank_accuracy"] == pytest.approx(sum(expected) / len(expected))
    for r in rows:
        assert r["ranked_prediction"] == OPTIONS[max(range(3), key=r["option_logprobs"].__getitem__)]
    assert result.generated_tokens == 0  # ranking only: nothing generated


def test_rank_accuracy_without_options_names_the_fix(tiny):
    model, tok = tiny
    adapter = METHODS["icl"].build(model, tok, METHODS["icl"].Config(k=0), [], 0)
    with pytest.raises(DataError, match="options"):
        evaluate(adapter, tok, "chat", load_task("date_format").eval[:2], ["rank_accuracy"], EvalConfig())


def test_evaluate_rows_scores_and_intervals(tiny):
    model, tok = tiny
    adapter = METHODS["icl"].build(model, tok, METHODS["icl"].Config(k=0), [], 0)
    examples = load_task("date_format").eval[:5]
    result = evaluate(adapter, tok, "chat", examples, ["exact_match", "rouge_l", "bleu"], EvalConfig(),
                      max_new_tokens=6)
    assert [r["id"] for r in result.predictions] == [e.id for e in examples]
    assert set(result.predictions[0]) >= {"id", "task", "prediction", "references", "scores"}
    assert set(result.ci) == {"exact_match", "rouge_l", "bleu"}
    for name, (lo, hi) in result.ci.items():
        assert lo <= result.metrics[name] <= hi, name


def test_max_new_tokens_follows_the_longest_reference(tiny):
    _, tok = tiny
    short = [Example("1", "t", "", output="yes")]
    long = short + [Example("2", "t", "", output="word " * 40)]
    assert derive_max_new_tokens(tok, short) < derive_max_new_tokens(tok, long) <= 256
    assert derive_max_new_tokens(tok, long) >= 40


def test_run_writes_metric_intervals_into_result_json(tmp_path):
    from tunelab.run import run

    cfg = build_config(None, ["method.name=icl", "method.k=0", "model.name=tiny", "data.task=date_format",
                              "data.max_eval=6", f"out={tmp_path / 'r'}", "eval.max_new_tokens=4"])
    result = run(cfg, progress=False)
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    assert set(saved["metrics_ci"]) == set(saved["metrics"]) == set(result["metrics"])
    assert all(len(ci) == 2 for ci in saved["metrics_ci"].values())


def test_reference_nll_is_the_training_loss_without_an_update(fresh_tiny):
    from tunelab.evaluate import reference_nll
    from tunelab.formatting import encode_example
    from tunelab.modeling import causal_lm_loss

    adapter, tok = _prompt_tuned(fresh_tiny)
    examples = load_task("date_format").train[:5]
    per_example = reference_nll(adapter, tok, PromptLayout("chat"), examples, batch_size=2)
    for e, (nll, tokens) in zip(examples, per_example, strict=True):
        enc = encode_example(tok, PromptLayout("chat"), e)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            loss, count = causal_lm_loss(adapter, ids, torch.ones_like(ids), torch.tensor([enc.labels]))
        assert tokens == count > 0
        assert nll / tokens == pytest.approx(float(loss), rel=1e-4)


def test_run_records_the_generalization_gap_of_trained_methods(tmp_path):
    from tunelab.run import run

    common = ["model.name=tiny", "data.task=date_format", "data.max_train=8", "data.max_eval=8",
              "eval.max_new_tokens=2", "train.batch_size=4"]
    cfg = build_config(None, ["method.name=full_finetune", "train.steps=80", "train.lr=0.01",
                              f"out={tmp_path / 'ft'}", *common])
    saved = run(cfg, progress=False)["generalization"]
    assert len(saved["train_nll"]) == len(saved["eval_nll"]) == 8
    assert saved["gap"] == pytest.approx(saved["eval_loss"] - saved["train_loss"], abs=1e-4)
    assert saved["gap"] > 0.5 and saved["train_loss"] < 2.0  # 80 steps on 8 rows: memorised more than learned
    icl = run(build_config(None, ["method.name=icl", "method.k=0", f"out={tmp_path / 'icl'}", *common]),
              progress=False)
    assert "generalization" not in icl  # nothing was trained: no gap to measure


def test_eval_stop_strings_end_generation_and_cut_the_text(tiny):
    """eval.stop (lm-eval's `until`): a base model's ramble past a one-line answer is cut at the stop string."""
    model, tok = tiny
    adapter = METHODS["icl"].build(model, tok, METHODS["icl"].Config(k=0), [], 0)
    examples = load_task("date_format").eval[:4]
    full = evaluate(adapter, tok, "chat", examples, ["rouge_l"], EvalConfig(), max_new_tokens=12).predictions
    text = next(p["prediction"] for p in full if len(p["prediction"]) > 4)
    stop = text[2:4]  # a string that occurs in the unstopped output, so the cut must happen
    cut = evaluate(adapter, tok, "chat", examples, ["rouge_l"], EvalConfig(stop=[stop]), max_new_tokens=12)
    for before, after in zip(full, cut.predictions, strict=True):
        assert after["prediction"] == before["prediction"].split(stop)[0].strip()
    assert any(stop in p["prediction"] for p in full)
    assert build_config(overrides=["eval.stop=[\"\\n\", END]"]).eval.stop == ["\n", "END"]
