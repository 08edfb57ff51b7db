"""Serve a merged checkpoint over an OpenAI-compatible HTTP API.

Endpoints: GET /health (no key needed), GET /v1/models, POST /v1/chat/completions (messages rendered
with the SFT template, so the model sees exactly the prompt format it was trained on), POST
/v1/completions (raw text prompt), both with "stream": true (server-sent events in OpenAI's chunk
format). The official `openai` Python package works against it, and so does `zhllama selfinstruct`.

Built on uvicorn + Starlette, with pydantic models for request bodies. What a server open to a
network needs: `--api-key` (or $ZHLLAMA_API_KEY) for Bearer auth on every endpoint but /health; a
Content-Length checked before a byte of the body is read (missing: 411, too large: 413); deadlines
for a request's head and body, so idle or trickling connections are closed; every request field
range-checked (400 naming it); prompts, rendered with the template, longer than the context could
ever hold refused before they are tokenized, and a context length required (the model's positions,
or --max-context). The model is not thread-safe: one worker thread generates, at most --queue-size
requests wait for it, and further ones get 429.

This is for evaluating and using your own model on one machine, not for high-throughput serving.

example:
  zhllama serve --model merged/ --template chinese-alpaca --port 8000 --api-key "$(openssl rand -hex 16)"
  curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{"model": "merged", "messages": [{"role": "user", "content": "你好"}]}'
"""

import asyncio
import hmac
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, List, Literal, Optional, Union

import pydantic_core
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from zhllama.argtypes import float_range, int_range, port_number
from zhllama.errors import UserError
from zhllama.hosts import is_loopback_host
from zhllama.log import get_logger
from zhllama.modelio import read_model_config
from zhllama.pretrain.rope import context_length

from .inference import MAX_CONTEXT, InferenceModel, RequestError, load_inference_model, usable_context

log = get_logger(__name__)

MAX_BODY = 8 << 20
MAX_CONNECTIONS = 1000    # uvicorn's limit_concurrency: connections served at once (more get 503)
API_KEY_ENV = "ZHLLAMA_API_KEY"
PUBLIC_PATHS = ("/health", "/v1/health")


# -- request bodies -----------------------------------------------------------------------------
# What one request may ask for. Each is checked by pydantic when the body is read, so a value out of
# range is a 400 naming the field before any work is done (never a 500 from deep in generation). The
# body is parsed into Python objects first and then validated (`Service._parse`): so pydantic checks a
# list's length before its items, and 230,000 messages are refused by their count in 0.2 s and 40 MB
# (validated straight from JSON, all 230,000 were built first: 2 s and 180 MB).

MAX_MESSAGES = 512        # chat messages per request
MAX_PARTS = 256           # text parts of one message's content
MAX_STOPS = 16            # stop strings (OpenAI takes 4)
MAX_STOP_CHARS = 256      # characters of one stop string
# Below this a sampling temperature divides the logits into overflow (1e-300 gave inf/nan and a 500);
# 0 asks for greedy decoding, which is what a temperature near 0 means.
MIN_TEMPERATURE = 1e-5
INT64 = dict(ge=-(1 << 63), le=(1 << 63) - 1)


def _finite(low, high, **kw):
    """A JSON number in low..high: never a boolean, a string, NaN or infinity."""
    return Field(None, ge=low, le=high, strict=True, allow_inf_nan=False, **kw)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")   # OpenAI fields we do not use (user, logprobs...)

    model: Optional[str] = None
    stream: bool = Field(False, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True)
    best_of: Optional[int] = Field(None, ge=1, le=1, strict=True)
    max_tokens: Optional[int] = Field(None, ge=1, strict=True)
    max_completion_tokens: Optional[int] = Field(None, ge=1, strict=True)
    temperature: Optional[float] = _finite(0.0, 2.0)
    top_p: Optional[float] = _finite(0.0, 1.0)
    stop: Optional[Union[str, Annotated[List[str], Field(max_length=MAX_STOPS)]]] = None
    seed: Optional[int] = Field(None, strict=True, **INT64)
    # Accepted in OpenAI's ranges and not applied (the model samples without them).
    presence_penalty: Optional[float] = _finite(-2.0, 2.0)
    frequency_penalty: Optional[float] = _finite(-2.0, 2.0)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampling(cls, value):
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("stop")
    @classmethod
    def _short_stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string of {longest} characters; at most {MAX_STOP_CHARS}")
        return value

    def params(self) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return dict(max_tokens=self.max_tokens if self.max_tokens is not None else self.max_completion_tokens,
                    temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p, stop=stop, seed=self.seed)


class _Part(BaseModel):
    type: str
    text: Optional[str] = None


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, Annotated[List[_Part], Field(max_length=MAX_PARTS)]]

    def text(self) -> str:
        """A string, or the text parts of a list content ([{"type": "text", "text": ...}, ...])."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class ChatRequest(_Sampling):
    messages: List[_Message] = Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(_Sampling):
    # a string, or a list of one string (a longer list is refused by its length, not item by item)
    prompt: Union[str, Annotated[List[str], Field(min_length=1, max_length=1)]]

    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


# -- the one generation thread ------------------------------------------------------------------

class QueueFull(Exception):
    pass


class GenerationQueue:
    """Runs jobs one at a time on one worker thread (the model is not thread-safe); at most `size`
    jobs wait behind the running one, and `submit` refuses more at once (QueueFull) rather than
    letting a burst of requests pile up without bound."""

    def __init__(self, size: int):
        self.size = size
        self.pending = 0                # the running job and those waiting
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhllama-generate")

    def submit(self, fn):
        with self._lock:
            if self.pending > self.size:
                raise QueueFull()
            self.pending += 1
        try:
            return self._pool.submit(self._run, fn)
        except BaseException:
            self._done()
            raise

    def _run(self, fn):
        try:
            return fn()
        finally:
            self._done()

    def _done(self):
        with self._lock:
            self.pending -= 1

    def shutdown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- answers ------------------------------------------------------------------------------------

def _error(status, message, param=None, code=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _request_error(e: RequestError) -> JSONResponse:
    return _error(e.status, str(e), e.param, e.code)


def _is_union_branch(part) -> bool:
    """pydantic names the branch of a Union field in an error's location ('str', 'list[_Part]')."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _validation_message(e: ValidationError):
    """The first error, as "'field.path': what is wrong", and the top-level field it is about. Of a
    Union field's errors (one per branch), the first that is about the value, not its type, is told."""
    errors = e.errors(include_url=False, include_input=False)
    about_value = [x for x in errors if not (any(map(_is_union_branch, x["loc"])) and x["type"].endswith("_type"))]
    err = (about_value or errors)[0]
    loc = tuple(p for p in err.get("loc") or () if not _is_union_branch(p))
    if err["type"] == "model_type" and not loc:
        return "the request body must be a JSON object", None
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    return f"'{where}': {err['msg']}", (str(loc[0]) if loc else None)


class _ClientGone(Exception):
    pass


class Service:
    """The HTTP endpoints over one InferenceModel."""

    def __init__(self, model: InferenceModel, queue_size: int = 16, body_timeout: float = 30.0):
        # Without a context length nothing would bound a prompt's tokens: refuse to serve at all.
        usable_context(model.max_positions, "the model's context (max_position_embeddings)")
        self.model = model
        self.queue = GenerationQueue(queue_size)
        self.body_timeout = body_timeout
        self.started = int(time.time())

    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.model.name})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model.name, "object": "model", "created": self.started, "owned_by": "zhllama"}]})

    async def chat_completions(self, request):
        req = await self._parse(request, ChatRequest)
        if isinstance(req, JSONResponse):
            return req
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:           # refused here, before it waits in the queue, when it cannot fit in any case
            self.model.check_chat_prompt(messages)
        except RequestError as e:
            return _request_error(e)
        return await self._answer("chat", lambda: self.model.chat_prompt_ids(messages), req)

    async def completions(self, request):
        req = await self._parse(request, CompletionRequest)
        if isinstance(req, JSONResponse):
            return req
        prompt = req.text()
        try:
            self.model.check_prompt_chars(len(prompt) + 1, "prompt")      # + BOS
        except RequestError as e:
            return _request_error(e)
        return await self._answer("text", lambda: self.model.text_prompt_ids(prompt), req)

    async def _parse(self, request: Request, schema):
        try:
            raw = await asyncio.wait_for(request.body(), self.body_timeout)
        except asyncio.TimeoutError:
            return _error(408, f"the request body did not arrive within {self.body_timeout:g}s",
                          headers={"Connection": "close"})
        try:     # parsed first, then validated: list lengths are checked before their items (above)
            data = pydantic_core.from_json(raw or b"null", allow_inf_nan=True)   # NaN: refused by its field
        except ValueError as e:                   # not JSON, not UTF-8, nested too deep
            return _error(400, f"the request body is not JSON: {e}")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            return _error(400, message, param)
        if req.model is not None and req.model != self.model.name:
            return _error(404, f"model '{req.model}' not found; this server serves '{self.model.name}'",
                          param="model", code="model_not_found")
        return req

    def _envelope(self, kind, stream=False):
        prefix, obj = ("chatcmpl", "chat.completion") if kind == "chat" else ("cmpl", "text_completion")
        if stream and kind == "chat":
            obj += ".chunk"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()),
                "model": self.model.name}

    async def _answer(self, kind, prepare, req):
        """Tokenize and generate on the worker thread (tokenizing is bounded by the same queue)."""
        params, chat = req.params(), kind == "chat"
        try:
            if not req.stream:
                def job():
                    return self.model.generate(prepare(), template_stop=chat, **params)
                text, finish, n_in, n_out = await asyncio.wrap_future(self.queue.submit(job))
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                          if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
                return JSONResponse(dict(self._envelope(kind), choices=[choice], usage={
                    "prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}))
            return await self._stream(kind, prepare, params)
        except QueueFull:
            return _error(429, f"the server is busy: {self.queue.size} requests are already waiting; retry "
                               f"shortly", code="queue_full", headers={"Retry-After": "1"})
        except RequestError as e:
            return _request_error(e)
        except Exception as e:  # a bug or a model failure: answer 500, keep serving
            log.exception("request failed")
            return _error(500, f"generation failed: {type(e).__name__}: {e}")

    async def _stream(self, kind, prepare, params):
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        gone = threading.Event()

        def emit(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:                  # the event loop is gone (server shutting down)
                pass

        def on_text(piece):
            if gone.is_set():
                raise _ClientGone()
            emit(("text", piece))

        def job():
            try:
                _, finish, _, _ = self.model.generate(prepare(), on_text=on_text, template_stop=kind == "chat",
                                                      **params)
                emit(("done", finish))
            except _ClientGone:
                pass
            except BaseException as e:
                emit(("error", e))

        self.queue.submit(job)
        first = await events.get()
        if first[0] == "error":        # nothing sent yet: an ordinary error answer
            raise first[1]
        env = self._envelope(kind, stream=True)

        def chunk(delta_text=None, finish=None, role=False):
            if kind == "chat":
                delta = {"role": "assistant"} if role else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps(dict(env, choices=[choice]), ensure_ascii=False) + "\n\n"

        async def sse():
            try:
                if kind == "chat":
                    yield chunk(role=True)
                tag, value = first
                while True:
                    if tag == "text":
                        yield chunk(value)
                    elif tag == "done":
                        yield chunk(finish=value)
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        log.error("generation failed mid-stream: %s: %s", type(value).__name__, value)
                        yield "data: " + json.dumps({"error": {"message": str(value), "type": "server_error"}}) + "\n\n"
                        return
                    tag, value = await events.get()
            finally:
                gone.set()                  # the client went away, or we are done: stop generating

        return StreamingResponse(sse(), media_type="text/event-stream; charset=utf-8",
                                 headers={"Cache-Control": "no-cache"})


# -- what is checked before the body is read ----------------------------------------------------

class RequestGate:
    """ASGI middleware: Bearer auth (when a key is set) on every path but /health, and a
    Content-Length that must be present and at most `max_body` on requests with a body. Both are
    decided from the headers, before a byte of the body is read; the connection is then closed, so
    an unread body is never taken in. (A negative or malformed Content-Length never gets here: the
    HTTP parser answers 400.)"""

    def __init__(self, app, api_key: Optional[str], max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.lower(), v.decode("latin-1"))
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            refusal.headers["Connection"] = "close"
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refusal(self, scope, headers):
        if self.api_key and scope["path"].rstrip("/") not in PUBLIC_PATHS:
            auth = headers.get(b"authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            if b"transfer-encoding" in headers:
                return _error(411, "chunked request bodies are not accepted: send a Content-Length")
            length = headers.get(b"content-length")
            if length is None:
                return _error(411, "a request body needs a Content-Length header")
            if not length.strip().isdigit():
                return _error(400, f"bad Content-Length {length!r}")
            if int(length) > self.max_body:
                return _error(413, f"request body of {int(length)} bytes; the limit is {self.max_body}")
        return None


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for each request's head.

    uvicorn closes a keep-alive connection that stays idle after a response, but not a new connection
    that never sends a complete request line and headers, nor one that sends a byte and stalls: each
    would be held open forever. Here such a connection is closed `head_timeout` seconds after it was
    opened (or after its last response) unless a new request has begun by then."""

    head_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc):
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self):
        self._cancel_head_deadline()
        if not self.transport.is_closing():
            waiting_after = self.cycle
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_overdue, waiting_after)

    def _cancel_head_deadline(self):
        timer = getattr(self, "_head_deadline", None)
        if timer is not None:
            timer.cancel()
            self._head_deadline = None

    def _head_overdue(self, waiting_after):
        if self.cycle is waiting_after and not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request within %gs", self.head_timeout)
            self.transport.close()


# -- the application and its server -------------------------------------------------------------

def make_app(model: InferenceModel, api_key: Optional[str] = None, queue_size: int = 16,
             body_timeout: float = 30.0, max_body: int = MAX_BODY) -> Starlette:
    """The ASGI application (any ASGI server can run it; `make_server` uses uvicorn)."""
    service = Service(model, queue_size=queue_size, body_timeout=body_timeout)

    async def http_error(request, exc: HTTPException):
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return _error(405, f"{request.url.path} takes {allowed}", headers=exc.headers)
        if exc.status_code == 404:
            return _error(404, f"no route {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    routes = [
        Route("/health", service.health, methods=["GET"]),
        Route("/v1/health", service.health, methods=["GET"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/models", service.models, methods=["GET"]),
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(RequestGate, api_key=api_key or None, max_body=max_body)
    app.state.service = service
    return app


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Made with proto=IPPROTO_TCP (not socket.create_server's 0) so asyncio
    sets TCP_NODELAY on accepted connections: without it, a response's head and body go out in two
    segments held apart by Nagle's algorithm and the client's delayed ACK, 40 ms per request."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class Server:
    """A uvicorn server for `make_app`'s app on a socket bound here (so port 0 picks a free port
    and `url` knows it). `run()` blocks; `start()`/`stop()` run it on a background thread (tests)."""

    def __init__(self, model: InferenceModel, host: str = "127.0.0.1", port: int = 8000,
                 api_key: Optional[str] = None, queue_size: int = 16, head_timeout: float = 10.0,
                 body_timeout: float = 30.0, keep_alive: float = 5.0, max_connections: int = MAX_CONNECTIONS,
                 max_body: int = MAX_BODY):
        self.model = model
        self.app = make_app(model, api_key, queue_size, body_timeout, max_body)
        self.sock = _listen(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        protocol = type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout": head_timeout})
        config = uvicorn.Config(self.app, http=protocol, ws="none", lifespan="off", log_config=None,
                                access_log=False, timeout_keep_alive=keep_alive,
                                limit_concurrency=max_connections, timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self._thread = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def run(self):
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.app.state.service.queue.shutdown()
            self.sock.close()

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread = threading.Thread(target=self.run, name="zhllama-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self):
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)


# -- the command --------------------------------------------------------------------------------

MAX_TIMEOUT = 3600.0      # --timeout: an hour to send one request is already no deadline


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="merged HF checkpoint directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--template", default="alpaca",
                        help="prompt template for chat requests: a built-in name (alpaca, chinese-alpaca, "
                             "llama2-chat) or a .yaml/.json template file (default alpaca)")
    parser.add_argument("--name", help="model id clients send and /v1/models lists (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 "
                        "exposes the model to the network: set --api-key)")
    parser.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
                             f"(default: ${API_KEY_ENV}; none: no auth)")
    parser.add_argument("--queue-size", type=int_range(0, MAX_CONNECTIONS), default=16,
                        help=f"requests that may wait for the one generation thread; more get 429 "
                             f"(16; 0..{MAX_CONNECTIONS})")
    parser.add_argument("--timeout", type=float_range(0, MAX_TIMEOUT, above_low=True), default=30.0,
                        help=f"seconds a client has to send a request's head, and then its body (30; at most "
                             f"{MAX_TIMEOUT:g})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    parser.add_argument("--max-new-tokens", type=int_range(1, MAX_CONTEXT), default=512,
                        help="cap on max_tokens per request (512)")
    parser.add_argument("--max-context", type=int_range(1, MAX_CONTEXT), default=None,
                        help="tokens a request may use, prompt and completion together (default: the model's "
                             "max_position_embeddings, x a linear/dynamic rope_scaling factor; needed when "
                             "config.json has no usable one)")


def serving_context(model_dir, max_context=None) -> int:
    """The tokens a request may use: --max-context, else the model's context (max_position_embeddings,
    x the factor of linear or dynamic RoPE scaling: pretrain/rope.context_length). A config without a
    usable one (missing, 0, absurd) is refused unless --max-context is given; --max-context may lower the
    model's context, not raise it."""
    config = read_model_config(model_dir, context_given=True)    # the key is checked here, with the way out
    raw = config.get("max_position_embeddings")
    positions = context_length(config) if isinstance(raw, int) and not isinstance(raw, bool) else raw   # named as given
    key = f"{Path(model_dir) / 'config.json'}: max_position_embeddings" + (
        " x rope_scaling factor" if positions != config.get("max_position_embeddings") else "")
    if max_context is None:
        return usable_context(positions, key)
    if isinstance(positions, int) and not isinstance(positions, bool) and 0 < positions < max_context:
        raise UserError(f"--max-context {max_context} is more than {key} {positions}")
    return max_context


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """What to warn about when the server is reachable from other machines without a key."""
    if api_key or is_loopback_host(host):
        return None
    return (f"serving on {host} without an API key: anyone who can reach this address can use the model; "
            f"set --api-key or ${API_KEY_ENV}")


def run(args):
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: not a directory")
    if args.name is not None and not args.name.strip():
        raise UserError("--name: empty; give the model id clients send, or leave it out")
    context = serving_context(args.model, args.max_context)      # before the weights are loaded
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    model = load_inference_model(args.model, args.tokenizer, args.template, args.name, args.device, args.dtype,
                                 args.max_new_tokens, max_context=context)
    try:
        server = Server(model, args.host, args.port, api_key=api_key, queue_size=args.queue_size,
                        head_timeout=args.timeout, body_timeout=args.timeout)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    warning = exposure_warning(server.host, api_key)             # the address actually bound
    if warning:
        log.warning("%s", warning)
    # One line on stdout that scripts can wait for (the socket already listens: connections queue).
    print(f"serving '{model.name}' on {server.url} (template {model.template.name}, "
          f"{'API key required' if api_key else 'no API key'})", flush=True)
    server.run()
    return 0
