"""Run a command in a child process with a cap on its memory and its wall time.

Hostile or clumsy input must end in one line and exit 2, within bounded time and memory. A test that
runs such input in-process cannot tell a hang from slowness, and a memory blow-up would take the test
runner (and the machine) with it. `run_bounded` starts the command in its own process group, samples
the resident memory of the whole group (the command and every child it starts) every few
milliseconds, and kills the group the moment it passes `max_rss_mb` or `timeout_s`. The result says
what happened, so a test asserts on it:

    res = run_bounded([*ZHLLAMA, "train", "--dry-run", "--config", bomb], max_rss_mb=600, timeout_s=60)
    res.assert_one_line_error("bomb.yaml")

Memory is sampled, not limited by the kernel (RLIMIT_AS would count the virtual mappings of torch's
libraries, gigabytes that are never resident), so an allocation faster than the sampling interval can
overshoot the cap briefly before the kill; the peak seen is reported either way.
"""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import psutil

ZHLLAMA = [sys.executable, "-m", "zhllama.app.cli"]  # the CLI as the console script runs it


@dataclass
class Bounded:
    argv: list
    returncode: Optional[int]       # None when killed by us
    stdout: str
    stderr: str
    peak_rss_mb: float              # the largest summed RSS of the process group seen
    wall_s: float
    killed: Optional[str]           # "memory" or "time" when we killed it, else None

    def error_lines(self) -> list:
        return [line for line in self.stderr.splitlines() if "error:" in line]

    def describe(self) -> str:
        return (f"{' '.join(map(str, self.argv))}\n  exit {self.returncode}, killed {self.killed}, "
                f"peak {self.peak_rss_mb:.0f} MB, {self.wall_s:.1f} s\n  stderr tail:\n{self.stderr[-3000:]}")

    def assert_bounded(self) -> None:
        assert self.killed is None, f"killed for {self.killed}: {self.describe()}"

    def assert_one_line_error(self, *names: str, code: int = 2) -> str:
        """Within the bounds, exit `code`, no traceback, exactly one 'error:' line naming each of `names`;
        returns that line."""
        self.assert_bounded()
        assert self.returncode == code, f"exit {self.returncode}, wanted {code}: {self.describe()}"
        assert "Traceback" not in self.stderr, self.describe()
        errors = self.error_lines()
        assert len(errors) == 1, f"{len(errors)} error lines: {self.describe()}"
        for name in names:
            assert str(name) in errors[0], f"{errors[0]!r} does not name {name!r}"
        return errors[0]


def _feed(pipe, text: str) -> None:
    try:
        pipe.write(text.encode("utf-8"))
        pipe.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _group_rss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_bounded(argv: Sequence, *, max_rss_mb: float = 2000, timeout_s: float = 120,
                stdin: Optional[str] = None, env: Optional[dict] = None, cwd=None,
                poll_s: float = 0.01) -> Bounded:
    """Run `argv` (str/Path items) with `stdin` as its input (empty, never the terminal); kill its whole
    process group when it passes `max_rss_mb` of resident memory or `timeout_s` seconds."""
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env, cwd=cwd,
                                start_new_session=True)
        feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin or ""), daemon=True)
        feeder.start()  # a thread: a child that never reads its input must not block us
        ps = psutil.Process(proc.pid)
        peak, killed = 0, None
        while proc.poll() is None:
            rss = _group_rss(ps)
            peak = max(peak, rss)
            if rss > max_rss_mb * 1e6:
                killed = "memory"
            elif time.monotonic() - t0 > timeout_s:
                killed = "time"
            if killed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                break
            time.sleep(poll_s)
        wall = time.monotonic() - t0
        try:  # a child the command left behind must not outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        out.seek(0)
        err.seek(0)
        return Bounded(argv=argv, returncode=None if killed else proc.returncode,
                       stdout=out.read().decode("utf-8", "replace"), stderr=err.read().decode("utf-8", "replace"),
                       peak_rss_mb=peak / 1e6, wall_s=wall, killed=killed)
