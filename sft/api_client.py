"""A small client for OpenAI-compatible endpoints: concurrency, retries with backoff, a rate limit.

Self-instruct and translation send thousands of requests to a server that will at some point refuse
connections, time out, answer 429/5xx or return a page that is not JSON. Each of those is retried with
exponential backoff (honouring `Retry-After`), counted by reason in `stats`, and only after the last
attempt turned into an `APIError` that names the URL and the cause. Errors a retry cannot fix (401,
404, 400: a bad key, URL or model name) fail at once. Standard library only (`urllib.request`).
"""

import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from zhllama.errors import UserError
from zhllama.log import get_logger

log = get_logger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class APIError(UserError):
    """A request that failed for good (after its retries, or with an error a retry cannot fix)."""

    def __init__(self, message, reason="error", retryable=True):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


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


class APIClient:
    """`chat(messages)` / `complete(prompt)` against `api_base` (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(self, api_base: str, model: str, api_key: str = None, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
                 requests_per_minute: float = 0.0, concurrency: int = 4, seed: int = 0):
        parsed = urllib.parse.urlparse(api_base or "")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"--api-base {api_base!r}: expected an http(s) URL such as "
                            f"http://127.0.0.1:8000/v1")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise UserError("--concurrency must be >= 1, --max-retries >= 0 and --timeout > 0")
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

    # -- one request -------------------------------------------------------------------------

    def _count(self, key, n=1):
        with self._lock:
            self.stats[key] += n

    def _post_once(self, url: str, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = _excerpt(e.read() if e.fp else b"")
            if e.code in RETRY_STATUS:
                raise _Retry(f"http_{e.code}", f"HTTP {e.code} {detail}", _retry_after(e.headers))
            raise APIError(f"{url}: HTTP {e.code} {detail} (not retried: check the URL, the model "
                           f"name and the API key)", reason=f"http_{e.code}", retryable=False)
        except (socket.timeout, TimeoutError) as e:
            raise _Retry("timeout", f"no answer within {self.timeout:g}s ({e})")
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise _Retry("timeout", f"no answer within {self.timeout:g}s")
            raise _Retry("connection", f"cannot connect: {e.reason}")
        except (ConnectionError, OSError) as e:      # reset mid-response, broken pipe, ...
            raise _Retry("connection", f"connection failed: {e}")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
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
                data = self._post_once(url, body)
                try:
                    result = extract(data)
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    err = data.get("error") if isinstance(data, dict) else None
                    raise _Retry("bad_response", f"unexpected answer ({err or e}): "
                                                 f"{_excerpt(json.dumps(data, ensure_ascii=False))}")
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


def _excerpt(raw, limit: int = 160) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(text.split())
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def add_client_arguments(parser) -> None:
    """The endpoint and client options shared by `zhllama selfinstruct` and `zhllama translate`."""
    parser.add_argument("--api-base", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="model name sent to the endpoint")
    parser.add_argument("--api", choices=["chat", "completions"], default="chat",
                        help="/v1/chat/completions (default) or /v1/completions")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default: $OPENAI_API_KEY; none for a local server)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (4)")
    parser.add_argument("--rate-limit", type=float, default=0.0, help="max requests per minute (0 = none)")
    parser.add_argument("--max-retries", type=int, default=5, help="retries per request (5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (120)")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")


def client_from_args(args, seed: int = 0) -> "APIClient":
    """An APIClient from the options `add_client_arguments` defines."""
    return APIClient(args.api_base, args.model, api_key=args.api_key, timeout=args.timeout,
                     max_retries=args.max_retries, backoff=args.backoff, requests_per_minute=args.rate_limit,
                     concurrency=args.concurrency, seed=seed)
