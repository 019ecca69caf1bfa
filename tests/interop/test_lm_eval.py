"""lm-evaluation-harness scores a tunelab adapter by log-likelihood and agrees with `tunelab eval`'s
rank_accuracy on the same rows (tiny model, built-in `sentiment` task, a local JSON task, offline).

Agreement is exact because both sides score the same token sequences: the prompt is rendered once
(tunelab's ``build_prompt``: chat template, instruction, input) and each choice is the option text plus
the EOS token, which is how tunelab scores an option (as a training target: text + EOS). The one
difference: lm-eval moves the context's trailing whitespace (the newline ending the chat template's
assistant header) into the continuation and scores it too; that adds the same term to every choice of
a row, so the chosen option and the accuracy are the same, and the log-likelihoods differ by it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from tunelab.config import build_config

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local JSON task: nothing to download
N_EVAL = 8

TASK_YAML = """\
task: tunelab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module", params=["lora", "prompt_tuning"])
def scored(request, tmp_path_factory):
    pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness (the dev extra)")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel

    from tunelab.formatting import build_prompt
    from tunelab.models import load_model
    from tunelab.protocols import EvalRequest, load_for_eval, run_eval, select_examples
    from tunelab.run import run

    method = request.param
    root = tmp_path_factory.mktemp(f"lmeval-{method}")
    options = ["method.num_virtual_tokens=4"] if method == "prompt_tuning" else ["train.lr=0.02"]
    run(build_config(None, [f"method.name={method}", *options, "model.name=tiny", "data.task=sentiment",
                            "train.steps=3", "train.batch_size=4", "data.max_eval=2", "eval.loss=false",
                            f"out={root / 'run'}"]), progress=False)
    adapter = root / "run" / "adapter"
    req = EvalRequest(data="sentiment", adapter=str(adapter), metrics=["rank_accuracy"], max_eval=N_EVAL,
                      n_resamples=50)
    report = run_eval(req)  # what `tunelab eval --adapter DIR --data sentiment --metrics rank_accuracy` prints

    loaded = load_for_eval(None, str(adapter))
    examples, _ = select_examples(req)
    eos = loaded.tokenizer.eos_token
    docs = [{"prompt": build_prompt(loaded.tokenizer, dataclasses.replace(loaded.layout, demos=None), e),
             "choices": [o + eos for o in e.options], "label": list(e.options).index(e.output)} for e in examples]
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks").mkdir()
    (root / "tasks" / "tunelab_mc.yaml").write_text(TASK_YAML.format(data=data))

    base, tokenizer = load_model("tiny")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
                              tasks=["tunelab_mc"], task_manager=TaskManager(include_path=str(root / "tasks")),
                              log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                              fewshot_random_seed=0)
    return report, results, examples


def test_lm_eval_acc_equals_tunelab_rank_accuracy(scored):
    report, results, examples = scored
    assert len(results["samples"]["tunelab_mc"]) == len(examples) == N_EVAL
    # tunelab reports percentages, lm-eval fractions
    assert 100 * results["results"]["tunelab_mc"]["acc,none"] == pytest.approx(report.metrics["rank_accuracy"])


def test_lm_eval_picks_the_same_option_with_the_same_loglikelihoods(scored):
    report, results, _ = scored
    samples = sorted(results["samples"]["tunelab_mc"], key=lambda s: s["doc_id"])
    for sample, row in zip(samples, report.predictions, strict=True):
        logliks = [float(r[0][0]) for r in sample["resps"]]  # (loglikelihood, is_greedy) per choice
        # lm-eval moves the context's trailing whitespace into the continuation, so it also scores the "\n"
        # that ends the chat template's assistant header: one shared term, the same for every choice
        shift = logliks[0] - row["option_logprobs"][0]
        assert shift < 0
        assert [v - shift for v in logliks] == pytest.approx(row["option_logprobs"], abs=1e-3)
        assert sample["doc"]["choices"][max(range(len(logliks)), key=logliks.__getitem__)].startswith(
            row["ranked_prediction"])
