"""Pure functions from examples to prompt text and token ids, with label masking.

The same ``build_prompt`` serves training, evaluation and serving, so a model is always scored on
exactly the text layout it was trained on. That layout is one value, ``PromptLayout`` (template,
system prompt, demonstration selector, token budget), saved beside every adapter (``to_meta`` /
``from_meta``) and passed whole instead of loose arguments. Every function here takes its arguments in
one order: tokenizer, layout, example(s). Prompt and target are tokenized separately and
concatenated, so the boundary between masked (-100) and supervised tokens is exact.

>>> from tunelab.data import Example
>>> ex = Example(id="1", task="t", instruction="Add.", input="2+2", output="4")
>>> print(render_body(ex))
Add.
<BLANKLINE>
Input: 2+2
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tunelab.data.example import Example
from tunelab.errors import ConfigError

if TYPE_CHECKING:  # type hints only: the prompt layout and its checks load without transformers
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "alpaca", "plain")
ALPACA_HEADER = ("Below is an instruction that describes a task{paired}. "
                 "Write a response that appropriately completes the request.\n\n")


# Picks the demonstrations shown with one example (ICL, IPT); never returns the example itself.
DemoSelector = Callable[[Example], Sequence[Example]]
DEFAULT_MAX_LENGTH = 1024  # tokens of a prompt (with its target when training) when a layout names none


@dataclass(frozen=True)
class PromptLayout:
    """How an example becomes the text a model sees: one value from training to evaluation to serving.

    >>> PromptLayout("plain", max_length=256).to_meta()
    {'template': 'plain', 'system_prompt': None, 'max_length': 256}
    >>> PromptLayout.from_meta({"template": "plain", "max_length": 256}) == PromptLayout("plain", max_length=256)
    True
    """

    template: str = "auto"  # auto | chat | alpaca | plain (``resolved`` fixes auto for a tokenizer)
    system_prompt: str | None = None  # chat system message; None keeps the model's default
    demos: DemoSelector | None = None  # demonstrations per example (ICL, IPT); rebuilt, never saved
    max_length: int = DEFAULT_MAX_LENGTH  # prompt + target tokens in training; prompt tokens in generation

    def resolved(self, tokenizer: PreTrainedTokenizerBase) -> PromptLayout:
        """This layout with ``auto`` replaced by the template the tokenizer implies."""
        return replace(self, template=resolve_template(self.template, tokenizer))

    def demos_for(self, example: Example) -> Sequence[Example]:
        """The demonstrations shown with ``example`` (none without a selector)."""
        return self.demos(example) if self.demos is not None else ()

    def to_meta(self) -> dict[str, Any]:
        """The saved part of the layout (the selector is rebuilt from the run, see ``methods.io``)."""
        return {"template": self.template, "system_prompt": self.system_prompt, "max_length": self.max_length}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], demos: DemoSelector | None = None) -> PromptLayout:
        """The layout ``to_meta`` saved (missing keys: the defaults adapters had before they were saved)."""
        return cls(str(meta.get("template") or "auto"), meta.get("system_prompt"), demos,
                   int(meta.get("max_length") or DEFAULT_MAX_LENGTH))


def as_layout(layout: PromptLayout | str) -> PromptLayout:
    """A layout, or a bare template name meaning that template with no system prompt or demonstrations."""
    return PromptLayout(layout) if isinstance(layout, str) else layout


@dataclass(frozen=True)
class Encoded:
    """Token ids of one training example; ``labels`` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def fill_instruction(candidate: str, example: Example) -> Example:
    """``example`` with ``candidate`` as its instruction (``{instruction}`` in it = the example's own): how a
    discrete prompt rewrites an example (``methods.discrete_prompt``).

    >>> fill_instruction("Task: {instruction}", Example(id="1", task="t", instruction="Add.", input="2+2")).instruction
    'Task: Add.'
    """
    return replace(example, instruction=candidate.replace("{instruction}", example.instruction))


def render_options(options: Sequence[str]) -> str:
    """Flan-style options suffix."""
    return "OPTIONS:\n" + "\n".join(f"- {o}" for o in options)


def render_demo(demo: Example) -> str:
    """One in-context demonstration: (X_demo; Y_demo)."""
    return f"Input: {demo.input}\nOutput: {demo.output}" if demo.input else f"Output: {demo.output}"


def render_body(example: Example, demos: Sequence[Example] = ()) -> str:
    """Instruction, optional options list, demonstrations, then the input."""
    parts = [example.instruction.strip()] if example.instruction.strip() else []
    if example.options:
        parts.append(render_options(example.options))
    parts.extend(render_demo(d) for d in demos)
    if example.input:
        parts.append(f"Input: {example.input}")
    return "\n\n".join(parts)


def resolve_template(template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """``auto`` means the model's chat template when it has one, else the Alpaca layout."""
    if template not in TEMPLATES:
        raise ConfigError(f"data.template={template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.template=chat but this tokenizer has no chat template; use alpaca or plain")
    return template


def build_prompt(tokenizer: PreTrainedTokenizerBase, layout: PromptLayout | str, example: Example) -> str:
    """The full prompt text the model sees before its answer (with the layout's demonstrations)."""
    layout = as_layout(layout)
    template = resolve_template(layout.template, tokenizer)
    body = render_body(example, layout.demos_for(example))
    if template == "chat":
        system_prompt = layout.system_prompt
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": body})
        return chat_text(tokenizer, messages, add_generation_prompt=True)
    if template == "alpaca":
        return ALPACA_HEADER.format(paired=", paired with an input" if example.input else "") + \
            f"### Instruction:\n{body}\n\n### Response:\n"
    return f"{body}\nOutput:"


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
              add_generation_prompt: bool = False) -> str:
    """The chat template's rendering of ``messages`` as text."""
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    assert isinstance(text, str)  # tokenize=False renders text
    return text


def target_text(layout: PromptLayout | str, example: Example) -> str:
    """The supervised continuation (the plain layout puts a space after 'Output:')."""
    return f" {example.output}" if as_layout(layout).template == "plain" else example.output


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_length: int,
           add_special_tokens: bool = False) -> Encoded:
    """Prompt ids + target ids + EOS, labels masked on the prompt; over-long prompts lose their left end.

    Truncation policy: the target keeps at most ``max_length // 2`` tokens (cut on the right), then the
    prompt is cut from the left so the input nearest the answer survives.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = False
    if len(prompt_ids) + len(target_ids) > max_length:
        truncated = True
        target_ids = target_ids[: max(1, max_length // 2)] if len(target_ids) > max_length // 2 else target_ids
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(target_ids)):]
    return Encoded(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, truncated)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int,
                  add_special_tokens: bool = False) -> list[int]:
    """Prompt ids for generation, cut from the left like ``encode`` does."""
    ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    return ids[-max_length:]


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]],
                        max_length: int) -> Encoded:
    """A multi-turn chat: loss on assistant turns only, each rendered by the model's chat template.

    Every prefix of the conversation is rendered, so the ids are exactly those of the full rendering
    and assistant spans are found without guessing at the template's text.
    """
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            head = chat_text(tokenizer, messages[:i], add_generation_prompt=True)
            full = chat_text(tokenizer, messages[: i + 1])
            _extend(tokenizer, ids, labels, head[len(rendered):], supervised=False)
            _extend(tokenizer, ids, labels, full[len(head):], supervised=True)
        else:
            full = chat_text(tokenizer, messages[: i + 1])
            _extend(tokenizer, ids, labels, full[len(rendered):], supervised=False)
        rendered = full
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def encode_example(tokenizer: PreTrainedTokenizerBase, layout: PromptLayout | str, example: Example) -> Encoded:
    """One training example as ids and labels, whatever its shape, within ``layout.max_length`` tokens.

    A conversation (``example.messages``) is rendered by the chat template with loss on assistant
    turns only, and an over-long one is cut on the right (later turns go first); the layout's system
    prompt is prepended when the conversation has no system turn. Anything else is ``build_prompt`` +
    ``target_text`` through ``encode`` (prompt cut from the left, see there).
    """
    layout = as_layout(layout).resolved(tokenizer)
    max_length, system_prompt = layout.max_length, layout.system_prompt
    if not example.messages:
        return encode(tokenizer, build_prompt(tokenizer, layout, example), target_text(layout, example), max_length)
    if layout.template != "chat":
        raise ConfigError(f"example {example.id} is a conversation; it needs data.template=chat (or auto) and "
                          "a model whose tokenizer has a chat template")
    messages = list(example.messages)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return encode_conversation(tokenizer, messages, max_length)


def _extend(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], text: str,
            supervised: bool) -> None:
    new = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    ids.extend(new)
    labels.extend(new if supervised else [IGNORE_INDEX] * len(new))
