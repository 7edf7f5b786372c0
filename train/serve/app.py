"""The OpenAI-compatible API (FastAPI) and a web chat page at / (chat.html): /v1/chat/completions
(streamed over server-sent events or not), /v1/completions, /v1/models, /health. The reasoning comes
apart from the answer as `reasoning_content` (as vLLM, SGLang and DeepSeek's API return it), streamed
as its own deltas; `chat_template_kwargs: {"enable_thinking": false}` switches thinking off per
request. Bad requests get OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) with
the matching status, never a traceback."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.batching import Request as DecodeRequest
from models.chat_format import IMAGE
from models.generate import check_sampling
from models.think import ThinkParser

from ..chat import TextStream
from ..data.chat_masks import encode_prompt
from ..data.images import load_image
from ..errors import UserError
from .engine import Engine

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = {401: "authentication_error", 404: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of the OpenAI API this server does not use are ignored

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate to max_tokens (for benchmarks)


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # the completions API's default


@dataclass
class Served:
    """What the routes need: the model's engine and tokenizer, its name, and its image inputs (a VLM)."""

    engine: Engine
    tokenizer: Any
    model_id: str
    context: int
    stop_ids: list[int]
    image_tokens: int = 0
    image_config: Any = None
    created: int = 0


class ReplyText:
    """A choice's tokens as text pieces: incremental detokenization, then stop strings (text held back
    while it could still begin one), then, for chat, the think parser's split into reasoning and answer."""

    def __init__(self, tokenizer, stop_ids, stop: list[str], chat: bool):
        self.stream, self.stop_ids, self.stop = TextStream(tokenizer), set(stop_ids), [s for s in stop if s]
        self.parser = ThinkParser() if chat else None
        self.held, self.stopped = "", False

    def _pieces(self, text: str) -> list[tuple[str, str]]:
        if self.parser is None:
            return [("text", text)] if text else []
        return self.parser.feed(text)

    def feed(self, token: int) -> list[tuple[str, str]]:
        if self.stopped or token in self.stop_ids:
            return []
        text = self.held + self.stream.add(token)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return self._pieces(text[: min(hits)])
        keep = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return self._pieces(text[: len(text) - keep])

    def finish(self) -> list[tuple[str, str]]:
        out = self._pieces(self.held)
        self.held = ""
        if self.parser is not None:
            out += self.parser.finish()
        return out


def _image_from_url(url: str, served: Served, where: str) -> torch.Tensor:
    if not url.startswith("data:") or ";base64," not in url:
        raise APIError(400, f"{where}: only data URIs (data:image/...;base64,...) are accepted", "messages")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data URI is not valid base64", "messages") from None
    c = served.image_config
    try:
        return load_image(io.BytesIO(raw), c.image_size, c.image_mean, c.image_std, name=where)
    except UserError as e:
        raise APIError(400, str(e), "messages") from None


def _chat_messages(body: ChatBody, served: Served) -> tuple[list[dict], torch.Tensor | None]:
    """The messages with text content (image parts become <|image|> placeholders) and the images."""
    messages, images = [], []
    for i, m in enumerate(body.messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}", "messages")
        if content is None:
            content = ""
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    where = f"messages[{i}].content[{j}]"
                    if not served.image_tokens:
                        raise APIError(
                            400, f"{where}: {served.model_id} is a text model; it takes no images", "messages"
                        )
                    url = part.get("image_url", {})
                    url = url.get("url", "") if isinstance(url, dict) else str(url)
                    images.append(_image_from_url(url, served, where))
                    texts.append(IMAGE)
                else:
                    raise APIError(400, f"messages[{i}].content[{j}]: parts are text or image_url", "messages")
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
        message = {"role": role, "content": content}
        if isinstance(m.get("reasoning_content"), str):
            message["reasoning_content"] = m["reasoning_content"]
        messages.append(message)
    return messages, (torch.stack(images) if images else None)


def _limits(served: Served, prompt_len: int, max_tokens: int | None) -> int:
    if prompt_len >= served.context:
        raise APIError(
            400,
            f"the prompt is {prompt_len} tokens; the model's context is {served.context}",
            "messages",
            "context_length_exceeded",
        )
    room = served.context - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(
            400,
            f"max_tokens={max_tokens} cannot fit: the prompt is {prompt_len} tokens of the model's "
            f"context of {served.context}, leaving {room}",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens


def _decode_requests(body: _Body, served: Served, prompt: list[int], max_new: int, pixels) -> list[DecodeRequest]:
    top_p = None if body.top_p >= 1 else body.top_p
    check_sampling(max_new, body.temperature, None, top_p, 1.0)
    out = []
    for i in range(body.n):
        generator = torch.Generator()
        generator.manual_seed(body.seed + i if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "big"))
        out.append(
            DecodeRequest(
                prompt,
                max_new,
                temperature=body.temperature,
                top_p=top_p,
                stop_ids=() if body.ignore_eos else served.stop_ids,
                generator=generator,
                pixel_values=pixels,
            )
        )
    return out


def _choices(body: _Body, served: Served, prompt, max_new: int, pixels, chat: bool):
    """The request's n sequences to decode, and the text pipeline of each."""
    try:
        requests = _decode_requests(body, served, prompt, max_new, pixels)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return requests, [ReplyText(served.tokenizer, served.stop_ids, stop, chat=chat) for _ in requests]


def _finish_reason(reason: str, stopped_by_text: bool) -> str:
    if stopped_by_text:
        return "stop"
    if reason.startswith("error"):
        raise APIError(500, f"generation failed ({reason})", code="generation_failed")
    return reason


async def _events(served: Served, requests: list[DecodeRequest]):
    """Merge the choices' engine events: (choice index, kind, value)."""
    loop = asyncio.get_running_loop()
    queues = [served.engine.submit(r, loop) for r in requests]
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i, q):
        while True:
            kind, value = await q.get()
            await merged.put((i, kind, value))
            if kind == "finish":
                return

    tasks = [asyncio.create_task(pump(i, q)) for i, q in enumerate(queues)]
    left = len(requests)
    try:
        while left:
            i, kind, value = await merged.get()
            if kind == "finish":
                left -= 1
            yield i, kind, value
    finally:
        for r in requests:
            if r.finish_reason is None:
                r.cancelled = True  # a client that went away frees its slots
        for t in tasks:
            t.cancel()


def _usage(prompt_len: int, requests: list[DecodeRequest]) -> dict:
    done = sum(len(r.tokens) for r in requests)
    return {"prompt_tokens": prompt_len, "completion_tokens": done, "total_tokens": prompt_len + done}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(served: Served, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llm-scratch", docs_url=None, redoc_url=None)
    served.created = served.created or int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return APIError(400, message, where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(_req, e: Exception):
        log.exception("request failed")
        return APIError(500, f"internal error: {type(e).__name__}").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(401, "invalid API key", code="invalid_api_key").response()
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != served.model_id:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server has {served.model_id!r}",
                "model",
                "model_not_found",
            )

    page = (Path(__file__).parent / "chat.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        engine = served.engine
        return {
            "status": "ok",
            "model": served.model_id,
            "active": len(engine.decoder.active),
            "slots": engine.slots,
            "peak_batch": engine.peak_batch,
            "finished": dict(engine.finished),
        }

    @app.get("/v1/models")
    async def models():
        card = {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "llm-scratch"}
        card["max_model_len"] = served.context
        card["vision"] = bool(served.image_tokens)  # the web page offers an image upload
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        check_model(body.model)
        messages, pixels = _chat_messages(body, served)
        kwargs = body.chat_template_kwargs or {}
        think = kwargs.get("enable_thinking", True) is not False
        placeholders = sum(m["content"].count(IMAGE) for m in messages)
        if placeholders != (0 if pixels is None else len(pixels)):
            raise APIError(400, f"messages: {IMAGE} is written in the text; send images as image_url parts", "messages")
        prompt = encode_prompt(served.tokenizer, messages, think, served.image_tokens)
        max_new = _limits(served, len(prompt), body.max_completion_tokens or body.max_tokens)
        requests, texts = _choices(body, served, prompt, max_new, pixels, chat=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": served.model_id}
        if body.stream:
            usage_wanted = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _chat_stream(served, head, requests, texts, len(prompt), usage_wanted), media_type="text/event-stream"
            )
        parts = [{"reasoning": "", "answer": ""} for _ in requests]
        reasons = [None] * len(requests)
        async for i, kind, value in _events(served, requests):
            pieces = texts[i].feed(value) if kind == "token" else texts[i].finish()
            for k, t in pieces:
                parts[i]["reasoning" if k == "reasoning" else "answer"] += t
            if kind == "finish":
                reasons[i] = _finish_reason(value, texts[i].stopped)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": p["answer"], "reasoning_content": p["reasoning"] or None},
                "finish_reason": reasons[i],
            }
            for i, p in enumerate(parts)
        ]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt), requests)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: send one prompt per request", "prompt")
        prompt = served.tokenizer.encode(prompts[0], add_special_tokens=False)
        if not prompt:
            raise APIError(400, "prompt: empty", "prompt")
        max_new = _limits(served, len(prompt), body.max_tokens)
        requests, texts = _choices(body, served, prompt, max_new, None, chat=False)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": served.model_id}
        if body.stream:
            return StreamingResponse(_completion_stream(served, head, requests, texts), media_type="text/event-stream")
        out, reasons = [""] * len(requests), [None] * len(requests)
        async for i, kind, value in _events(served, requests):
            out[i] += "".join(t for _, t in (texts[i].feed(value) if kind == "token" else texts[i].finish()))
            if kind == "finish":
                reasons[i] = _finish_reason(value, texts[i].stopped)
        choices = [{"index": i, "text": t, "finish_reason": reasons[i], "logprobs": None} for i, t in enumerate(out)]
        return {**head, "choices": choices, "usage": _usage(len(prompt), requests)}

    return app


async def _chat_stream(served, head, requests, texts, prompt_len: int, usage_wanted: bool):
    def chunk(choices, **extra):
        return _sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

    for i in range(len(requests)):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    async for i, kind, value in _events(served, requests):
        pieces = texts[i].feed(value) if kind == "token" else texts[i].finish()
        for k, t in pieces:
            delta = {"reasoning_content": t} if k == "reasoning" else {"content": t}
            yield chunk([{"index": i, "delta": delta, "finish_reason": None}])
        if kind == "finish":
            try:
                reason = _finish_reason(value, texts[i].stopped)
            except APIError as e:
                yield _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
                return
            yield chunk([{"index": i, "delta": {}, "finish_reason": reason}])
    if usage_wanted:
        yield chunk([], usage=_usage(prompt_len, requests))
    yield "data: [DONE]\n\n"


async def _completion_stream(served, head, requests, texts):
    async for i, kind, value in _events(served, requests):
        pieces = texts[i].feed(value) if kind == "token" else texts[i].finish()
        text = "".join(t for _, t in pieces)
        reason = _finish_reason(value, texts[i].stopped) if kind == "finish" else None
        if text or reason:
            yield _sse({**head, "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}]})
    yield "data: [DONE]\n\n"


def served_model(checkpoint, slots: int, model_id: str | None = None) -> Served:
    """Load a checkpoint, run or transformers directory and start its engine."""
    from models import load_pretrained
    from models.chat_format import PAD, STOP_TOKENS

    from ..data.images import image_inputs
    from ..data.tokenizer import check_vocab, load_tokenizer, tokenizer_dir_for

    model = load_pretrained(checkpoint).eval()
    tokenizer = load_tokenizer(tokenizer_dir_for(checkpoint))
    check_vocab(tokenizer, model, checkpoint)
    image_tokens, loader = image_inputs(model)
    engine = Engine(model, slots, tokenizer.convert_tokens_to_ids(PAD)).start()
    return Served(
        engine=engine,
        tokenizer=tokenizer,
        model_id=model_id or Path(checkpoint).resolve().name,
        context=model.config.max_position_embeddings,
        stop_ids=[tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS],
        image_tokens=image_tokens,
        image_config=model.config if loader is not None else None,
    )


def run_serve(ns) -> None:
    import uvicorn

    served = served_model(ns.checkpoint, ns.slots, ns.model_name)
    if ns.host not in ("127.0.0.1", "localhost", "::1") and ns.api_key is None:
        print(f"warning: serving on {ns.host} without --api-key: anyone who can reach it can use it")
    print(f"serving {served.model_id!r} at http://{ns.host}:{ns.port}/v1 ({ns.slots} sequences batched at once)")
    try:
        uvicorn.run(create_app(served, ns.api_key), host=ns.host, port=ns.port, log_level="warning")
    finally:
        served.engine.stop()
