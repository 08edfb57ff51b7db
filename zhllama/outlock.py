"""One writer per output: a lock file beside the output, naming the run that holds it.

Two runs writing the same `--out` would both exit 0, one silently replacing the other (or, for a
resumable output, both appending to it). Every command that writes an output takes its lock first
(`output_lock`), before any work: the second run gets one line naming the holder (pid, host,
command, since) and exit 2. The lock is an flock on `.<out>.lock` in the output's folder, through
`filelock`: the kernel releases it when the holder dies, however it dies, so a killed run never
leaves a lock behind that blocks the next one. The lock file is removed on release.

Taking the lock also checks, before the work, that the output can be written there (an unwritable
folder used to fail only at the end of `vocab train`), and removes what killed runs left in that
folder (`fsutil.remove_stale_partials`).
"""

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import OutputBusyError, UserError
from .fsutil import check_output_path, make_dirs, output_target, remove_stale_partials


def lock_path(out) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


class _Replaced(Exception):
    """The lock file was removed (by its releasing holder) between our open and our flock."""


def _holder_writer(path: Path, command: str):
    def write(fd: int) -> None:
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            raise _Replaced()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    return write


def describe_holder(path: Path) -> str:
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        return (f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another run (it has just taken the lock)"


@contextlib.contextmanager
def output_lock(out, command: str, what: str = "output"):
    """Hold the lock of output `out` (a path a command writes) for the block; `command` names this run
    for whoever finds the lock held ("zhllama data pack")."""
    out = Path(out)
    target = output_target(out)          # a run through a symbolic link locks what it points to
    check_output_path(target, what)
    make_dirs(target.parent)
    remove_stale_partials(target)
    path = lock_path(target)
    for _ in range(10):
        lock = FileLock(str(path), timeout=0, on_acquired=_holder_writer(path, command))
        try:
            lock.acquire()
        except _Replaced:
            continue
        except Timeout:
            raise OutputBusyError(f"{out}: another run is writing this {what}: {describe_holder(path)}; "
                                  "wait for it to end, or choose another output") from None
        except PermissionError as e:
            raise UserError(f"{out}: cannot write here: {e.strerror or e} ({path})") from None
        break
    else:
        raise OutputBusyError(f"{out}: the lock {path} keeps being replaced; is another run starting?")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)        # while still held: a waiter on the old file retries on the new one
        lock.release()
