"""An OpenAI-compatible HTTP API over one or more engines, and the web chat page at `/`.

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events when `stream` is
true: `data: {chunk}` lines, then `data: [DONE]`, as OpenAI sends them), GET /v1/models, GET /health.
Every error is a 4xx with OpenAI's body, {"error": {"message", "type", "param", "code"}}; the server
keeps serving. Limits: request body bytes, prompt tokens (the model's context), max_tokens, and
running + waiting requests per model (beyond it: 429 at once, never a hang).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatforge.model.generate import Sampling
from chatforge.serve.engine import Engine, EngineBusy
from chatforge.serve.engine import Request as EngineRequest
from chatforge.tokenizer import encode, render_chat

WEB = Path(__file__).parent / "web"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """The sampling fields both endpoints share; unknown fields are ignored, as OpenAI's clients add some."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what torch.Generator accepts
    n: int = Field(1, ge=1, le=1)  # one reply per request
    stream_options: StreamOptions | None = None


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampled):
    prompt: str | list[str]


class Guard:
    """ASGI middleware: the body is read up front and refused past `limit` bytes (413), whether or not
    Content-Length tells the truth; then /v1/ routes need `Authorization: Bearer KEY` when a key is set."""

    def __init__(self, app, limit: int, api_key: str | None):
        self.app, self.limit, self.api_key = app, limit, api_key
        self.too_big = JSONResponse(error_body(f"request body must be at most {limit} bytes", "invalid_request_error"),
                                    status_code=413)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self.too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self.too_big(scope, receive, send)
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                refusal = JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer KEY'",
                                                  "invalid_request_error", code="invalid_api_key"), status_code=401)
                return await refusal(scope, receive, send)
        replayed = False

        async def replay():  # the body once, then the client's own messages (so a disconnect is still seen)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class Handover:
    """Events from the engine's thread to the event loop, many per wake-up: one call_soon_threadsafe for
    all the tokens of a decode step rather than one per token (each wake-up is a write to the loop's
    self-pipe and a trip through the GIL, which at 32 streams costs more than the decoding)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items = loop, threading.Lock(), []

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        with self.lock:
            self.items.append((queue, item))
            wake = len(self.items) == 1
        if wake:
            self.loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_stop: int = 4  # stop strings per request, as OpenAI allows


def create_app(engines: dict[str, Engine], api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="chatforge", version="0.1.0", description=__doc__)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({first.get('ctx', {}).get('error')})",
                                           "invalid_request_error"), status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error", where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    app.add_middleware(Guard, limit=limits.max_body_bytes, api_key=api_key)

    handovers: dict[asyncio.AbstractEventLoop, Handover] = {}

    def engine_for(name: str) -> Engine:
        if name not in engines:
            shown = name[:100].encode("utf-8", "backslashreplace").decode()  # the name may not be valid text
            raise APIError(404, f"The model '{shown}' does not exist; this server has {sorted(engines)}",
                           "model", "model_not_found")
        return engines[name]

    def prepare(body: Sampled, prompt: str) -> tuple[Engine, EngineRequest]:
        engine = engine_for(body.model)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > limits.max_stop:
            raise APIError(400, f"stop: at most {limits.max_stop} stop strings", "stop")
        for text in [prompt, *stop]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON can carry lone surrogates ("\ud800"), which are not text
                raise APIError(400, "the request holds invalid Unicode (a lone surrogate)", "messages") from None
        ids = encode(engine.tok, prompt)
        room = engine.context - len(ids)
        if not ids or room < 1:
            raise APIError(400, f"This model's maximum context length is {engine.context} tokens; the prompt has "
                           f"{len(ids)}", "messages", "context_length_exceeded")
        wanted = body.max_completion_tokens or body.max_tokens
        if wanted is not None and wanted > engine.context:
            raise APIError(400, f"max_tokens must be at most the context, {engine.context}", "max_tokens")
        s = Sampling(temperature=body.temperature, top_p=body.top_p, max_new_tokens=min(wanted or room, room),
                     stop=stop, seed=body.seed)
        return engine, EngineRequest(ids, s, emit=lambda *_: None)

    async def pieces(engine: Engine, request: EngineRequest) -> AsyncIterator[tuple[str, str | None]]:
        """The engine's (text, finish reason) events, handed over from its thread to this event loop."""
        loop = asyncio.get_running_loop()
        if loop not in handovers:
            handovers[loop] = Handover(loop)
        queue: asyncio.Queue = asyncio.Queue()
        request.emit = lambda piece, finish: handovers[loop].put(queue, (piece, finish))
        try:
            engine.submit(request)
        except EngineBusy as e:
            raise APIError(429, f"server busy: {e}; retry shortly", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        try:
            while True:
                piece, finish = await queue.get()
                yield piece, finish
                if finish:
                    return
        finally:
            request.cancel()  # frees the row when the client went away mid-reply; harmless after the end

    def usage(request: EngineRequest) -> dict:
        n, m = len(request.prompt_ids), request.completion_tokens
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    async def respond(body: Sampled, prompt: str, chat: bool) -> JSONResponse | StreamingResponse:
        engine, request = prepare(body, prompt)
        events = pieces(engine, request)
        first = await anext(events)  # submit now, so a busy server answers 429 before any stream starts
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": None}
        if not body.stream:
            got = [first] + [event async for event in events]
            reply, finish = "".join(text for text, _ in got), got[-1][1]
            if finish == "error":
                raise APIError(500, f"the engine failed: {request.error}", kind="server_error")
            choice = ({"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": None}
                      if chat else {"index": 0, "text": reply, "logprobs": None})
            choice["finish_reason"] = finish_reason(finish)
            return JSONResponse({**head, "choices": [choice], "usage": usage(request)})

        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]}, ensure_ascii=False)}\n\n"

        async def sse() -> AsyncIterator[str]:
            try:
                if chat:
                    yield chunk(None, None, role=True)
                event = first
                if event[0]:
                    yield chunk(event[0], None)
                async for event in events:  # ends after the event that carries the finish reason
                    if event[0]:
                        yield chunk(event[0], None)
                if event[1] == "error":  # mid-stream the status is sent already: an error event, as OpenAI does
                    yield f"data: {json.dumps(error_body(f'the engine failed: {request.error}', 'server_error'))}\n\n"
                else:
                    yield chunk(None, finish_reason(event[1]))
                if include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(request)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                request.cancel()  # the client may have gone: free its row now

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        return await respond(body, render_chat(messages, add_generation_prompt=True), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: send one prompt per request", "prompt")
            prompt = prompt[0]
        return await respond(body, prompt, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "chatforge",
                                             "context": e.context} for name, e in engines.items()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {name: e.stats() for name, e in engines.items()}}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = WEB / name
        if name not in {p.name for p in WEB.iterdir() if p.is_file()}:  # only the page's own files
            raise APIError(404, f"no such file: {name}")
        return FileResponse(path)

    return app


def finish_reason(finish: str | None) -> str:
    """OpenAI knows 'stop' and 'length'; a request cancelled at shutdown reports 'stop' with what it had."""
    return finish if finish in ("stop", "length") else "stop"
