"""Serve a merged checkpoint over an OpenAI-compatible HTTP API.

Endpoints: GET /v1/models, POST /v1/chat/completions (messages rendered with the SFT template, so the
model sees exactly the prompt format it was trained on), POST /v1/completions (raw text prompt), both
with "stream": true (server-sent events in OpenAI's chunk format). Any OpenAI client works against it,
and so does `zhllama selfinstruct`.

One generation runs at a time (requests queue); the server is for evaluating and using your own model
on one machine, not for high-throughput batch serving.

example:
  zhllama serve --model merged/ --template chinese-alpaca --port 8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "merged", "messages": [{"role": "user", "content": "你好"}]}'
"""

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from zhllama.argtypes import port_number
from zhllama.errors import UserError
from zhllama.log import get_logger

log = get_logger(__name__)

MAX_BODY = 8 << 20


class RequestError(Exception):
    """A bad request: answered with `status` and an OpenAI-style error object."""

    def __init__(self, message, status=400, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class Engine:
    """A model, its tokenizer and template; `generate` runs one request (serialised by a lock)."""

    def __init__(self, model, tokenizer, template, name: str, max_new_tokens: int = 512):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.lock = threading.Lock()
        self.requests = 0

    # -- prompts -----------------------------------------------------------------------------

    def chat_prompt_ids(self, messages) -> list:
        from zhllama.sft.examples import encode_chat_prompt

        system = "\n".join(m["content"] for m in messages if m["role"] == "system") or None
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        try:
            return encode_chat_prompt(self.tokenizer, self.template, turns, system=system)
        except ValueError as e:
            raise RequestError(f"messages: {e}", param="messages")

    def text_prompt_ids(self, prompt: str) -> list:
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + ids

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt_ids, max_tokens, temperature, top_p, stop, seed=None, on_text=None,
                 template_stop=True):
        """Generate a continuation. `on_text(piece)` receives text as it is produced (streaming).

        Stop strings (the request's, and with `template_stop` the template's: a chat model's next
        "### Instruction:") end the text before the string; text that
        could be the start of a stop string is held back until it is known not to be one.
        Returns (text, finish_reason, prompt_tokens, completion_tokens)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        n_prompt = len(prompt_ids)
        budget = max_tokens if max_tokens is not None else self.max_new_tokens
        budget = min(budget, self.max_new_tokens)
        if self.max_positions:
            if n_prompt >= self.max_positions:
                raise RequestError(f"the prompt is {n_prompt} tokens; this model takes at most "
                                   f"{self.max_positions}", code="context_length_exceeded")
            budget = min(budget, self.max_positions - n_prompt)
        stops = [s for s in list(stop or []) + (list(self.template.stop) if template_stop else []) if s]
        cancel = threading.Event()

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        eos = self.tokenizer.eos_token_id
        kwargs = dict(max_new_tokens=budget, streamer=streamer, eos_token_id=eos,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
                      stopping_criteria=StoppingCriteriaList([_Cancel()]))
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        result = {}

        def work():
            try:
                with torch.no_grad():
                    ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)
                    result["out"] = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            except BaseException as e:          # reported to the client, never a hung stream
                result["error"] = e
            finally:
                streamer.end()

        with self.lock:
            self.requests += 1
            if seed is not None:
                torch.manual_seed(int(seed))
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text, emitted, hit = "", 0, False
            hold = max((len(s) for s in stops), default=1) - 1
            try:
                for piece in streamer:
                    text += piece
                    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text, hit = text[:cut], True
                        cancel.set()
                        break
                    safe = len(text) - hold
                    if on_text is not None and safe > emitted:
                        on_text(text[emitted:safe])
                        emitted = safe
                if on_text is not None and len(text) > emitted:
                    on_text(text[emitted:])
            finally:
                cancel.set()                     # the client went away, or a stop string was hit
                thread.join()
        if "error" in result:
            raise result["error"]
        n_out = result["out"].shape[1] - n_prompt
        ended_by_eos = n_out > 0 and int(result["out"][0, -1]) == eos
        finish = "stop" if hit or ended_by_eos or n_out < budget else "length"
        return text, finish, n_prompt, n_out


# -- request validation -------------------------------------------------------------------------

def _content_text(content, i):
    if isinstance(content, str):
        return content
    if isinstance(content, list):          # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string", param="messages")


def _messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant", param="messages")
        out.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    return out


def _number(body, key, default, lo, hi, cast=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be a number in [{lo}, {hi}]", param=key)
    return cast(value)


def _sampling(body):
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError("'max_tokens' must be a positive integer", param="max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", param="seed")
    return dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=stop, seed=seed)


# -- HTTP ---------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server_version = "zhllama-serve"

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def _json(self, status, obj):
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, err: RequestError):
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        self._json(err.status, {"error": {"message": str(err), "type": kind, "param": err.param,
                                          "code": err.code}})

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [
                {"id": self.engine.name, "object": "model", "created": self.server.started, "owned_by": "zhllama"}]})
        elif path in ("/health", "/v1/health"):
            self._json(200, {"status": "ok", "model": self.engine.name})
        elif path in ("/v1/chat/completions", "/v1/completions"):
            self._error(RequestError(f"{path} takes POST", status=405))
        else:
            self._error(RequestError(f"no route {path}", status=404))

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise RequestError(f"no route {path}", status=404)
            body = self._body()
            model = body.get("model")
            if model is not None and model != self.engine.name:
                raise RequestError(f"model '{model}' not found; this server serves '{self.engine.name}'",
                                   status=404, param="model", code="model_not_found")
            params = _sampling(body)
            if path == "/v1/chat/completions":
                ids, kind = self.engine.chat_prompt_ids(_messages(body)), "chat"
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise RequestError("'prompt' must be a string", param="prompt")
                ids, kind = self.engine.text_prompt_ids(prompt), "text"
            if body.get("stream"):
                self._stream(kind, ids, params)
            else:
                self._complete(kind, ids, params)
        except RequestError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away")
        except Exception as e:  # a bug or a model failure: answer 500, keep serving
            log.exception("request failed")
            try:
                self._error(RequestError(f"generation failed: {type(e).__name__}: {e}", status=500))
            except OSError:
                pass

    def _body(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError("bad Content-Length")
        if length > MAX_BODY:
            raise RequestError(f"request body over {MAX_BODY} bytes", status=413)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not JSON: {e}")
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _envelope(self, kind, stream=False):
        prefix, obj = ("chatcmpl", "chat.completion") if kind == "chat" else ("cmpl", "text_completion")
        if stream and kind == "chat":
            obj += ".chunk"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()),
                "model": self.engine.name}

    def _complete(self, kind, ids, params):
        text, finish, n_in, n_out = self.engine.generate(ids, template_stop=kind == "chat", **params)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if kind == "chat" else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        self._json(200, dict(self._envelope(kind), choices=[choice], usage={
            "prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}))

    def _stream(self, kind, ids, params):
        env = self._envelope(kind, stream=True)

        def chunk(delta_text=None, finish=None, role=False):
            if kind == "chat":
                delta = {"role": "assistant"} if role else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            self.wfile.write(b"data: " + json.dumps(dict(env, choices=[choice]), ensure_ascii=False).encode()
                             + b"\n\n")
            self.wfile.flush()

        started = [False]

        def start():
            if not started[0]:
                started[0] = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                if kind == "chat":
                    chunk(role=True)

        def on_text(piece):
            start()
            chunk(piece)

        try:
            _, finish, _, _ = self.engine.generate(ids, on_text=on_text, template_stop=kind == "chat", **params)
        except Exception as e:
            if not started[0]:
                raise                            # nothing sent yet: an ordinary error answer
            log.exception("generation failed mid-stream")
            self.wfile.write(b"data: " + json.dumps({"error": {"message": str(e), "type": "server_error"}}).encode()
                             + b"\n\n")
            return
        start()
        chunk(finish=finish)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A ready server (call `serve_forever()`; port 0 picks a free one: see `server_address`)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.engine = engine
    server.started = int(time.time())
    return server


def load_engine(model_dir, tokenizer=None, template="alpaca", name=None, device="auto", dtype="auto",
                max_new_tokens=512) -> Engine:
    from zhllama.modelio import load_for_inference
    from zhllama.sft.templates import get_template

    template = get_template(template)
    model, tok = load_for_inference(model_dir, tokenizer, device=device, dtype=dtype)
    return Engine(model, tok, template, name or Path(model_dir).resolve().name, max_new_tokens)


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="merged HF checkpoint directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--template", default="alpaca",
                        help="prompt template for chat requests: a built-in name (alpaca, chinese-alpaca, "
                             "llama2-chat) or a .yaml/.json template file (default alpaca)")
    parser.add_argument("--name", help="model id clients send and /v1/models lists (default: the directory name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 "
                        "exposes the model to the network)")
    parser.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="cap on max_tokens per request (512)")


def run(args):
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: not a directory")
    engine = load_engine(args.model, args.tokenizer, args.template, args.name, args.device, args.dtype,
                         args.max_new_tokens)
    try:
        server = make_server(engine, args.host, args.port)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = server.server_address[:2]
    # One line on stdout that scripts can wait for.
    print(f"serving '{engine.name}' on http://{host}:{port}/v1 (template {engine.template.name})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
