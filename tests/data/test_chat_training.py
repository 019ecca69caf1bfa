"""Conversations reach training with loss on assistant turns only (exact tokens, tiny model's tokenizer)."""

from __future__ import annotations

import pytest
from tests.conftest import shared_path

from tunelab.data import Example
from tunelab.data.formats import load_any
from tunelab.errors import ConfigError
from tunelab.formatting import IGNORE_INDEX, PromptLayout, build_prompt, encode, encode_example, target_text


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of supervised positions."""
    out, start = [], None
    for i, lab in enumerate(labels + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("name, index", [("dummy_conversation_sample.json", 2),
                                         ("glaive_toolcall_en_demo.json", 0)])
def test_sharegpt_labels_mask_everything_but_assistant_turns(tiny, name, index):
    _, tok = tiny
    example = load_any(shared_path("raw", "sharegpt", name))[index]
    messages = list(example.messages)
    enc = encode_example(tok, PromptLayout("auto", max_length=4096), example)
    full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert enc.input_ids == full and not enc.truncated
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(answers) >= 2  # a multi-turn conversation
    found = spans(enc.labels)
    assert len(found) == len(answers)
    for (start, end), answer in zip(found, answers, strict=True):
        expected = tok(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert enc.input_ids[start:end] == expected == enc.labels[start:end]
    # user, system and tool turns (and the assistant headers) carry no loss
    supervised = sum(end - start for start, end in found)
    assert sum(lab == IGNORE_INDEX for lab in enc.labels) == len(full) - supervised


def test_system_prompt_is_prepended_only_without_a_system_turn(tiny):
    _, tok = tiny
    chat = Example(id="c", task="t", instruction="hi", output="yo",
                   messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}))
    enc = encode_example(tok, PromptLayout("chat", "Be terse.", max_length=512), chat)
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    tools = load_any(shared_path("raw", "sharegpt", "glaive_toolcall_en_demo.json"))[0]
    enc = encode_example(tok, PromptLayout("chat", "Be terse.", max_length=4096), tools)
    assert "Be terse." not in tok.decode(enc.input_ids)  # its own system turn (the tool schemas) wins


def test_single_turn_examples_go_through_build_prompt_and_encode(tiny):
    _, tok = tiny
    ex = Example(id="1", task="t", instruction="Add.", input="2+2", output="4")
    for template in ("chat", "alpaca", "plain"):
        expected = encode(tok, build_prompt(tok, template, ex), target_text(template, ex), 64)
        assert encode_example(tok, PromptLayout(template, max_length=64), ex) == expected


def test_conversation_needs_a_chat_layout(tiny):
    _, tok = tiny
    chat = Example(id="c", task="t", instruction="hi", output="yo",
                   messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}))
    with pytest.raises(ConfigError, match="data.template=chat"):
        encode_example(tok, "alpaca", chat)


def test_over_long_conversation_is_cut_on_the_right_and_counted(tiny):
    _, tok = tiny
    example = load_any(shared_path("raw", "sharegpt", "glaive_toolcall_en_demo.json"))[0]
    enc = encode_example(tok, PromptLayout("chat", max_length=64), example)
    assert enc.truncated and len(enc.input_ids) == len(enc.labels) == 64
    assert enc.input_ids == encode_example(tok, PromptLayout("chat", max_length=4096), example).input_ids[:64]
