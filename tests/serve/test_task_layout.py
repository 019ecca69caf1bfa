"""A served adapter lays out a bare input exactly as its training did: the template, system prompt and the
task's instruction saved with it (``methods.io.TaskPrompt``); ``raw`` (an ``extra_body`` field for the
``openai`` client) sends the text untouched."""

from __future__ import annotations

import json

import pytest
from tests.serve.conftest import running

from tunelab.config import build_config
from tunelab.data import load_task
from tunelab.formatting import IGNORE_INDEX, build_prompt, chat_text, encode_example
from tunelab.generate import GenerationConfig, generate
from tunelab.models import load_model
from tunelab.protocols import load_for_eval
from tunelab.run import layout_of, run
from tunelab.serve.app import ServeLimits
from tunelab.serve.prompts import chat_prompt, completion_prompt
from tunelab.serve.schemas import Message

openai = pytest.importorskip("openai", reason="the official client: pip install openai (in the dev extra)")

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prompt-tuning adapter trained for a few steps on date_format (`tunelab run` on the tiny model)."""
    root = tmp_path_factory.mktemp("layout")
    cfg = build_config(None, ["method.name=prompt_tuning", "method.num_virtual_tokens=4", "data.task=date_format",
                              "model.name=tiny", "train.steps=3", "train.batch_size=2", "data.max_train=8",
                              "data.max_eval=2", f"out={root / 'pt'}"])
    run(cfg, progress=False)
    return root, cfg


@pytest.fixture(scope="module")
def server(trained):
    root, _ = trained
    with running(root, ServeLimits(max_prompt_tokens=256, max_tokens=16)) as live:
        yield live


def training_prompt(cfg, example) -> tuple[str, list[int]]:
    """The prompt text of ``example`` under the run's layout, and the prompt ids training saw (labels -100)."""
    _, tokenizer = load_model("tiny", seed=0)
    layout = layout_of(cfg).resolved(tokenizer)
    encoded = encode_example(tokenizer, layout, example)
    return build_prompt(tokenizer, layout, example), [i for i, y in zip(encoded.input_ids, encoded.labels,
                                                                        strict=True) if y == IGNORE_INDEX]


def offline(adapter_dir, ids: list[int]) -> str:
    """What `tunelab eval --adapter` generates from these prompt ids (greedy)."""
    loaded = load_for_eval("tiny", str(adapter_dir))
    return generate(loaded.adapter, loaded.tokenizer, [ids], GenerationConfig(max_new_tokens=MAX_TOKENS))[0]


def test_the_adapter_records_its_tasks_instruction(trained):
    root, _ = trained
    meta = json.loads((root / "pt" / "adapter" / "tunelab_adapter.json").read_text())
    assert meta["task_prompt"] == {"instruction": load_task("date_format").train[0].instruction, "options": []}


def test_served_prompt_of_a_bare_input_is_the_training_prompt(trained, server):
    _, cfg = trained
    served, tokenizer = server.registry.get("pt"), server.registry.tokenizer
    for example in load_task("date_format").eval[:3]:
        text, ids = training_prompt(cfg, example)
        assert completion_prompt(served, tokenizer, example.input, None, raw=False) == text
        assert chat_prompt(served, tokenizer, [Message(role="user", content=example.input)]) == text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids  # the very ids training saw
        assert completion_prompt(served, tokenizer, example.input, None, raw=True) == example.input


def test_openai_client_gets_the_training_layout_by_default_and_raw_on_request(trained, server):
    root, cfg = trained
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    tokenizer = server.registry.tokenizer
    example = load_task("date_format").eval[0]  # input like 2024-03-05
    _, ids = training_prompt(cfg, example)
    expected = offline(root / "pt" / "adapter", ids)

    answer = client.completions.create(model="pt", prompt=example.input, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.usage.prompt_tokens == len(ids) and answer.choices[0].text == expected

    chat = client.chat.completions.create(model="pt", messages=[{"role": "user", "content": example.input}],
                                          max_tokens=MAX_TOKENS, temperature=0)
    assert chat.usage.prompt_tokens == len(ids) and chat.choices[0].message.content == expected

    raw = client.completions.create(model="pt", prompt=example.input, max_tokens=MAX_TOKENS,
                                    extra_body={"raw": True})
    assert raw.usage.prompt_tokens == len(tokenizer(example.input, add_special_tokens=False)["input_ids"])

    messages = [{"role": "user", "content": example.input}]
    raw_chat = client.chat.completions.create(model="pt", messages=messages, max_tokens=MAX_TOKENS,
                                              extra_body={"raw": True})
    rendered = chat_text(tokenizer, messages, add_generation_prompt=True)
    assert raw_chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    own = client.completions.create(model="pt", prompt=example.input, max_tokens=MAX_TOKENS,
                                    extra_body={"instruction": ""})  # the request's instruction wins
    assert own.usage.prompt_tokens < len(ids)
