"""`zhllama serve`: the OpenAI-compatible server on a tiny real LLaMA checkpoint, on loopback: the
endpoints and their answers, the official `openai` client against it, and abuse (bad or huge
Content-Length, stalled connections, no key, a full queue)."""

import json
import socket
import threading
import time
import urllib.request

import psutil
import pytest
from conftest import run_cli
from serve_helpers import KEY
from serve_helpers import call as _call

pytest_plugins = ["serve_fixtures"]      # serve_model, tiny_server: one server for the serve tests


def _events(text):
    lines = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_models_endpoint(tiny_server):
    status, body, _ = _call(tiny_server, "/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["tiny-zh"]


def _greedy_reference(served, ids, n):
    """The ids and text plain HF `generate` makes greedily after `ids`: the expectation the server's
    answers are checked against (its own loop, streamer and stop handling are not used)."""
    import torch
    with torch.no_grad():
        out = served.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=n, do_sample=False, eos_token_id=served.tokenizer.eos_token_id,
                                    pad_token_id=served.tokenizer.eos_token_id)
    new = out[0, len(ids):].tolist()
    return new, served.tokenizer.decode(new, skip_special_tokens=True)


def _printable(text: str) -> str:
    """`text` without U+FFFD and control characters. With byte-fallback tokens, a byte the stream already
    sent as a character (0x0B) is decoded as part of an invalid sequence (U+FFFD) when the whole
    sequence is decoded at once: the two texts agree on everything else."""
    return "".join(ch for ch in text if ch != "\ufffd" and (ch.isprintable() or ch in "\n "))


def test_chat_uses_the_template_and_matches_hf_generate(tiny_server, monkeypatch):
    import dataclasses

    from zhllama.sft.examples import encode_chat_prompt
    served = tiny_server.model
    messages = [{"role": "user", "content": "解释一下什么是光合作用"}]
    request = {"model": "tiny-zh", "messages": messages, "max_tokens": 8, "temperature": 0}
    status, body, _ = _call(tiny_server, "/chat/completions", request)
    assert status == 200, body
    out = json.loads(body)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    # The same ids the SFT training put before a response, then greedy decoding: the reference's text,
    # ended (by hand, here) before the template's next "### Instruction:" if the model wrote one.
    ids = encode_chat_prompt(served.tokenizer, served.template, messages)
    assert out["usage"]["prompt_tokens"] == len(ids)
    _, ref_text = _greedy_reference(served, ids, 8)
    assert out["choices"][0]["message"]["content"] == ref_text.split("### Instruction:", 1)[0]

    # The template's stop strings end a chat answer: give the template one the reference does write.
    assert len(ref_text) >= 4, f"the tiny model wrote too little to stop on: {ref_text!r}"
    stop = ref_text[2:4]
    monkeypatch.setattr(served, "template", dataclasses.replace(served.template, stop=(stop,)))
    status, body, _ = _call(tiny_server, "/chat/completions", request)
    choice = json.loads(body)["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (ref_text[:ref_text.find(stop)], "stop")


def test_streaming_equals_non_streaming(tiny_server):
    body = {"model": "tiny-zh", "messages": [{"role": "system", "content": "你是助手"},
                                            {"role": "user", "content": "推荐几本理财书籍"}],
            "max_tokens": 12, "temperature": 0}
    _, plain, _ = _call(tiny_server, "/chat/completions", body)
    status, text, headers = _call(tiny_server, "/chat/completions", dict(body, stream=True))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    chunks = _events(text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    plain = json.loads(plain)["choices"][0]
    assert streamed == plain["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


def test_completions_stop_strings_and_length(tiny_server):
    from zhllama.textenc import encode_text
    served = tiny_server.model
    prompt = "给出三条保持健康的建议。"
    status, body, _ = _call(tiny_server, "/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    out = json.loads(body)
    # Against plain HF generate from BOS + the prompt as text: the same text, token count and reason
    # (EOS ends it: "stop"; 16 tokens without EOS: "length").
    ids = [served.tokenizer.bos_token_id] + encode_text(served.tokenizer, prompt)
    ref_ids, ref_text = _greedy_reference(served, ids, 16)
    assert _printable(out["choices"][0]["text"]) == _printable(ref_text)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref_ids),
                            "total_tokens": len(ids) + len(ref_ids)}
    assert out["choices"][0]["finish_reason"] == ("stop" if ref_ids[-1] == served.tokenizer.eos_token_id
                                                  else "length")

    # A stop string split across two streamed pieces (the last character of one, the first of the next):
    # the answer ends before its first occurrence, plain and streaming alike.
    status, body, _ = _call(tiny_server, "/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                                          "stream": True})
    pieces = [c["choices"][0]["text"] for c in _events(body)]
    full = "".join(pieces)
    assert full == out["choices"][0]["text"]
    pieces = [p for p in pieces if p]
    assert len(pieces) >= 3, f"the tiny model streamed too few pieces to split a stop string: {pieces}"
    stop = pieces[1][-1] + pieces[2][0]
    for stream in (False, True):
        status, body, _ = _call(tiny_server, "/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                                              "stop": [stop], "stream": stream})
        if stream:
            chunks = _events(body)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = json.loads(body)["choices"][0]["text"], json.loads(body)["choices"][0]["finish_reason"]
        assert (text, finish) == (full[:full.find(stop)], "stop"), (stream, stop)


def test_bad_requests_get_clear_errors(tiny_server):
    cases = [
        ("/chat/completions", b"{not json", 400, "not JSON"),
        ("/chat/completions", json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode(),
         404, "serves 'tiny-zh'"),
        ("/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
        ("/chat/completions", json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(), 400, "role"),
        ("/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(),
         400, "temperature"),
        ("/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}).encode(),
         400, "max_tokens"),
        ("/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), 400, "'n'"),
        ("/chat/completions", b"[1]", 400, "JSON object"),
        ("/chat/completions", b"[" * 100_000, 400, "not JSON"),        # too deep: a clear 400, not a 500
        ("/completions", json.dumps({"prompt": "你好" * 5000}).encode(), 400, "at most 4096"),
        ("/nope", b"{}", 404, "no route"),
    ]
    for path, raw, code, needle in cases:
        status, body, _ = _call(tiny_server, path, raw=raw)
        assert status == code, (path, body)
        assert needle in json.loads(body)["error"]["message"], body
    status, body, _ = _call(tiny_server, "/chat/completions")     # GET
    assert status == 405
    assert tiny_server.model.lock.acquire(timeout=5)               # no request left the lock held
    tiny_server.model.lock.release()


def test_serve_help_and_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("serve", "--help")
    assert e.value.code == 0 and "/v1/chat/completions" in capsys.readouterr().out
    assert run_cli("serve", "--model", tmp_path / "missing") == 2
    assert "not a directory" in capsys.readouterr().err


def test_warns_when_exposed_without_a_key():
    from zhllama.export.serve import exposure_warning
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        assert "without an API key" in exposure_warning(host, None)
        assert exposure_warning(host, "k") is None
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert exposure_warning(host, None) is None


# -- the official openai client ------------------------------------------------------------------

def test_openai_sdk_models_chat_stream_completions_and_errors(tiny_server):
    import openai
    client = openai.OpenAI(base_url=tiny_server.url, api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny-zh"]

    messages = [{"role": "user", "content": "给出三条保持健康的建议"}]
    plain = client.chat.completions.create(model="tiny-zh", messages=messages, max_tokens=10, temperature=0)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens <= 10 and plain.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="tiny-zh", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    done = client.completions.create(model="tiny-zh", prompt="你好", max_tokens=6, temperature=0)
    streamed = list(client.completions.create(model="tiny-zh", prompt="你好", max_tokens=6, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny_server.url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-zh'"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny-zh", messages=messages, temperature=5)
    with pytest.raises(openai.BadRequestError, match="at most 4096"):
        client.completions.create(model="tiny-zh", prompt="你好" * 5000)


# -- abuse ----------------------------------------------------------------------------------------

def _raw(server, head: bytes, body: bytes = b"", timeout: float = 10.0):
    """Send raw bytes; return (the status line, the socket) without closing it."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    s.sendall(head + body)
    return s


def _status(sock) -> int:
    data = b""
    while b"\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def _head(path="/v1/completions", length=None, key=KEY, extra=b""):
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n").encode() + extra + b"\r\n"


def test_no_key_or_wrong_key_is_401_except_health(tiny_server):
    base = tiny_server.url[:-len("/v1")]
    with urllib.request.urlopen(base + "/health", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    for key in (None, "wrong", KEY + "x", ""):
        for path, body in (("/models", None), ("/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                           ("/completions", {"prompt": "x"})):
            status, text, headers = _call(tiny_server, path, body, key=key)
            assert status == 401, (key, path, text)
            assert json.loads(text)["error"]["code"] == "invalid_api_key" and headers["WWW-Authenticate"] == "Bearer"
    # A request without the key is refused from its headers: its (large) body is never read.
    sock = _raw(tiny_server, _head(length=5 << 20, key=None))
    assert _status(sock) == 401
    sock.close()


def test_content_length_missing_negative_or_too_large_is_refused_before_reading(tiny_server):
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    cases = [(_head(length=-1), 400), (_head(length="12abc"), 400), (_head(), 411),
             (_head(extra=b"Transfer-Encoding: chunked\r\n"), 411), (_head(length=(8 << 20) + 1), 413)]
    for head, code in cases:
        sock = _raw(tiny_server, head, body)       # the connection stays open: the server must not wait for EOF
        assert _status(sock) == code, head
        sock.close()


def test_a_50mb_body_with_negative_length_is_refused_without_growing_memory(tiny_server):
    """The answer (400) comes from the head alone, before a byte of the body is sent; the server then
    hangs up, so the 50 MB that follow cannot be taken in (sending them fails), and memory stays put."""
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    sock = _raw(tiny_server, _head(length=-1))
    assert _status(sock) == 400                     # read first: a server waiting for the body times out here
    chunk = b"x" * (1 << 20)
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(50):                         # 50 MB into a connection the server has closed
            sock.sendall(chunk)
    sock.close()
    grown = (proc.memory_info().rss - rss0) / 2**20
    assert grown < 20, f"RSS grew {grown:.0f} MiB"
    assert _call(tiny_server, "/models")[0] == 200      # and it still serves


def test_stalled_connections_do_not_block_and_are_closed(tiny_server):
    """Speed is bench/serve.py's business (a completion among stalled connections vs. on an idle
    server); here: a request is answered while 50 connections stall, and each stalled one is closed by
    the server (the socket timeouts only keep a broken server from hanging the test)."""
    idle = [socket.create_connection(("127.0.0.1", tiny_server.port), timeout=10) for _ in range(40)]
    partial = [_raw(tiny_server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") for _ in range(5)]
    slow_body = [_raw(tiny_server, _head(length=100), b'{"prompt": ') for _ in range(5)]
    status, body, _ = _call(tiny_server, "/completions", {"prompt": "你好", "max_tokens": 2}, timeout=20)
    assert status == 200, body
    for s in slow_body:                               # the body deadline (1 s): 408, then closed
        assert _status(s) == 408
        while s.recv(65536):                          # the rest of the answer, then EOF (a socket timeout
            pass                                      # here, 10 s, would mean the server kept it open)
    for s in idle + partial:                          # the head deadline (1 s): closed by the server
        assert s.recv(1) == b""
    for s in idle + partial + slow_body:
        s.close()


def test_prompt_too_long_for_any_context_is_refused_before_tokenizing(tiny_server, tokenizer_calls):
    limit = tiny_server.model.max_prompt_chars
    assert 4096 <= limit < 4096 * 64
    for path, body in (("/completions", {"prompt": "好" * limit}),              # + BOS: one over
                       ("/completions", {"prompt": "a" * (7 << 20)}),
                       ("/chat/completions", {"messages": [{"role": role, "content": "好" * (limit // 3 + 1)}
                                                           for role in ("user", "assistant", "user")]})):
        status, text, _ = _call(tiny_server, path, body)
        assert status == 400 and "characters" in text and "at most 4096 tokens" in text, text[:300]
        assert json.loads(text)["error"]["code"] == "context_length_exceeded"
    assert tokenizer_calls == []


def test_a_full_queue_answers_429(tiny_server, monkeypatch):
    """One request generating, two waiting (--queue-size 2): the next is told 429 at once; the
    waiting ones are then answered."""
    started, release = threading.Event(), threading.Event()

    def slow(prompt_ids, max_tokens=None, temperature=1.0, top_p=1.0, stop=None, seed=None, on_text=None,
             template_stop=True):
        started.set()
        release.wait(30)
        return "ok", "stop", len(prompt_ids), 1
    monkeypatch.setattr(tiny_server.model, "generate", slow)
    queue = tiny_server.app.state.service.queue
    results = []
    workers = [threading.Thread(target=lambda: results.append(_call(tiny_server, "/completions", {"prompt": "x"})))
               for _ in range(3)]
    try:
        for w in workers:
            w.start()
        assert started.wait(20)
        deadline = time.monotonic() + 20
        while queue.pending < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.pending == 3
        status, text, headers = _call(tiny_server, "/completions", {"prompt": "x"})
        assert status == 429 and headers["Retry-After"] == "1" and "busy" in text
        streaming = _call(tiny_server, "/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                             "stream": True})
        assert streaming[0] == 429
        too_long = {"prompt": "好" * (tiny_server.model.max_prompt_chars + 1)}
        assert _call(tiny_server, "/completions", too_long)[0] == 400    # refused before the queue
    finally:
        release.set()
        for w in workers:
            w.join(30)
    assert [r[0] for r in results] == [200, 200, 200]
    assert queue.pending == 0
