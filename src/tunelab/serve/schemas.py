"""OpenAI-compatible request and response bodies (the subset tunelab serves), as pydantic models.

Fields OpenAI defines but tunelab does not use (``user``, ``logprobs``, ``presence_penalty``, ...) are
accepted and ignored, so existing clients work unchanged. Two deviations, both documented on the
fields: ``temperature`` defaults to 0 (greedy, like `tunelab eval`), and ``n`` must be 1.

Request fields are strict: a value of another JSON type than the schema's (``"seed": false``, ``"max_tokens":
"8"``) is refused, not converted, so the schema says exactly what is accepted. Every string a request sends
must be valid Unicode: JSON allows a lone surrogate escape (``"\\ud800"``),
which no tokenizer can encode, so it is refused here as a validation error (HTTP 400).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SEED_BOUND = 2**63  # seeds are int64: below this (exact as a float too, so the OpenAPI schema states it exactly)


def _unicode(text: str) -> str:
    """``text`` unchanged when it encodes as UTF-8 (no lone surrogates), else a validation error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (a lone surrogate such as \\ud800)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # any string a request sends


class Sampling(BaseModel):
    """Decoding options shared by both endpoints."""

    model_config = ConfigDict(extra="ignore", strict=True)  # a JSON type the schema does not allow is refused

    model: Text = Field(description="an adapter name (GET /v1/models) or the base model's name")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default 16; capped by the server)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (tunelab's default, unlike OpenAI's 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = Field(None, description="up to 4 stop strings, cut from the output")
    stream: bool = False
    seed: int | None = Field(None, ge=0, lt=SEED_BOUND, description="sampling seed, 0 to 2**63 - 1 (per batch; see docs)")
    n: int = Field(1, ge=1, le=1, description="completions per prompt; only 1 is supported")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(Sampling):
    """/v1/completions. ``prompt`` is the example's input; the adapter's layout (template, system prompt,
    the task's instruction and options, demonstrations) lays it out as in training."""

    prompt: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="the input text (or a non-empty list of inputs, one choice each)")
    instruction: Text | None = Field(None, description="tunelab extension: the task instruction shown before the "
                                                        "input (default: the one the adapter was trained with)")
    raw: bool = Field(False, description="tunelab extension: send the prompt as is, without the adapter's layout")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # a JSON type the schema does not allow is refused

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(Sampling):
    """/v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    raw: bool = Field(False, description="tunelab extension: render the messages with the model's chat template "
                                         "only, without the adapter's layout (task instruction, template)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tunelab"
    method: str = Field(description="tunelab method that produced the adapter ('base' for the base model)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
