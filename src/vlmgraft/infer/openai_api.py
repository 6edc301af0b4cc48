"""The OpenAI chat-completions wire format: validate a request body, build responses, chunks and errors.

Validation is written out rather than left to FastAPI/pydantic so that every bad input gets an OpenAI-style 400
naming the offending field (`messages[2].content[0].image_url`), never a 422 or a 500.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from vlmgraft.infer.sampling import SamplingParams

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOP_STRINGS = 16
# The template switches clients may set, with their type. Anything else reaches `apply_chat_template` too, where
# `chat_template` replaces the template and `tokenize`, `add_generation_prompt`, `return_*` or `tools` change what
# the prompt is, so other keys are refused.
TEMPLATE_KWARGS = {"enable_thinking": bool, "thinking": bool, "reasoning_effort": str}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ChatRequest:
    model: str
    conversation: list[dict]  # HF chat messages; image parts are {"type": "image"}
    image_urls: list[tuple[str, str]]  # (url, the field it came from), in conversation order
    params: SamplingParams
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False
    template_kwargs: dict = field(default_factory=dict)


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(f"'{name}' must be a number between {low} and {high}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(f"'{name}' must be an integer >= {low}, got {value!r}", name)
    return value


def _content_parts(content: Any, index: int) -> tuple[list[dict] | str | None, list[tuple[str, str]]]:
    where = f"messages[{index}].content"
    if content is None or isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content parts", where)
    parts, urls = [], []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(f"{here} must be an object with a 'type'", here)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{here}.text must be a string", f"{here}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif part["type"] == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise _bad(f"{here}.image_url.url must be a non-empty string", f"{here}.image_url")
            parts.append({"type": "image"})
            urls.append((url, f"{here}.image_url"))
        else:
            raise _bad(f"{here}: content type {part['type']!r} is not supported (use 'text' or 'image_url')", here)
    return parts, urls


def _check_template_kwargs(kwargs: dict) -> None:
    allowed = ", ".join(sorted(TEMPLATE_KWARGS))
    for key, value in kwargs.items():
        where = f"chat_template_kwargs.{key}"
        kind = TEMPLATE_KWARGS.get(key)
        if kind is None:
            raise _bad(f"chat_template_kwargs may not set {key!r}; this server accepts only {allowed}", where,
                       "unsupported_parameter")
        if not isinstance(value, kind):
            raise _bad(f"{where} must be a {kind.__name__}, got {value!r}", where)


def parse_chat_request(body: Any, defaults: SamplingParams) -> ChatRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required and must be a non-empty list", "messages")
    conversation, image_urls = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}", f"messages[{i}].role")
        content, urls = _content_parts(message.get("content"), i)
        if content is None and role != "assistant":
            raise _bad(f"messages[{i}].content is required", f"messages[{i}].content")
        image_urls += urls
        conversation.append({"role": "system" if role == "developer" else role, "content": content or ""})
    for name, neutral in (("tools", None), ("functions", None), ("logprobs", False), ("frequency_penalty", 0),
                          ("presence_penalty", 0)):
        if body.get(name) not in (None, neutral, []):
            raise _bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if _integer(body, "n", 1, 1) != 1:
        raise _bad("only n=1 is supported", "n", "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _bad("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
                             or not all(isinstance(s, str) for s in stop)):
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    max_tokens = _integer(body, "max_completion_tokens", 1, None)
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1, None)
    top_k = _integer(body, "top_k", -1, defaults.top_k)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"'seed' must be an integer, got {seed!r}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(options, dict) or not isinstance(kwargs, dict):
        raise _bad("'stream_options' and 'chat_template_kwargs' must be objects",
                   "stream_options" if not isinstance(options, dict) else "chat_template_kwargs")
    _check_template_kwargs(kwargs)
    temperature = _number(body, "temperature", 0.0, 2.0, defaults.temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, defaults.top_p)
    params = SamplingParams(max_new_tokens=max_tokens or defaults.max_new_tokens, temperature=temperature,
                            top_p=top_p if top_p > 0 else 1e-6, top_k=max(0, top_k), seed=seed,
                            stop=list(stop or []))
    return ChatRequest(model, conversation, image_urls, params, max_tokens is not None, bool(stream),
                       bool(options.get("include_usage")), dict(kwargs))


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(completion_id: str, model: str, answer: str, reasoning: str | None, finish_reason: str,
               prompt_tokens: int, completion_tokens: int) -> dict:
    message = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(completion_id: str, model: str, delta: dict, finish_reason: str | None = None,
          usage_counts: dict | None = None) -> dict:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if usage_counts is not None and not delta and finish_reason is None
            else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body
