"""The FastAPI application of `tunelab serve`: OpenAI-compatible routes over the adapter registry.

Routes: ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent events). Requests are validated and
tokenized in the handler, then queued on the engine:

- ``scheduler="continuous"`` (default): ``serve.scheduler.Scheduler``, iteration-level batching; rows join and
  leave the running batch between decode steps and stream each piece of text as it is decoded. A client that
  disconnects cancels its rows; ``Scheduler.drain`` (SIGTERM) stops admitting (503) and cancels what still
  runs after the grace period.
- ``scheduler="static"``: the older ``serve.batcher.Batcher`` (collect for ``window_ms``, run the batch to
  completion), kept for comparison; its streaming replays the finished completion.
- the registry's ``engine="vllm"`` (`tunelab serve --engine vllm`): ``serve.vllm_scheduler.VllmScheduler``, the
  scheduler's interface over vLLM's engine in this process; adapters vLLM cannot run are left out of
  ``/v1/models`` and a request naming one is answered 400 with the reason.

Every error is answered in the declared schema (``ErrorResponse``: ``{"error": {"message", "type", "code"}}``):
validation and body-decoding errors are 400, unknown routes 404, and an exception no handler expected is
logged and answered 500 (``AnswerErrors``) on a connection that stays open. Messages never name server paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from tunelab.choices import ENGINES, SCHEDULERS
from tunelab.errors import ConfigError, TunelabError
from tunelab.generate import GenerationConfig
from tunelab.serve.batcher import HOT_PROMPTS, Batcher, Job
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.prompts import BadRequest, chat_prompt, completion_prompt
from tunelab.serve.registry import AdapterNotFound, AdapterRegistry, AdapterUnsupported, Served
from tunelab.serve.scheduler import Rejected, Result, Scheduler
from tunelab.serve.scheduler import Request as Row
from tunelab.serve.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Sampling,
    Usage,
)

if TYPE_CHECKING:
    from tunelab.serve.vllm_scheduler import VllmScheduler


@dataclass
class ServeLimits:
    """What one request may ask for; beyond these the server answers 400 (413 for the body)."""

    max_prompt_tokens: int = 2048  # after the template and demonstrations are applied
    max_tokens: int = 512  # new tokens per completion
    default_max_tokens: int = 16  # OpenAI's default when max_tokens is omitted
    max_body_bytes: int = 1_000_000
    max_prompts: int = 16  # prompts in one /v1/completions list
    max_stop: int = 4


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


log = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a request's lone surrogate, escaped
    return JSONResponse({"error": {"message": message, "type": kind, "code": str(status)}}, status_code=status,
                        headers=headers)


class AnswerErrors:
    """ASGI middleware (innermost): an exception no handler expected is logged with its traceback and answered
    500 in the error schema, instead of reaching uvicorn, which would drop the keep-alive connection."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _error(500, f"internal error ({type(exc).__name__}); the server log has the details",
                             "server_error")(scope, receive, send)
        return None


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}
# with "stream": true the 200 answer is server-sent events; the schema is one event's (as schemathesis and
# OpenAPI 3.2's itemSchema read it): its data is an OpenAI chunk (JSON), an error (JSON), or the final [DONE]
STREAMED: dict[int | str, dict[str, Any]] = {**ERRORS, 200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
    "description": "one server-sent event: a JSON chunk per piece of text, then data: [DONE]"}}}}}


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, declared or streamed."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _error(413, f"request body over {self.limit} bytes", "request_too_large")(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the body here (bounded), then hand it to the app
            message = await receive()
            if message["type"] != "http.request":
                return None
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _error(413, f"request body over {self.limit} bytes", "request_too_large")(
                    scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class CountRequests:
    """ASGI middleware: count HTTP requests by route and status code for ``/metrics``."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            route = path if path in _ROUTES else "other"
            self.metrics.requests.inc(f'route="{route}",code="{status["code"]}"')


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


def create_app(registry: AdapterRegistry, limits: ServeLimits | None = None, api_key: str | None = None,
               window_ms: float = 5.0, max_batch: int = 32, mix_adapters: bool = True,
               hot_prompts: int = HOT_PROMPTS, precision: str = "fp32", scheduler: str = "continuous",
               grace_s: float = 10.0) -> FastAPI:
    """The server over ``registry``; requests need ``Authorization: Bearer <api_key>`` when one is set.
    ``precision``: fp32 | bf16 | auto for every request's prefill and decode (``tunelab.precision``, applied per
    phase by the engine, ``inference.engine``, in both schedulers).
    ``scheduler``: "continuous" (iteration-level batching, true streaming) or "static" (the collect-then-run
    ``Batcher``, for comparison; ``window_ms`` and ``mix_adapters=False`` apply to it only);
    ``hot_prompts`` soft prompts keep their virtual-token key/values cached (see ``batcher.HotPrompts``);
    ``grace_s``: on shutdown, rows still running after this long are cancelled.
    The engine is the registry's (``AdapterRegistry(engine=...)``, which also decides what it serves): tunelab's
    schedulers, or vLLM (``serve.vllm_scheduler``; ``max_batch`` and ``hot_prompts`` are then vLLM's business)."""
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if registry.engine not in ENGINES:
        raise ConfigError(f"--engine {registry.engine!r}: choose one of {', '.join(ENGINES)}")
    if registry.engine == "vllm" and scheduler != "continuous":
        raise ConfigError(f"--scheduler {scheduler} is tunelab's own batcher; with --engine vllm, vLLM schedules its "
                          "continuous batch: leave --scheduler at continuous")
    limits = limits or ServeLimits()
    tokenizer = registry.tokenizer
    metrics = ServeMetrics()
    engine: Scheduler | VllmScheduler | None = None
    vllm: VllmScheduler | None = None
    if registry.engine == "vllm":
        from tunelab.serve.vllm_scheduler import VllmScheduler  # imports vLLM's engine only now

        engine = vllm = VllmScheduler(registry, metrics, precision)
    elif scheduler == "continuous":
        engine = Scheduler(tokenizer, max_batch=max_batch, hot_prompts=hot_prompts, metrics=metrics,
                           lora=registry.lora, precision=precision)
    batcher = None if engine is not None else Batcher(tokenizer, window_ms=window_ms, max_batch=max_batch,
                                                      mix=mix_adapters, hot_prompts=hot_prompts, lora=registry.lora)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(registry.names)  # check every adapter now: one log line for each one refused
        yield
        if engine is not None:
            await run_in_threadpool(engine.close, grace_s)
        elif batcher is not None:
            batcher.close()

    app = FastAPI(title="tunelab serve", version="1", lifespan=lifespan,
                  description="Many task adapters over one frozen base model, OpenAI-compatible.")
    app.state.registry, app.state.batcher, app.state.limits = registry, batcher, limits
    app.state.scheduler, app.state.metrics, app.state.grace_s = engine, metrics, grace_s
    app.add_middleware(AnswerErrors)  # first added: innermost, right around the routes
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if api_key is not None and (credentials is None or not secrets.compare_digest(
                credentials.credentials.encode(), api_key.encode())):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", "authentication_error")

    # without a key the routes take none, and the OpenAPI schema declares none
    auth = [Depends(authorize)] if api_key is not None else []

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {_validation_message(exc.errors())}", "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route, wrong method, a body FastAPI cannot decode) in the schema."""
        message = str(exc.detail)
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):
            message = "the request body is not valid UTF-8 JSON"
        elif isinstance(cause, RecursionError):
            message = "the request body's JSON is nested too deeply"
        kind = "not_found_error" if exc.status_code == 404 else (
            "server_error" if exc.status_code >= 500 else "invalid_request_error")
        return _error(exc.status_code, message, kind, dict(exc.headers or {}))

    @app.get("/health")
    def health() -> dict:
        lora = vllm.lora_info() if vllm is not None else {
            "capacity": registry.lora.capacity, "loaded": registry.lora.loaded(), "bytes": registry.lora.nbytes(),
            **asdict(registry.lora.stats)}
        return {"status": "ok", "model": registry.model_name, "engine": registry.engine,
                "adapters_loaded": registry.loaded(), "adapter_loads": registry.loads, "scheduler": scheduler,
                "lora_slots": lora,
                "batching": asdict(engine.stats) if engine is not None else asdict(_static(batcher).stats)}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        if engine is not None:
            metrics.queue_length.set(engine.queued())
            metrics.running.set(engine.running())
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=auth)
    def models() -> ModelList:
        cards = [ModelCard(id=registry.model_name, method="base")]
        cards += [ModelCard(id=name, method=method) for name, method in registry.methods().items()]
        return ModelList(data=cards)

    async def served_for(name: str) -> Served:
        try:
            return await run_in_threadpool(registry.get, name)
        except AdapterUnsupported as exc:  # an adapter the engine cannot run: the reason names no server path
            raise APIError(400, str(exc)) from None
        except AdapterNotFound as exc:  # also an adapter that failed its checks (logged once, with the reason)
            raise APIError(404, str(exc), "not_found_error") from None
        except TunelabError:  # the adapter on disk is broken: the server's problem; its message names paths
            log.exception("cannot load adapter %r", name)
            raise APIError(500, f"cannot load adapter {name!r}; the server log says why", "server_error") from None

    def settings(req: Sampling, max_tokens: int | None) -> GenerationConfig:
        budget = max_tokens or min(limits.default_max_tokens, limits.max_tokens)
        if budget > limits.max_tokens:
            raise APIError(400, f"max_tokens={budget} is over this server's limit of {limits.max_tokens}")
        stops = req.stop_strings()
        if len(stops) > limits.max_stop:
            raise APIError(400, f"at most {limits.max_stop} stop strings")
        return GenerationConfig(max_new_tokens=budget, do_sample=req.temperature > 0, temperature=req.temperature,
                                top_p=req.top_p, stop=stops, seed=req.seed or 0, precision=precision)

    def tokenize(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty")
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens (with the adapter's template and "
                                f"demonstrations); this server's limit is {limits.max_prompt_tokens}")
        return ids

    async def complete(served: Served, texts: list[str], cfg: GenerationConfig, http: Request, kind: str,
                       model: str, stream: bool):
        """Queue the prompts; the streaming response, or (prompt ids, one ``Result`` per prompt)."""
        prompts = [tokenize(t) for t in texts]
        metrics.prompt_tokens.inc(amount=sum(len(p) for p in prompts))
        if engine is None:  # the static batcher
            futures = [_static(batcher).submit(Job(served, ids, cfg)) for ids in prompts]
            if stream:
                return _sse(_replay_stream(futures, model, kind, cfg, tokenizer))
            texts = await _gather(futures)
            return prompts, [Result(t, _finish(tokenizer, t, cfg), _count(tokenizer, t)) for t in texts]
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        rows = []
        for index, ids in enumerate(prompts):
            sink = None
            if stream:
                def sink(piece: str, index: int = index) -> None:  # called on the scheduler thread
                    loop.call_soon_threadsafe(pieces.put_nowait, (index, piece))
            rows.append(Row(served, ids, cfg, on_text=sink))
        try:
            for row in rows:
                engine.submit(row)
        except Rejected:
            for row in rows:
                row.cancel()
            raise APIError(503, "the server is shutting down; retry on another replica", "server_error") from None
        except BadRequest as exc:  # the engine cannot take this row (vLLM: a LoRA above its started rank)
            for row in rows:
                row.cancel()
            raise APIError(400, str(exc)) from None
        if stream:
            for index, row in enumerate(rows):
                row.future.add_done_callback(
                    lambda _f, index=index: loop.call_soon_threadsafe(pieces.put_nowait, (index, None)))
            return _sse(_live_stream(rows, pieces, model, kind))
        return prompts, await _results(rows, http)

    async def prompts_of(served: Served, build: Callable[[], list[str]]) -> list[str]:
        try:
            return await run_in_threadpool(build)  # demonstrations may need the embedding model
        except BadRequest as exc:
            raise APIError(400, str(exc)) from None

    @app.post("/v1/completions", response_model=Completion, responses=STREAMED, dependencies=auth)
    async def completions(req: CompletionRequest, http: Request):
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not 1 <= len(texts) <= limits.max_prompts:
            raise APIError(400, f"send 1 to {limits.max_prompts} prompts")
        cfg = settings(req, req.max_tokens)
        served = await served_for(req.model)
        built = await prompts_of(served, lambda: [completion_prompt(served, tokenizer, t, req.instruction, req.raw)
                                                  for t in texts])
        answer = await complete(served, built, cfg, http, "text_completion", req.model, req.stream)
        if req.stream:
            return answer
        prompts, outs = answer
        choices = [CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(outs)]
        return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model,
                          choices=choices, usage=_usage(prompts, outs))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAMED,
              dependencies=auth)
    async def chat_completions(req: ChatRequest, http: Request):
        cfg = settings(req, req.max_completion_tokens or req.max_tokens)
        served = await served_for(req.model)
        built = await prompts_of(served, lambda: [chat_prompt(served, tokenizer, req.messages, req.raw)])
        answer = await complete(served, built, cfg, http, "chat.completion.chunk", req.model, req.stream)
        if req.stream:
            return answer
        prompts, (result,) = answer
        choice = ChatChoice(index=0, message=ChatMessage(content=result.text), finish_reason=result.finish_reason)
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model,
                              choices=[choice], usage=_usage(prompts, [result]))

    _declare_errors_only(app)
    return app


_UNION_TAGS = {"str", "int", "float", "bool", "none"}  # how pydantic names a union's plain variants in a loc


def _validation_message(errors: Sequence[Any], most: int = 5) -> str:
    """pydantic's errors as ``field: problem`` pairs, one per field: a union's variants are not spelled out
    (``prompt``, not ``prompt.list[function-after[...]]``), and a wrong-type complaint yields to a more specific one.

    >>> _validation_message([{"loc": ("body", "prompt", "str"), "msg": "Input should be a valid string",
    ...                       "type": "string_type"},
    ...                      {"loc": ("body", "prompt", "list[function-after[_unicode(), str]]"),
    ...                       "msg": "List should have at least 1 item", "type": "too_short"}])
    'body.prompt: List should have at least 1 item'
    """
    shown: dict[str, str] = {}
    for error in sorted(errors, key=lambda e: str(e.get("type", "")).endswith("_type")):
        where = ".".join(str(p) for p in error.get("loc", ()) if isinstance(p, int)
                         or (str(p).isidentifier() and p not in _UNION_TAGS))
        shown.setdefault(where[:100], str(error.get("msg", "")))
    return "; ".join(f"{where}: {msg}" for where, msg in list(shown.items())[:most])


def _exact_integer_bounds(node: Any) -> None:
    """FastAPI writes every bound as a float (2**63 - 1 as 9.223372036854776e18); give integer fields their
    bounds as exact integers again, so a client reading the schema sends what the server accepts."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            _exact_integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _exact_integer_bounds(value)


def _declare_errors_only(app: FastAPI) -> None:
    """Drop FastAPI's automatic 422 responses from the OpenAPI schema: validation errors answer 400 here
    (declared with every route's other errors, ``ERRORS``), so the schema says what the server does."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            _exact_integer_bounds(schema)
        return app.openapi_schema  # type: ignore[return-value]  # set by generate()

    app.openapi = openapi  # type: ignore[method-assign]


def _static(batcher: Batcher | None) -> Batcher:
    assert batcher is not None  # create_app builds exactly one of the scheduler and the batcher
    return batcher


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _finish(tokenizer, text: str, cfg: GenerationConfig) -> str:
    """'length' when the budget ran out (re-tokenized count, so approximate), else 'stop'."""
    return "length" if _count(tokenizer, text) >= cfg.max_new_tokens else "stop"


def _usage(prompts: list[list[int]], outs: list[Result]) -> Usage:
    prompt = sum(len(p) for p in prompts)
    completion = sum(r.completion_tokens for r in outs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _results(rows: list[Row], http: Request, poll_s: float = 0.25) -> list[Result]:
    """Wait for the rows' results; a client that disconnects meanwhile cancels its rows."""
    waiting = [asyncio.wrap_future(r.future) for r in rows]
    try:
        while True:
            _done, pending = await asyncio.wait(waiting, timeout=poll_s)
            if not pending:
                break
            if await http.is_disconnected():
                for row in rows:
                    row.cancel()
                raise APIError(499, "client disconnected", "cancelled")
        results = [f.result() for f in waiting]
    except APIError:
        raise
    except Exception as exc:
        raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error") from None
    finally:
        for row in rows:  # also when this handler itself is cancelled
            if not row.future.done():
                row.cancel()
    if any(r.finish_reason == "cancelled" for r in results):
        raise APIError(503, "cancelled: the server is shutting down", "server_error")
    return results


async def _gather(futures: list) -> list[str]:
    try:
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    except Exception as exc:
        raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error") from None


def _pieces(tokenizer, text: str) -> list[str]:
    """``text`` split into per-token pieces whose concatenation is ``text`` exactly."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, done = [], ""
    for k in range(1, len(ids) + 1):
        upto = tokenizer.decode(ids[:k])
        if upto.startswith(done) and len(upto) > len(done) and text.startswith(upto):
            pieces.append(upto[len(done):])
            done = upto
    if done != text:
        pieces.append(text[len(done):])
    return pieces


def _chunker(model: str, kind: str) -> Callable[..., str]:
    """One server-sent event in OpenAI's chunk format (completions or chat)."""
    ident, created = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

    def event(index: int, piece: str | None, finish: str | None, first: bool = False) -> str:
        if kind == "text_completion":
            choice = {"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}
        else:
            delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        body = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    return event


def _error_event(message: str, code: int) -> str:
    kind = "server_error" if code >= 500 else "invalid_request_error"
    return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'code': str(code)}})}\n\n"


async def _live_stream(rows: list[Row], pieces: asyncio.Queue, model: str, kind: str) -> AsyncIterator[str]:
    """Server-sent events as the scheduler decodes: one per piece of text, a finish event per prompt, then
    ``data: [DONE]``. When the client goes away the response task is cancelled here, and so are the rows."""
    event = _chunker(model, kind)
    try:
        if kind != "text_completion":
            for index in range(len(rows)):
                yield event(index, None, None, first=True)
        open_rows = len(rows)
        while open_rows:
            index, piece = await pieces.get()
            if piece is not None:
                yield event(index, piece, None)
                continue
            open_rows -= 1
            try:
                result = rows[index].future.result()
            except Exception as exc:
                yield _error_event(f"generation failed: {type(exc).__name__}: {exc}", 500)
                break
            if result.finish_reason == "cancelled":
                yield _error_event("cancelled: the server is shutting down", 503)
                break
            yield event(index, None, result.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        for row in rows:
            if not row.future.done():
                row.cancel()


async def _replay_stream(futures: list, model: str, kind: str, cfg: GenerationConfig,
                         tokenizer) -> AsyncIterator[str]:
    """The static batcher's streaming: the finished completion replayed as one event per token piece."""
    event = _chunker(model, kind)

    for index, future in enumerate(futures):
        try:
            text = await asyncio.wrap_future(future)
        except Exception as exc:
            error = {"error": {"message": f"generation failed: {exc}", "type": "server_error", "code": "500"}}
            yield f"data: {json.dumps(error)}\n\n"
            break
        if kind != "text_completion":
            yield event(index, None, None, first=True)
        for piece in _pieces(tokenizer, text):
            yield event(index, piece, None)
        yield event(index, None, _finish(tokenizer, text, cfg))
    yield "data: [DONE]\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
