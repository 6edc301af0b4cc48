"""`vlmgraft serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

Routes: POST /v1/chat/completions (plain or server-sent events), GET /v1/models, GET /health (with batching
statistics). Every error, bad input or not, is answered in OpenAI's `{"error": {...}}` shape with a 4xx code for
anything the client can fix; only a fault of the server itself is a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmgraft.images import ImageError, ImagePolicy, load_image
from vlmgraft.infer import openai_api as api
from vlmgraft.infer.prompts import ReasoningSplitter, prepare, split_reasoning
from vlmgraft.infer.sampling import SamplingParams
from vlmgraft.infer.worker import EngineWorker, StreamEvent

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    model_id: str
    processor: object
    worker: EngineWorker
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    api_key: str | None = None
    # what an unset field of a request means (serve fills it from the model's generation config)
    defaults: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=1024))
    aliases: tuple[str, ...] = ()
    device: str = "cpu"
    max_body_bytes: int = 64 * 1024 * 1024
    started: float = field(default_factory=time.time)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        yield
        await asyncio.to_thread(state.worker.stop)

    app = FastAPI(title="vlmgraft", lifespan=lifespan)
    app.state.vlmgraft = state

    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, err: api.ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(api.error_body(str(err.errors()[:3])), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        log.exception("unhandled error")
        return JSONResponse(api.error_body(f"internal server error: {type(err).__name__}", "server_error"),
                            status_code=500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), state.api_key):
            raise api.ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                               "authentication_error", None, "invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_id, "device": state.device,
                "uptime_s": round(time.time() - state.started, 1), "engine": state.worker.snapshot()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": int(state.started),
                                            "owned_by": "vlmgraft"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await _read_body(request, state.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise api.ApiError(400, f"the request body is not valid JSON: {err}") from err
        chat = api.parse_chat_request(body, state.defaults)
        if chat.model not in (state.model_id, *state.aliases):
            raise api.ApiError(404, f"the model {chat.model!r} does not exist; this server serves "
                                    f"{state.model_id!r}", param="model", code="model_not_found")
        prepared = await asyncio.to_thread(_prepare, state, chat)
        _fit_length(state, chat, len(prepared.input_ids))
        return await _respond(state, chat, prepared, request)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over the limit (never read whole into memory)."""
    declared = request.headers.get("content-length", "")
    too_big = api.ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, total = [], 0
    async for piece in request.stream():
        total += len(piece)
        if total > limit:
            raise too_big
        chunks.append(piece)
    return b"".join(chunks)


def _prepare(state: ServerState, chat: api.ChatRequest):
    images = []
    for url, param in chat.image_urls:
        try:
            images.append(load_image(url, state.image_policy))
        except ImageError as err:
            raise api.ApiError(err.status, f"{param}: {err}", param=param, code=err.code) from err
    try:
        return prepare(state.processor, chat.conversation, images, template_kwargs=chat.template_kwargs)
    except api.ApiError:
        raise
    except Exception as err:  # template or processor rejected the conversation: the client's input
        raise api.ApiError(400, f"messages could not be rendered into a prompt: {err}", param="messages") from err


def _fit_length(state: ServerState, chat: api.ChatRequest, prompt_tokens: int) -> None:
    """Refuse what cannot fit; an unset max_tokens shrinks to the room left, as OpenAI does."""
    engine = state.worker.engine
    room = engine.prompt_room(prompt_tokens)
    if room < 1 or chat.max_tokens_given and chat.params.max_new_tokens > room:
        raise api.ApiError(400, f"the prompt is {prompt_tokens} tokens; with max_tokens "
                                f"{chat.params.max_new_tokens} it exceeds this server's context of "
                                f"{engine.config.max_seq_len} tokens", param="messages",
                           code="context_length_exceeded")
    chat.params.max_new_tokens = min(chat.params.max_new_tokens, room)


async def _respond(state: ServerState, chat: api.ChatRequest, prepared, request: Request):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[StreamEvent] = asyncio.Queue()
    handle = state.worker.submit(prepared, chat.params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    completion_id = api.new_completion_id()
    prompt_tokens = len(prepared.input_ids)
    if not chat.stream:
        pieces = []
        try:
            while True:
                event = await events.get()
                pieces.append(event.delta)
                if event.error:
                    raise api.ApiError(500, f"generation failed: {event.error}", "server_error")
                if event.finish_reason:
                    break
        finally:
            if not handle.done:
                state.worker.cancel(handle)
        answer, reasoning = split_reasoning("".join(pieces), prepared.opens_thinking)
        return api.completion(completion_id, chat.model, answer, reasoning, event.finish_reason, prompt_tokens,
                              event.completion_tokens)

    async def sse():
        splitter = ReasoningSplitter(prepared.opens_thinking)
        try:
            yield _sse(api.chunk(completion_id, chat.model, {"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if event.error:
                    yield _sse(api.error_body(f"generation failed: {event.error}", "server_error"))
                    break
                thought, said = splitter.feed(event.delta, final=bool(event.finish_reason))
                if thought:
                    yield _sse(api.chunk(completion_id, chat.model, {"reasoning_content": thought}))
                if said:
                    yield _sse(api.chunk(completion_id, chat.model, {"content": said}))
                if event.finish_reason:
                    yield _sse(api.chunk(completion_id, chat.model, {}, event.finish_reason))
                    if chat.include_usage:
                        yield _sse(api.chunk(completion_id, chat.model, {}, None,
                                             api.usage(prompt_tokens, event.completion_tokens)))
                    break
            yield "data: [DONE]\n\n"
        finally:  # client went away or we are done: free the slot either way
            if not handle.done:
                state.worker.cancel(handle)

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
