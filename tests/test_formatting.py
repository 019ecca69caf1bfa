from tunelab.data import Example
from tunelab.formatting import IGNORE_INDEX, build_prompt, encode, encode_conversation, render_body


def test_chat_prompt_uses_model_template(tiny):
    _, tok = tiny
    ex = Example(id="1", task="t", instruction="Add.", input="2+2", output="4")
    prompt = build_prompt(tok, "auto", ex)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "Add.\n\nInput: 2+2" in prompt


def test_options_and_demos_rendered_in_order():
    ex = Example(id="1", task="t", instruction="Label it.", input="great", output="positive",
                 options=("positive", "negative"))
    demo = Example(id="2", task="t", instruction="Label it.", input="bad", output="negative")
    assert render_body(ex, [demo]) == ("Label it.\n\nOPTIONS:\n- positive\n- negative\n\n"
                                       "Input: bad\nOutput: negative\n\nInput: great")


def test_label_mask_covers_exactly_the_prompt(tiny):
    _, tok = tiny
    prompt_ids = tok("Q: hi", add_special_tokens=False)["input_ids"]
    target_ids = tok("yes", add_special_tokens=False)["input_ids"]
    enc = encode(tok, "Q: hi", "yes", max_length=64)
    assert enc.input_ids == prompt_ids + target_ids + [tok.eos_token_id]
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [tok.eos_token_id]
    assert not enc.truncated


def test_truncation_keeps_the_end_of_the_prompt(tiny):
    _, tok = tiny
    enc = encode(tok, "word " * 100 + "LAST", "answer", max_length=16)
    assert len(enc.input_ids) == 16 and enc.truncated
    assert tok.decode(enc.input_ids).rstrip().endswith("answer<|im_end|>")
    assert "LAST" in tok.decode(enc.input_ids)


def test_conversation_loss_only_on_assistant_turns(tiny):
    _, tok = tiny
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    enc = encode_conversation(tok, messages, max_length=512)
    full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert enc.input_ids == full
    supervised = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=False) if lab != IGNORE_INDEX])
    assert supervised == "Hello!<|im_end|>\nSee you.<|im_end|>\n"
