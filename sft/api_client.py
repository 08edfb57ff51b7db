"""A small client for OpenAI-compatible endpoints: concurrency, retries with backoff, a rate limit.

Self-instruct and translation send thousands of requests to a server that will at some point refuse
connections, time out, answer 429/5xx or return a page that is not JSON. Each of those is retried with
exponential backoff (honouring `Retry-After`), counted by reason in `stats`, and only after the last
attempt turned into an `APIError` that names the URL and the cause. Errors a retry cannot fix (401,
404, 400: a bad key, URL or model name) fail at once. HTTP is httpx (connection pooling).

A deadline for the whole attempt. httpx's timeouts bound each connect, read and write, not their sum:
a server that sends a byte a second never trips them and holds the client forever. So the requests
run on one asyncio event loop (a daemon thread the client owns) and each attempt is cancelled as a
whole `timeout` seconds after it started, wherever it is (connecting, sending, reading the head or the
body). Callers stay synchronous: `chat`, `complete` and `map` block their own thread.

The API key. It goes only to --api-base: redirects are not followed, and plain-http requests never go
through a proxy from the environment ($HTTP_PROXY would receive the key in clear text). A key given
with --api-key is sent as told (with a warning when that is plain http to another machine). A key
taken from $OPENAI_API_KEY is sent only over https or to this machine: over plain http, the host must
resolve to loopback addresses only (`zhllama.hosts`; a name such as `evil.localhost` counts only when
it really resolves there), or the command stops with an error rather than sending it in clear text to
wherever --api-base points (pass --api-key explicitly to send it anyway, or --api-key '' to send none).
And whenever a key goes over plain http to a host judged to be this machine, each new connection is
checked once it is made: if the address it reached is not a loopback address (the name resolved
otherwise the second time), the connection is closed before the request, key included, is written.
"""

import asyncio
import json
import os
import random
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import httpx

from zhllama.errors import UserError
from zhllama.argtypes import float_range, int_range
from zhllama.hosts import is_loopback_host
from zhllama.log import get_logger

log = get_logger(__name__)

API_KEY_ENV = "OPENAI_API_KEY"
MAX_RESPONSE = 32 << 20       # an answer larger than this is a bad answer, not something to keep reading
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class APIError(UserError):
    """A request that failed for good (after its retries, or with an error a retry cannot fix)."""

    def __init__(self, message, reason="error", retryable=True):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


class _NotLoopback(Exception):
    """A connection meant for this machine reached another address."""


class _Retry(Exception):
    def __init__(self, reason, detail, wait=None):
        super().__init__(detail)
        self.reason, self.detail, self.wait = reason, detail, wait


@dataclass
class Completion:
    text: str
    finish_reason: str   # "stop", "length", or whatever the server said ("" when absent)


class RateLimiter:
    """At most `per_minute` request starts per minute across threads (evenly spaced); 0 = no limit."""

    def __init__(self, per_minute: float = 0.0, clock=time.monotonic, sleep=time.sleep):
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class _LoopThread:
    """An asyncio event loop running on a daemon thread; `run(coro)` runs a coroutine there and waits
    for its result from any thread (so a request can be cancelled as a whole at its deadline)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="zhllama-api-client", daemon=True)
        self._thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


class APIClient:
    """`chat(messages)` / `complete(prompt)` against `api_base` (e.g. http://127.0.0.1:8000/v1).
    `timeout` is the deadline of one attempt, from connecting to the last byte of the answer."""

    def __init__(self, api_base: str, model: str, api_key: str = None, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
                 requests_per_minute: float = 0.0, concurrency: int = 4, seed: int = 0):
        parsed = urllib.parse.urlparse(api_base or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"--api-base {api_base!r}: expected an http(s) URL such as "
                            f"http://127.0.0.1:8000/v1")
        if not (concurrency >= 1 and max_retries >= 0 and 0 < timeout < float("inf")):   # false for nan
            raise UserError("--concurrency must be >= 1, --max-retries >= 0 and --timeout a number > 0")
        # A key over plain http to this machine: each new connection must really reach a loopback address.
        self._check_peer = bool(api_key) and parsed.scheme == "http" and key_travels_safely(api_base)
        if api_key and not key_travels_safely(api_base):
            log.warning("sending the API key unencrypted to %s (plain http to another machine)", parsed.hostname)
        self.api_base = api_base.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self.limiter = RateLimiter(requests_per_minute)
        self.stats = Counter()          # requests, ok, failed, retries, retry:<reason>
        self._lock = threading.Lock()
        self._jitter = random.Random(seed)
        self._loop = _LoopThread()
        self._http = self._loop.run(self._open_http())

    async def _open_http(self) -> httpx.AsyncClient:
        """Never follows redirects (the key goes to api_base and nowhere else); plain http goes direct,
        never through a proxy named in the environment; https may use $HTTPS_PROXY (a tunnel)."""
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        return httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, limits=limits,
                                 mounts={"http://": httpx.AsyncHTTPTransport(limits=limits)})

    def close(self) -> None:
        self._loop.run(self._http.aclose())
        self._loop.close()

    # -- one request -------------------------------------------------------------------------

    def _count(self, key, n=1):
        with self._lock:
            self.stats[key] += n

    async def _post_once(self, url: str, body: bytes) -> dict:
        """One attempt, cancelled as a whole `timeout` seconds after it started."""
        try:
            return await asyncio.wait_for(self._exchange(url, body), self.timeout)
        except asyncio.TimeoutError:
            raise _Retry("timeout", f"no answer within {self.timeout:g}s (the deadline of one attempt)") from None

    async def _peer_is_loopback(self, event: str, info: dict) -> None:
        """httpcore's trace hook: a new connection must have reached a loopback address."""
        if event == "connection.connect_tcp.complete":
            stream = info["return_value"]
            peer = (stream.get_extra_info("server_addr") or ("",))[0]
            if not is_loopback_host(str(peer), resolve=_no_resolving):
                await stream.aclose()
                raise _NotLoopback(str(peer))

    async def _exchange(self, url: str, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        extensions = {"trace": self._peer_is_loopback} if self._check_peer else None
        try:
            async with self._http.stream("POST", url, content=body, headers=headers, extensions=extensions) as resp:
                raw = await _read_capped(resp)
        except _NotLoopback as e:
            raise APIError(f"{url}: the connection reached {e}, not this machine (the name resolved otherwise "
                           f"than when it was checked): the API key was not sent", reason="not_loopback",
                           retryable=False) from None
        except httpx.TimeoutException as e:
            raise _Retry("timeout", f"no answer within {self.timeout:g}s ({type(e).__name__})")
        except httpx.ConnectError as e:
            raise _Retry("connection", f"cannot connect: {e}")
        except (httpx.TransportError, OSError) as e:    # reset mid-response, broken pipe, ...
            raise _Retry("connection", f"connection failed: {type(e).__name__}: {e}")
        if raw is None:
            raise _Retry("bad_response", f"the answer is over {MAX_RESPONSE} bytes")
        if resp.is_redirect:
            raise APIError(f"{url}: HTTP {resp.status_code} redirect to {resp.headers.get('Location')!r}, not "
                           f"followed (the API key goes only to --api-base): use the final URL",
                           reason=f"http_{resp.status_code}", retryable=False)
        if resp.status_code >= 400:
            detail = _excerpt(raw)
            if resp.status_code in RETRY_STATUS:
                raise _Retry(f"http_{resp.status_code}", f"HTTP {resp.status_code} {detail}",
                             _retry_after(resp.headers))
            raise APIError(f"{url}: HTTP {resp.status_code} {detail} (not retried: check the URL, the model "
                           f"name and the API key)", reason=f"http_{resp.status_code}", retryable=False)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):            # not JSON, not UTF-8, or nested too deep
            raise _Retry("bad_json", f"the answer is not JSON: {_excerpt(raw)}")
        if not isinstance(data, dict):
            raise _Retry("bad_json", f"the answer is not a JSON object: {_excerpt(raw)}")
        return data

    def post(self, path: str, payload: dict, extract) -> Completion:
        """POST with retries; `extract(data)` returns a Completion or raises ValueError (retried)."""
        url = f"{self.api_base}/{path.lstrip('/')}"
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                self._count(f"retry:{last.reason}")
                time.sleep(self._delay(attempt, last.wait))
            self.limiter.wait()
            self._count("requests")
            try:
                data = self._loop.run(self._post_once(url, body))
                try:
                    result = extract(data)
                except (KeyError, IndexError, TypeError, ValueError, RecursionError) as e:
                    err = data.get("error") if isinstance(data, dict) else None
                    raise _Retry("bad_response", f"unexpected answer ({_excerpt(err or e)}): {_excerpt(data)}")
            except _Retry as r:
                last = r
                log.debug("%s: attempt %d failed: %s", url, attempt + 1, r.detail)
                continue
            except APIError:
                self._count("failed")
                raise
            self._count("ok")
            return result
        self._count("failed")
        raise APIError(f"{url}: {last.detail} (gave up after {self.max_retries + 1} attempts)",
                       reason=last.reason)

    def _delay(self, attempt: int, retry_after=None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        with self._lock:
            jitter = 0.5 + self._jitter.random()
        return min(self.backoff * (2 ** (attempt - 1)) * jitter, self.max_backoff)

    # -- the two OpenAI endpoints ------------------------------------------------------------

    def chat(self, messages, **params) -> Completion:
        payload = {"model": self.model, "messages": messages, **_drop_none(params)}
        return self.post("chat/completions", payload, _extract_chat)

    def complete(self, prompt: str, **params) -> Completion:
        payload = {"model": self.model, "prompt": prompt, **_drop_none(params)}
        return self.post("completions", payload, _extract_completion)

    def generate(self, prompt: str, api: str = "chat", **params) -> Completion:
        """The prompt as one user message (`api="chat"`) or as a raw completion prompt."""
        if api == "chat":
            return self.chat([{"role": "user", "content": prompt}], **params)
        return self.complete(prompt, **params)

    def map(self, fn, items):
        """`fn(item)` for each item on `concurrency` threads; results (or the APIError) in order."""
        def guarded(item):
            try:
                return fn(item)
            except APIError as e:
                return e
        if self.concurrency == 1 or len(items) <= 1:
            return [guarded(it) for it in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(guarded, items))

    def stats_line(self) -> str:
        s = self.stats
        reasons = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(s.items()) if k.startswith("retry:"))
        return (f"requests {s['requests']} (ok {s['ok']}, failed {s['failed']}, retries {s['retries']}"
                + (f": {reasons}" if reasons else "") + ")")


def _extract_chat(data) -> Completion:
    choice = data["choices"][0]
    text = choice["message"]["content"]
    if not isinstance(text, str):
        raise ValueError("message.content is not a string")
    return Completion(text, choice.get("finish_reason") or "")


def _extract_completion(data) -> Completion:
    choice = data["choices"][0]
    text = choice["text"]
    if not isinstance(text, str):
        raise ValueError("text is not a string")
    return Completion(text, choice.get("finish_reason") or "")


def _drop_none(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


def _retry_after(headers):
    try:
        value = float(headers.get("Retry-After")) if headers is not None else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and value >= 0 else None


def _no_resolving(host, *args):
    raise OSError(f"{host}: not an address")          # a peer address is a literal; never look it up


async def _read_capped(resp) -> Optional[bytes]:
    """The body, or None when it is over MAX_RESPONSE bytes (stops reading there)."""
    parts, size = [], 0
    async for part in resp.aiter_bytes():
        size += len(part)
        if size > MAX_RESPONSE:
            return None
        parts.append(part)
    return b"".join(parts)


def _excerpt(raw, limit: int = 160) -> str:
    if isinstance(raw, bytes):
        text = raw[:4 * limit].decode("utf-8", "replace")
    elif isinstance(raw, (dict, list)):
        try:
            text = json.dumps(raw, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = f"<a {type(raw).__name__} nested too deep>"
    else:
        text = str(raw)
    text = " ".join(text.split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def add_client_arguments(parser) -> None:
    """The endpoint and client options shared by `zhllama selfinstruct` and `zhllama translate`."""
    parser.add_argument("--api-base", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="model name sent to the endpoint")
    parser.add_argument("--api", choices=["chat", "completions"], default="chat",
                        help="/v1/chat/completions (default) or /v1/completions")
    parser.add_argument("--api-key", default=None,
                        help=f"bearer token, sent as given (default: ${API_KEY_ENV}, which is sent only over "
                             f"https or to a loopback address; '' sends none)")
    parser.add_argument("--concurrency", type=int_range(1, 256), default=4, help="requests in flight at once (4)")
    parser.add_argument("--rate-limit", type=float_range(0, 1e6), default=0.0,
                        help="max requests per minute (0 = none)")
    parser.add_argument("--max-retries", type=int_range(0, 100), default=5, help="retries per request (5)")
    parser.add_argument("--timeout", type=float_range(0, 86400, above_low=True), default=120.0,
                        help="seconds one attempt may take in all, from connecting to the answer's last byte (120)")
    parser.add_argument("--backoff", type=float_range(0, 3600), default=1.0,
                        help="first retry delay in seconds, doubled each retry")


def key_travels_safely(api_base: str) -> bool:
    """https, or plain http to a host that resolves to loopback addresses only: nobody on the way reads
    the key."""
    parsed = urllib.parse.urlparse(api_base)
    return parsed.scheme == "https" or is_loopback_host(parsed.hostname or "")


def resolve_api_key(api_base: str, cli_key: Optional[str], env=None) -> Optional[str]:
    """The key to send to `api_base`: --api-key as given (an explicit choice; '' = none), else
    $OPENAI_API_KEY when it travels safely (`key_travels_safely`: the name is resolved). An environment
    key for plain http to another host is refused with a UserError (exit 2) rather than sent: the
    variable is usually set for a real provider, and `--api-base` may point anywhere."""
    if cli_key is not None:
        return cli_key or None
    key = (os.environ if env is None else env).get(API_KEY_ENV) or None
    parsed = urllib.parse.urlparse(api_base or "")
    if key and parsed.scheme == "http" and not key_travels_safely(api_base):
        host = parsed.hostname
        raise UserError(f"refusing to send ${API_KEY_ENV} in clear text to {api_base} (plain http to {host}, "
                        f"which does not resolve to this machine's loopback addresses only): use an https "
                        f"URL, pass the key explicitly with --api-key, or --api-key '' to send none")
    return key


def client_from_args(args, seed: int = 0) -> "APIClient":
    """An APIClient from the options `add_client_arguments` defines."""
    return APIClient(args.api_base, args.model, api_key=resolve_api_key(args.api_base, args.api_key),
                     timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff,
                     requests_per_minute=args.rate_limit, concurrency=args.concurrency, seed=seed)
