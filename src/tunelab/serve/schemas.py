"""OpenAI-compatible request and response bodies (the subset tunelab serves), as pydantic models.

Fields OpenAI defines but tunelab does not use (``user``, ``logprobs``, ``presence_penalty``, ...) are
accepted and ignored, so existing clients work unchanged. Two deviations, both documented on the
fields: ``temperature`` defaults to 0 (greedy, like `tunelab eval`), and ``n`` must be 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class Sampling(BaseModel):
    """Decoding options shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="an adapter name (GET /v1/models) or the base model's name")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default 16; capped by the server)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (tunelab's default, unlike OpenAI's 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings, cut from the output")
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="sampling seed (per batch; see docs)")
    n: int = Field(1, ge=1, le=1, description="completions per prompt; only 1 is supported")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(Sampling):
    """/v1/completions. ``prompt`` is the example's input; the adapter's template lays it out as in training."""

    prompt: str | list[str] = Field(description="the input text (or a list of inputs, one choice each)")
    instruction: str | None = Field(None, description="tunelab extension: the task instruction shown before "
                                                       "the input, as in the adapter's training data")
    raw: bool = Field(False, description="tunelab extension: send the prompt as is, without the adapter's template")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    """/v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")


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
