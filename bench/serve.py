"""`zhllama serve` under load and under abuse: requests/s, and the server's memory and threads.

Starts `zhllama serve` as a child process (with an API key and --timeout 2) on a checkpoint (default:
a tiny random LLaMA built here, so the figures measure the server, not the model), then:

- requests/s for GET /v1/models (the HTTP stack alone) and for POST /v1/completions (8 new tokens,
  greedy), one client after another and with 8 concurrent clients;
- the server's RSS (sampled every 10 ms, peak reported) and thread count while it is sent the bad
  requests of issue 13: a 50 MB body with `Content-Length: -1`, a 50 MB body with its true length,
  a 50 MB chunked body, a 7.9 MB prompt (under the 8 MiB body limit, far over the context), and
  200 connections that stall (idle, or half a request head), which must be closed after --timeout;
- the hostile requests of issue 24, each timed against one 8-token completion measured in the same
  run (the ratio is what to read on a shared machine): 230,000 empty chat messages, 300,000 stop
  strings, 511 messages whose rendering (not their content) is over the context, a prompt that fits
  the character bound but not the token budget, temperature 1e-300, seed 2**70;
- the speed goals that used to be timing asserts in tests/test_serve.py, as ratios: a completion
  while 200 connections stall over one on an idle server, and refusing a prompt too long for the
  context over a completion.

With --baseline REF, the same requests/s and stalled connections are measured first on the server as
it was at git REF (the hand-written http.server one before the rewrite: `--baseline cfe04de`); the
large bodies are not sent to it (that server reads them whole: the issue saw it pass 7.8 GB). With
--baseline-python PY, everything (abuse included) is measured first on `zhllama serve` as another
installation runs it (PY: the interpreter of another checkout's venv, e.g. the main branch's).

  python bench/serve.py                       # tiny model, 200 completions per mode
  python bench/serve.py --baseline cfe04de    # and the old server, for comparison
  python bench/serve.py --baseline-python ../main/.venv/bin/python   # and main's server
  python bench/serve.py --model merged/ --requests 50
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from zhllama.export.inference import longest_piece_chars
from zhllama.modelio import load_tokenizer, read_model_config
from zhllama.tiny import TINY_TEXT, make_tiny_llama, make_tiny_sp

KEY = "bench-key"


def _tiny_model(root: Path) -> Path:
    sp = make_tiny_sp(root / "sp" / "tokenizer.model", text=TINY_TEXT, vocab_size=800)
    return make_tiny_llama(sp, root / "tiny-zh", max_position_embeddings=4096, seed=0)


REPO = Path(__file__).resolve().parent.parent
_RUN_OLD = """import argparse, importlib.util, sys
spec = importlib.util.spec_from_file_location("old_serve", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
parser = argparse.ArgumentParser(); mod.add_arguments(parser)
sys.exit(mod.run(parser.parse_args(sys.argv[2:])))
"""


def _start(model: Path, timeout: float, old_module: Path = None, python: str = sys.executable):
    common = ["--model", str(model), "--port", "0", "--device", "cpu", "--max-new-tokens", "64"]
    if old_module is None:
        cmd = [python, "-c", "import sys; from zhllama.app.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", *common, "--api-key", KEY, "--timeout", str(timeout)]
    else:
        cmd = [sys.executable, "-c", _RUN_OLD, str(old_module), *common]
    log = tempfile.TemporaryFile()           # the server's stderr: tracebacks of the abuse, kept quiet
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        log.seek(0)
        raise SystemExit(f"the server did not start: {line!r}\n{log.read().decode(errors='replace')[-2000:]}")
    url = line.split(" on ", 1)[1].split()[0]
    return proc, url


class Sampler:
    """Polls a process's RSS and thread count every 10 ms; `peak()` since the last `reset()`."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.rss = self.threads = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.rss = max(self.rss, self.proc.memory_info().rss)
                self.threads = max(self.threads, self.proc.num_threads())
            except psutil.Error:
                return
            time.sleep(0.01)

    def reset(self):
        self.rss, self.threads = self.proc.memory_info().rss, self.proc.num_threads()

    def stop(self):
        self._stop.set()


def _rate(fn, n: int, clients: int) -> float:
    t0 = time.perf_counter()
    if clients == 1:
        for _ in range(n):
            fn()
    else:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda _: fn(), range(n)))
    return n / (time.perf_counter() - t0)


def _median_seconds(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def _raw(host, port, data: bytes, body_mb: int = 0, shut=True):
    """Send a head (and body_mb MB of body); return the status code, or 0 if the server hung up first."""
    s = socket.create_connection((host, port), timeout=30)
    try:
        s.sendall(data)
        chunk = b"x" * (1 << 20)
        for _ in range(body_mb):
            s.sendall(chunk)
        if shut:
            s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        answer = s.recv(64)
    except OSError:
        answer = b""
    s.close()
    return int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def measure(url, proc, args, abuse: bool, prompt_chars: int = 0):
    """Rows of (what, figure) for the server at `url` (child process `proc`); `prompt_chars` is the
    server's character bound on a prompt (positions x the tokenizer's longest piece)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    port = int(port)
    sampler = Sampler(proc.pid)
    headers = {"Authorization": f"Bearer {KEY}"}
    rows = []
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=120,
                          limits=httpx.Limits(max_connections=16)) as http:
            def models():
                assert http.get("/models").status_code == 200

            def complete():
                r = http.post("/completions", json={"prompt": "给出三条保持健康的建议。", "max_tokens": 8,
                                                    "temperature": 0})
                assert r.status_code == 200, r.text

            for _ in range(5):
                complete()                                   # warm up
            t0 = time.perf_counter()
            for _ in range(10):
                complete()
            one_completion = (time.perf_counter() - t0) / 10
            sampler.reset()
            base_rss = sampler.rss
            for name, fn, n in (("GET /v1/models", models, 10 * args.requests),
                                ("POST /v1/completions (8 tokens)", complete, args.requests)):
                for clients in (1, 8):
                    rows.append((f"{name}, {clients} client{'s' if clients > 1 else ''}",
                                 f"{_rate(fn, n, clients):.1f} req/s"))

            head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                    f"Content-Type: application/json\r\n").encode()
            chunked = b"".join(b"100000\r\n" + b"x" * (1 << 20) + b"\r\n" for _ in range(50)) + b"0\r\n\r\n"
            cases = [
                ("50 MB body, Content-Length: -1", lambda: _raw(host, port, head + b"Content-Length: -1\r\n\r\n", 50)),
                ("50 MB body, Content-Length: 52428800",
                 lambda: _raw(host, port, head + b"Content-Length: 52428800\r\n\r\n", 50)),
                ("50 MB chunked body", lambda: _raw(host, port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)),
                ("7.9 MB prompt (JSON)", lambda: http.post(
                    "/completions", json={"prompt": "好" * (int(7.9 * 2**20) // 3)}).status_code),
            ]
            for name, fn in cases if abuse else []:
                sampler.reset()
                rss0 = sampler.rss
                t0 = time.perf_counter()
                status = fn()
                took = time.perf_counter() - t0
                time.sleep(0.3)
                rows.append((name, f"{status or 'closed'} in {took:.2f} s = {took / one_completion:.2f} x a "
                                   f"completion; peak RSS +{(sampler.rss - rss0) / 2**20:.1f} MiB"))
            for name, body in hostile_requests(prompt_chars) if abuse else []:
                sampler.reset()
                rss0 = sampler.rss
                t0 = time.perf_counter()
                r = http.post("/chat/completions", content=body, headers={"Content-Type": "application/json"})
                took = time.perf_counter() - t0
                time.sleep(0.1)
                rows.append((name, f"{r.status_code} in {took:.2f} s = {took / one_completion:.2f} x a completion "
                                   f"({len(body) / 2**20:.1f} MiB body); peak RSS "
                                   f"+{(sampler.rss - rss0) / 2**20:.1f} MiB"))

            sampler.reset()
            threads0 = sampler.threads
            idle = _median_seconds(complete, 5)
            stalled = [socket.create_connection((host, port)) for _ in range(200)]
            for s in stalled[150:]:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.5)
            during = _median_seconds(complete, 3)           # within --timeout: they still stall
            closed, t1 = 0, time.perf_counter()
            deadline = t1 + args.timeout + 10
            for s in stalled:
                s.settimeout(max(0.01, deadline - time.perf_counter()))
                try:
                    closed += s.recv(1) == b""
                except OSError:
                    pass
            waited = time.perf_counter() - t1
            for s in stalled:
                s.close()
            rows.append(("200 stalled connections (150 idle, 50 half a head)",
                         f"a completion meanwhile {during:.2f} s = {during / idle:.2f} x one on the idle server "
                         f"({idle:.2f} s; medians of 3 and 5); {closed}/200 closed by the server within "
                         f"{waited:.1f} s; server threads {threads0} -> peak {sampler.threads}; "
                         f"peak RSS +{(sampler.rss - base_rss) / 2**20:.1f} MiB"))
            rows.append(("server RSS", f"{psutil.Process(proc.pid).memory_info().rss / 2**20:.0f} MiB at the end "
                                       f"({base_rss / 2**20:.0f} MiB after warm-up)"))
    finally:
        sampler.stop()
    return rows


def hostile_requests(prompt_chars: int):
    """(name, raw JSON body) of issue 24's hostile chat requests, built when they are sent."""
    user = {"role": "user", "content": "x"}
    turns = ['{"role": "user", "content": ""}', '{"role": "assistant", "content": ""}']
    empty = ('{"messages": [' + ", ".join(turns[i % 2] for i in range(230_001)) + "]}").encode()
    # 511 messages whose content is within the character bound and whose rendering (a template turn
    # each) is over it
    rendered = [{"role": ("user", "assistant")[i % 2], "content": "好" * (prompt_chars // 511)}
                for i in range(511)]
    return [
        ("230,000 empty chat messages", empty),
        ("300,000 stop strings", json.dumps({"messages": [user], "stop": ["ab"] * 300_000}).encode()),
        ("511 messages: content under the bound, rendering over", json.dumps({"messages": rendered}).encode()),
        ("2,000 byte-fallback characters (over 6,000 tokens)",
         json.dumps({"messages": [{"role": "user", "content": "龘" * 2000}]}).encode()),
        ("temperature 1e-300", json.dumps({"messages": [user], "temperature": 1e-300}).encode()),
        ("seed 2**70", json.dumps({"messages": [user], "seed": 2**70}).encode()),
    ]


def _print(title, rows):
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random LLaMA built here)")
    ap.add_argument("--requests", type=int, default=200, help="completions per mode (200)")
    ap.add_argument("--timeout", type=float, default=2.0, help="the server's --timeout (2 s)")
    ap.add_argument("--baseline", metavar="REF", help="also measure export/serve.py as it was at git REF")
    ap.add_argument("--baseline-python", metavar="PY",
                    help="also measure `zhllama serve` as the interpreter PY (another checkout's venv) runs it")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else _tiny_model(Path(tmp.name))
    runs = []
    if args.baseline:
        old = Path(tmp.name) / "old_serve.py"
        old.write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"{args.baseline}:export/serve.py"],
                                       check=True, capture_output=True).stdout)
        runs.append((f"before (export/serve.py at {args.baseline}, http.server)", old, False, sys.executable))
    if args.baseline_python:
        runs.append((f"before ({args.baseline_python})", None, True, args.baseline_python))
    runs.append(("now (uvicorn + Starlette, --timeout %g)" % args.timeout, None, True, sys.executable))
    positions = read_model_config(model)["max_position_embeddings"]
    prompt_chars = positions * longest_piece_chars(load_tokenizer(model))
    try:
        for title, old_module, abuse, python in runs:
            proc, url = _start(model, args.timeout, old_module, python)
            try:
                _print(f"{title}: {url}", measure(url, proc, args, abuse, prompt_chars))
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        tmp.cleanup()
    print(json.dumps({"cpu_count": os.cpu_count(), "load": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
