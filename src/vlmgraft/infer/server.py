"""`vlmgraft serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

Routes: POST /v1/chat/completions (plain or server-sent events), GET /v1/models, GET /health (with batching
statistics). Every error, bad input or not, is answered in OpenAI's `{"error": {...}}` shape with a 4xx code for
anything the client can fix; only a fault of the server itself is a 500. Image counts and pixels are refused
before anything is decoded (`limits.py`), a client that hangs up frees its batch slot whether it streams or not, and
/health answers 503 once the engine is out of service.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vlmgraft.images import ImageError, ImagePolicy, load_image
from vlmgraft.infer import openai_api as api
from vlmgraft.infer.limits import BodyBudget, PixelTally, RequestLimits, check_image_count, declared_size
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
    # chat template arguments a request's `chat_template_kwargs` may override (serve: the model's thinking default)
    template_defaults: dict = field(default_factory=dict)
    device: str = "cpu"
    max_body_bytes: int = 64 * 1024 * 1024
    limits: RequestLimits = field(default_factory=RequestLimits)
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.bodies = BodyBudget(max(self.limits.max_pending_bytes, self.max_body_bytes))
        self.decoding = asyncio.Semaphore(self.limits.max_decodes)  # binds to the loop that first waits on it


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
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(api.error_body(str(err.errors()[:3])), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, err: ClientDisconnect):
        return Response(status_code=499)  # hung up while sending its body: nobody reads the answer

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        log.exception("unhandled error")
        return JSONResponse(api.error_body(f"internal server error: {type(err).__name__}", "server_error"),
                            status_code=500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        if not bearer_matches(request.headers.get("authorization", ""), state.api_key):
            raise api.ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                               "authentication_error", None, "invalid_api_key")

    @app.get("/health")
    async def health():
        fault = state.worker.fault()
        body = {"status": "error" if fault else "ok", "model": state.model_id, "device": state.device,
                "uptime_s": round(time.time() - state.started, 1), "engine": state.worker.snapshot(),
                "pending_body_bytes": state.bodies.held}
        if fault:  # an orchestrator restarts a server whose health check fails
            return JSONResponse({**body, "reason": fault}, status_code=503)
        return body

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": int(state.started),
                                            "owned_by": "vlmgraft"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        if fault := state.worker.fault():
            raise api.ApiError(503, f"the engine is out of service ({fault}); the server needs a restart",
                               "server_error", code="engine_unavailable")
        with state.bodies.hold() as claim:  # released once the images are model inputs
            chat, prepared = await _read_and_prepare(state, request, claim)
        _fit_length(state, chat, len(prepared.input_ids))
        return await _respond(state, chat, prepared, request)

    return app


def bearer_matches(header: str, key: str) -> bool:
    """Whether an Authorization header carries the key, compared in constant time as bytes (a non-ASCII token is
    then a mismatch, not an error; headers arrive decoded as latin-1, so encoding back gives the bytes sent)."""
    scheme, _, token = header.partition(" ")
    sent = token.strip().encode("latin-1", "replace")
    return hmac.compare_digest(sent, key.encode("utf-8")) and scheme.lower() == "bearer"


async def _read_and_prepare(state: ServerState, request: Request, claim):
    """Body → validated request → model inputs; the body and its images are dropped on return."""
    raw = await _read_body(request, state.max_body_bytes, claim)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise api.ApiError(400, f"the request body is not valid JSON: {err}") from err
    chat = api.parse_chat_request(body, state.defaults)
    if chat.model not in (state.model_id, *state.aliases):
        raise api.ApiError(404, f"the model {chat.model!r} does not exist; this server serves "
                                f"{state.model_id!r}", param="model", code="model_not_found")
    check_image_count(chat.image_urls, state.limits)
    tally, sizes = await asyncio.to_thread(_declared_pixels, state, chat)
    async with state.decoding if chat.image_urls else nullcontext():
        prepared = await asyncio.to_thread(_prepare, state, chat, tally, sizes)
    chat.image_urls = []  # the data URLs are not needed while generating
    return chat, prepared


async def _read_body(request: Request, limit: int, claim) -> bytes:
    """The body, refused with 413 as soon as it is known to be over the limit (never read whole into memory), and
    with 503 when the bodies already held would pass the server's budget."""
    declared = request.headers.get("content-length", "")
    declared = declared if declared.isascii() else ""
    too_big = api.ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    if declared.isdigit():
        claim.grow(int(declared))
    chunks, total = [], 0
    async for piece in request.stream():
        total += len(piece)
        if total > limit:
            raise too_big
        if total > claim.bytes:
            claim.grow(total - claim.bytes)
        chunks.append(piece)
    return b"".join(chunks)


def _declared_pixels(state: ServerState, chat: api.ChatRequest) -> tuple[PixelTally, list]:
    """Refuse the request if its data-URL images declare too many pixels, from their headers alone."""
    tally = PixelTally(state.limits)
    sizes = [declared_size(url, param) for url, param in chat.image_urls]
    for size, (_, param) in zip(sizes, chat.image_urls, strict=True):
        if size is not None:
            tally.add(*size, param)
    return tally, sizes


def _prepare(state: ServerState, chat: api.ChatRequest, tally: PixelTally, sizes: list):
    images = []
    for (url, param), size in zip(chat.image_urls, sizes, strict=True):
        try:
            image = load_image(url, state.image_policy)
        except ImageError as err:
            raise api.ApiError(err.status, f"{param}: {err}", param=param, code=err.code) from err
        if size is None:  # a file or remote image: its size is known once loaded (each under the per-image limit)
            tally.add(image.width, image.height, param)
        images.append(image)
    try:
        return prepare(state.processor, chat.conversation, images,
                       template_kwargs={**state.template_defaults, **chat.template_kwargs})
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
    events: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
    handle = state.worker.submit(prepared, chat.params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    completion_id = api.new_completion_id()
    prompt_tokens = len(prepared.input_ids)
    if not chat.stream:
        pieces = []
        # A client that hangs up frees its slot, as a dropped stream does: the watcher wakes the loop below.
        watcher = asyncio.create_task(_put_on_disconnect(request, events))
        try:
            while True:
                event = await events.get()
                if event is None:
                    log.info("client disconnected: generation cancelled")
                    return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
                pieces.append(event.delta)
                if event.error:
                    raise api.ApiError(500, f"generation failed: {event.error}", "server_error")
                if event.finish_reason:
                    break
        finally:
            watcher.cancel()
            if not handle.done:
                state.worker.cancel(handle)
        answer, reasoning = split_reasoning("".join(pieces), prepared.opens_thinking)
        return api.completion(completion_id, chat.model, answer, reasoning, event.finish_reason, prompt_tokens,
                              event.completion_tokens)

    async def sse():
        splitter = ReasoningSplitter(prepared.opens_thinking)
        watcher = asyncio.create_task(_put_on_disconnect(request, events))
        try:
            yield _sse(api.chunk(completion_id, chat.model, {"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if event is None:  # the client hung up
                    return
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
            watcher.cancel()
            if not handle.done:
                state.worker.cancel(handle)

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _put_on_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Put None on the queue when the client closes the connection (the body is read: only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(None)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
