"""Request -> prompt text, through ``tunelab.formatting`` with the adapter's own template, system
prompt, task instruction and options, rewrite and demonstrations, so a served completion sees exactly
the text its training and `tunelab eval` did for that input.

- /v1/completions: ``prompt`` is the example's input; its instruction is the one the adapter's task
  examples shared (``methods.io.TaskPrompt``, saved by `tunelab run`), unless the request sends
  ``instruction`` (extension). ``raw`` sends the prompt untouched.
- /v1/chat/completions: one user turn (after an optional system turn) is an example: its input when
  the adapter recorded its task's instruction, else (older adapters, the base model) its instruction;
  longer conversations, and any conversation sent with ``raw``, are rendered by the model's chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from tunelab.data.example import Example
from tunelab.errors import TunelabError
from tunelab.formatting import build_prompt, chat_text
from tunelab.methods.io import TaskPrompt
from tunelab.serve.registry import Served
from tunelab.serve.schemas import Message


class BadRequest(TunelabError):
    """The request cannot be served as asked (HTTP 400)."""


def example_prompt(served: Served, tokenizer, example: Example, system_prompt: str | None = None) -> str:
    """The prompt text of one example under ``served``'s layout (the same steps as `tunelab eval`)."""
    example = served.adapter.rewrite(example)  # a discrete prompt swaps the instruction
    layout = replace(served.layout, system_prompt=system_prompt) if system_prompt else served.layout
    return build_prompt(tokenizer, layout, example)


def task_example(served: Served, text: str, instruction: str | None = None) -> Example:
    """``text`` as the input of an example of ``served``'s task: the instruction and options its training
    examples shared (``instruction`` replaces the instruction; none recorded: empty)."""
    task = served.task or TaskPrompt()
    return Example(id="request", task="serve", instruction=task.instruction if instruction is None else instruction,
                   input=text, options=task.options)


def completion_prompt(served: Served, tokenizer, text: str, instruction: str | None, raw: bool) -> str:
    """/v1/completions: the input ``text`` laid out as in training (``raw``: untouched)."""
    if raw:
        return text
    return example_prompt(served, tokenizer, task_example(served, text, instruction))


def chat_prompt(served: Served, tokenizer, messages: Sequence[Message], raw: bool = False) -> str:
    """/v1/chat/completions: the conversation as prompt text ending where the assistant's reply starts."""
    if messages[-1].role != "user":
        raise BadRequest("the last message must have role 'user'")
    if raw:
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest("raw chat needs a chat template, which this model has not; send a raw prompt to "
                             "/v1/completions instead")
        return chat_text(tokenizer, [{"role": m.role, "content": m.content} for m in messages],
                         add_generation_prompt=True)
    system = messages[0].content if messages[0].role == "system" else None
    turns = list(messages[1:] if system is not None else messages)
    if len(turns) == 1:
        content = turns[0].content
        example = task_example(served, content) if served.task is not None else \
            Example(id="request", task="serve", instruction=content)
        return example_prompt(served, tokenizer, example, system)
    if served.layout.template != "chat":
        raise BadRequest(f"model {served.name!r} uses the {served.layout.template} layout, which has one turn; "
                         "send a single user message (plus an optional system message)")
    rendered = [{"role": m.role, "content": m.content} for m in messages]
    if system is None and served.layout.system_prompt:
        rendered.insert(0, {"role": "system", "content": served.layout.system_prompt})
    return tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
