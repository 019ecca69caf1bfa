"""`tunelab run` on native-format data: conversations train, truncation and skipped records land in result.json."""

from __future__ import annotations

import json

from tests.conftest import shared_path

from tunelab.config import build_config
from tunelab.data.formats import load_any
from tunelab.formatting import PromptLayout, encode_example
from tunelab.models import load_tokenizer
from tunelab.run import run


def test_sharegpt_training_counts_truncation_and_skipped_records(tmp_path):
    conversations = json.loads(shared_path("raw", "sharegpt", "dummy_conversation_sample.json").read_text())[:40]
    conversations.append({"id": "broken", "conversations": [{"from": "robot", "value": "?"}]})
    train_file = tmp_path / "chats.json"
    train_file.write_text(json.dumps(conversations))
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"instruction": "Who are you?", "output": "I am Vicuna."}) + "\n"
                                 for _ in range(2)))
    overrides = ["method.name=prompt_tuning", "method.num_virtual_tokens=2", "model.name=tiny", "train.steps=2",
                 "train.batch_size=4", f"data.train={train_file}", f"data.eval={eval_file}", "data.max_length=80",
                 "data.skip_bad=true", "eval.max_new_tokens=4", f"out={tmp_path / 'run'}"]
    result = run(build_config(None, overrides), progress=False)

    tok = load_tokenizer("tiny")
    examples = load_any(train_file, skip_bad=True)
    assert len(examples) == 40 and all(e.messages for e in examples)
    expected = sum(len(encode_example(tok, PromptLayout("chat", max_length=10**6), e).input_ids) > 80 for e in examples)
    assert 0 < expected < 40  # the cut applies to some conversations only
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["train"]["truncated_examples"] == result["train"]["truncated_examples"] == expected
    assert saved["train"]["skipped_bad_records"] == 1
    assert saved["n_train"] == 40 and saved["train"]["steps"] == 2
    assert all(loss == loss for loss in saved["train"]["losses"])  # finite: assistant tokens carry the loss
