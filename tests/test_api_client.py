"""The API client of `zhllama selfinstruct` and `translate` (sft/api_client.py) against servers made
here on loopback ports (issue 24): a total deadline per attempt, whatever the server drips; the key
from $OPENAI_API_KEY only over https or to a host that really is this machine (the name resolved, the
connection's address checked); never through a proxy over plain http; option values checked.

Each server runs on a thread of this process; a client call runs on another thread that the test
joins with a generous limit, so a client that hangs fails the test instead of hanging it."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
from bounded import ZHLLAMA, run_bounded
from conftest import subprocess_env

from zhllama.errors import UserError
from zhllama.hosts import free_port, is_loopback_host, loopback_addresses
from zhllama.sft.api_client import APIClient, APIError, resolve_api_key

HANG_GUARD_S = 60       # a client call not done by then is a hang (the deadlines below are 1 s)
REAL_GETADDRINFO = socket.getaddrinfo


def _in_thread(fn):
    """Run `fn()` on a thread; return what it returned or raised, or fail if it is still running after
    HANG_GUARD_S (the bug this file guards against is a client that never returns)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:      # handed to the test, which asserts its type
            out["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), f"the client call was still running after {HANG_GUARD_S} s"
    return out


# -- servers that drip ---------------------------------------------------------------------------

class DripServer:
    """Accepts connections on 127.0.0.1, reads the request head, sends `head` and then `drip` every
    `interval` seconds until the client hangs up. Counts connections."""

    def __init__(self, head: bytes, drip: bytes = b"x", interval: float = 0.05):
        self.head, self.drip, self.interval = head, drip, interval
        self.connections = 0
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    data += piece
                conn.sendall(self.head)
                while not self._stop.is_set():
                    conn.sendall(self.drip)
                    self._stop.wait(self.interval)
            except OSError:             # the client hung up
                return

    def close(self):
        self._stop.set()
        self._sock.close()


DRIPS = {
    # the head at once, then a 100,000-byte body one byte every 50 ms (each read well within any timeout)
    "body": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
    # the status line, then a header that never ends
    "head": b"HTTP/1.1 200 OK\r\nX-Slow: ",
    # nothing at all
    "silence": b"",
}


@pytest.mark.parametrize("what", list(DRIPS))
def test_a_server_that_drips_cannot_hold_the_client_past_its_deadline(what):
    """issue 24: the timeout applied to each read, so a server sending a byte a second held the
    client forever. Now each attempt ends `timeout` after it began: 2 attempts, 2 timeouts counted,
    and the client hung up both connections."""
    server = DripServer(DRIPS[what], drip=b"x" if what != "silence" else b"")
    client = APIClient(f"http://127.0.0.1:{server.port}/v1", "m", timeout=1.0, max_retries=1, backoff=0.01)
    try:
        out = _in_thread(lambda: client.chat([{"role": "user", "content": "hi"}]))
        assert isinstance(out.get("error"), APIError), out
        assert "no answer within 1s" in str(out["error"]) and "gave up after 2 attempts" in str(out["error"])
        assert (client.stats["requests"], client.stats["retry:timeout"], client.stats["failed"]) == (2, 1, 1)
        assert server.connections == 2
    finally:
        client.close()
        server.close()


# -- where the key goes --------------------------------------------------------------------------

class FakeDNS:
    """Stands in for socket.getaddrinfo: names in `answers` resolve to the address given there (the
    current one: a test may change it, as a rebinding DNS server would); IP literals and other names
    go to the real resolver."""

    def __init__(self, **answers):
        self.answers = dict(answers)
        self.asked = []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name in self.answers:
            self.asked.append(name)
            ip = self.answers[name]
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            addr = (ip, port or 0, 0, 0) if fam == socket.AF_INET6 else (ip, port or 0)
            return [(fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", addr)]
        return REAL_GETADDRINFO(host, port, family, type, proto, flags)


def test_loopback_means_every_resolved_address_is_loopback():
    dns = FakeDNS(**{"evil.localhost": "203.0.113.7", "api.localhost": "127.0.0.2", "v6.localhost": "::1",
                     "mixed.example": "127.0.0.1"})

    def mixed(host, *args):              # one loopback address and one that is not
        if host == "mixed.example":
            return dns(host, *args) + [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("198.51.100.1", 0))]
        return dns(host, *args)
    assert loopback_addresses("127.0.0.1") == ["127.0.0.1"]
    assert loopback_addresses("127.3.2.1") == ["127.3.2.1"]
    assert loopback_addresses("[::1]") == ["::1"]
    assert loopback_addresses("::ffff:127.0.0.1") == ["::ffff:127.0.0.1"]
    assert loopback_addresses("api.localhost", resolve=dns) == ["127.0.0.2"]
    assert loopback_addresses("v6.localhost", resolve=dns) == ["::1"]
    for host in ("10.0.0.5", "0.0.0.0", "::", "::ffff:10.0.0.5", "", "192.0.2.1"):
        assert loopback_addresses(host) == [], host
    assert loopback_addresses("evil.localhost", resolve=dns) == []          # the name says localhost; DNS does not
    assert loopback_addresses("mixed.example", resolve=mixed) == []
    assert loopback_addresses("no-such-host.invalid") == []                # does not resolve: not this machine
    # The real resolver: "localhost" is in /etc/hosts as a loopback address.
    assert is_loopback_host("localhost")


def test_the_environment_key_goes_over_plain_http_only_to_a_name_that_resolves_to_loopback(monkeypatch):
    dns = FakeDNS(**{"evil.localhost": "203.0.113.7", "api.localhost": "127.0.0.1"})
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    env = {"OPENAI_API_KEY": "sk-env"}
    assert resolve_api_key("http://api.localhost:8000/v1", None, env) == "sk-env"
    assert resolve_api_key("https://evil.localhost/v1", None, env) == "sk-env"             # https: encrypted
    for base in ("http://evil.localhost:8000/v1", "http://no-such-host.invalid/v1", "http://[::ffff:10.0.0.5]/v1"):
        with pytest.raises(UserError, match=r"refusing to send \$OPENAI_API_KEY in clear text"):
            resolve_api_key(base, None, env)
    assert "evil.localhost" in dns.asked                                   # it was resolved, not trusted by name


class Recorder(BaseHTTPRequestHandler):
    """Answers every POST with a chat completion; records (Host, Authorization, client address)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.headers.get("Host"), self.headers.get("Authorization"),
                                 self.client_address[0]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    """A recording server on every address of this machine (so a non-loopback address reaches it too)."""
    server = ThreadingHTTPServer(("0.0.0.0", 0), Recorder)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _non_loopback_ipv4():
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not is_loopback_host(a.address):
                return a.address
    return None


def test_the_environment_key_reaches_a_name_that_resolves_to_loopback(recorder, monkeypatch):
    port = recorder.server_address[1]
    monkeypatch.setattr(socket, "getaddrinfo", FakeDNS(**{"api.localhost": "127.0.0.1"}))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    base = f"http://api.localhost:{port}/v1"
    client = APIClient(base, "m", api_key=resolve_api_key(base, None), timeout=10, max_retries=0)
    try:
        assert _in_thread(lambda: client.chat([]))["value"].text == "ok"
    finally:
        client.close()
    assert recorder.seen == [(f"api.localhost:{port}", "Bearer sk-env", "127.0.0.1")]


def test_the_key_is_not_sent_when_the_name_resolves_elsewhere_at_connect(recorder, monkeypatch):
    """A name checked as loopback (so the environment's key is allowed) and answered otherwise when the
    client connects (DNS rebinding): the connection's address is checked before the request is written,
    and the key never reaches the other address (the recorder listens there too)."""
    elsewhere = _non_loopback_ipv4()
    if elsewhere is None:
        pytest.skip("this machine has no non-loopback IPv4 address to rebind the name to")
    port = recorder.server_address[1]
    dns = FakeDNS(**{"api.localhost": "127.0.0.1"})
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    base = f"http://api.localhost:{port}/v1"
    client = APIClient(base, "m", api_key=resolve_api_key(base, None), timeout=10, max_retries=0)  # loopback
    dns.answers["api.localhost"] = elsewhere                                                        # ... not now
    try:
        out = _in_thread(lambda: client.chat([]))
    finally:
        client.close()
    assert isinstance(out.get("error"), APIError), out
    assert f"reached {elsewhere}, not this machine" in str(out["error"]) and "key was not sent" in str(out["error"])
    assert recorder.seen == []                          # nothing arrived, at any address


def test_plain_http_never_goes_through_a_proxy_from_the_environment(recorder, monkeypatch):
    """With $HTTP_PROXY set, a plain-http request (key included) would be handed, in clear text, to the
    proxy. It goes direct: the proxy sees nothing."""
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    proxy.seen = []
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.server_address[1]}")
    client = APIClient(f"http://127.0.0.1:{recorder.server_address[1]}/v1", "m", api_key="sk-env", timeout=10,
                       max_retries=0)
    try:
        assert _in_thread(lambda: client.chat([]))["value"].text == "ok"
        assert [auth for _, auth, _ in recorder.seen] == ["Bearer sk-env"]
        assert proxy.seen == []
    finally:
        client.close()
        proxy.shutdown()
        proxy.server_close()


# -- options -------------------------------------------------------------------------------------

BAD_CLIENT_OPTIONS = [
    (["--timeout", "nan"], "--timeout"), (["--timeout", "0"], "--timeout"), (["--timeout", "inf"], "--timeout"),
    (["--concurrency", "0"], "--concurrency"), (["--max-retries", "-1"], "--max-retries"),
    (["--backoff", "nan"], "--backoff"), (["--rate-limit", "-1"], "--rate-limit"),
]


@pytest.mark.parametrize("argv, option", BAD_CLIENT_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_client_option_is_one_line(tmp_path, argv, option):
    (tmp_path / "in.jsonl").write_text('{"instruction": "hi", "input": "", "output": "x"}\n')
    res = run_bounded([*ZHLLAMA, "translate", "--input", tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl",
                       "--api-base", f"http://127.0.0.1:{free_port()}/v1", "--model", "m", *argv],
                      max_rss_mb=600, timeout_s=60, env=subprocess_env())
    res.assert_one_line_error(option)
    assert not (tmp_path / "out.jsonl").exists()
