"""File-system faults for tests: a full disk, a user the permission bits apply to, a FIFO that must
not hang the suite.

- `run_with_file_size_limit`: run a command with RLIMIT_FSIZE set (`ulimit -f`) and SIGXFSZ ignored,
  so that a write past the limit fails with EFBIG ("File too large") exactly where a full disk fails
  with ENOSPC: the same write, the same error path.
- `as_nobody`: root ignores permission bits, so an unreadable file or an unwritable folder is only
  unreadable to another user: under root the command runs as `nobody` (setpriv).
- `world_dir`: a folder under /tmp that `nobody` may read (pytest's tmp dirs are private to root).
- `fifo_unblocker`: opens FIFOs for writing as soon as a reader waits, so a reader that should have
  refused one ends instead of hanging.
"""

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

NOBODY = 65534


def run_with_file_size_limit(argv, limit_bytes: int, env=None, timeout_s: float = 300):
    """`argv` in a child whose files may not grow past `limit_bytes`; returns the CompletedProcess."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([str(a) for a in argv], preexec_fn=limit, capture_output=True, text=True,
                          timeout=timeout_s, env=env)


def as_nobody(argv) -> list:
    """`argv` as a user the permission bits apply to: unchanged unless we are root."""
    argv = [str(a) for a in argv]
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("root ignores permission bits and setpriv (to run as nobody) is not installed")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@contextlib.contextmanager
def world_dir(prefix: str = "zhllama-"):
    """A fresh folder under /tmp that every user may read and enter; removed afterwards (whatever
    the permissions left inside)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for p in root.rglob("*"):
            with contextlib.suppress(OSError):
                if not p.is_symlink():
                    p.chmod(0o700)
        shutil.rmtree(root, ignore_errors=True)


def make_readable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


@contextlib.contextmanager
def fifo_unblocker(paths):
    """Open every FIFO among `paths` for writing (then close it) as soon as a reader waits on it."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            for p in paths:
                with contextlib.suppress(OSError):
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            stop.wait(0.05)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
