"""Request -> prompt text, through ``tunelab.formatting`` with the adapter's own template, system
prompt, rewrite and demonstrations, so a served completion sees exactly the text `tunelab eval` would.

- /v1/completions: ``prompt`` is the example's input and ``instruction`` (extension) its instruction;
  ``raw`` sends the prompt untouched.
- /v1/chat/completions: one user turn (after an optional system turn) is an example whose
  instruction is the user's message; longer conversations are rendered by the model's chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from tunelab.data.example import Example
from tunelab.errors import TunelabError
from tunelab.formatting import build_prompt
from tunelab.serve.registry import Served
from tunelab.serve.schemas import Message


class BadRequest(TunelabError):
    """The request cannot be served as asked (HTTP 400)."""


def example_prompt(served: Served, tokenizer, example: Example, system_prompt: str | None = None) -> str:
    """The prompt text of one example under ``served``'s layout (the same steps as `tunelab eval`)."""
    example = served.adapter.rewrite(example)  # a discrete prompt swaps the instruction
    layout = replace(served.layout, system_prompt=system_prompt) if system_prompt else served.layout
    return build_prompt(tokenizer, layout, example)


def completion_prompt(served: Served, tokenizer, text: str, instruction: str | None, raw: bool) -> str:
    """/v1/completions: the input ``text`` (with ``instruction``) laid out by the adapter's template."""
    if raw:
        return text
    return example_prompt(served, tokenizer, Example(id="request", task="serve", instruction=instruction or "",
                                                     input=text))


def chat_prompt(served: Served, tokenizer, messages: Sequence[Message]) -> str:
    """/v1/chat/completions: the conversation as prompt text ending where the assistant's reply starts."""
    if messages[-1].role != "user":
        raise BadRequest("the last message must have role 'user'")
    system = messages[0].content if messages[0].role == "system" else None
    turns = list(messages[1:] if system is not None else messages)
    if len(turns) == 1:
        return example_prompt(served, tokenizer, Example(id="request", task="serve", instruction=turns[0].content),
                              system)
    if served.layout.template != "chat":
        raise BadRequest(f"model {served.name!r} uses the {served.layout.template} layout, which has one turn; "
                         "send a single user message (plus an optional system message)")
    rendered = [{"role": m.role, "content": m.content} for m in messages]
    if system is None and served.layout.system_prompt:
        rendered.insert(0, {"role": "system", "content": served.layout.system_prompt})
    return tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
