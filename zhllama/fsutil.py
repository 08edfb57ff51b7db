"""Files: atomic output (write to a temporary sibling, fsync, rename), checked JSON input.

A crash mid-write leaves either the previous complete file/directory or nothing, never a
half-written one that looks complete.
"""

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import InputError, UserError
from .log import get_logger

log = get_logger(__name__)

# A temporary output dir is named `.<out>.partial-<host>-<pid>-<random>.tmp`: the name says it is a
# partial output of ours and which process writes it, so a later run can remove one whose process is
# gone (SIGKILL, OOM, a lost node) without a marker file that would show up among the outputs.
PARTIAL_TAG = "partial"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(path) -> Path:
    """`mkdir -p path`, with a one-line `UserError` naming the culprit when a parent is a regular file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise UserError(f"{path}: cannot create this directory: {blocker} is a file, not a directory") from None
    except PermissionError as e:
        raise UserError(f"{path}: cannot create this directory: {e.strerror}") from None
    return path


def check_output_path(path, what: str = "output") -> None:
    """Fail before any work when `path` cannot be created because an ancestor is a regular file."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{path}: cannot create this {what}: {parent} is a file, not a directory")
            return


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (others on a shared
        # cluster must be able to read manifests and configs).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = False):
    """Yield a temporary directory that becomes `path` only if the block completes.

    With `overwrite`, an existing `path` is replaced (moved aside first, removed after the rename);
    without it, an existing non-empty `path` is an error raised before any work is done.
    """
    path = Path(path)
    check_output_path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path}: output exists; pass --overwrite to replace it")
    make_dirs(path.parent)
    remove_stale_partials(path)
    prefix = f".{path.name}.{PARTIAL_TAG}-{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=str(path.parent)))
    try:
        # mkdtemp creates 0700; give the dir the mode `mkdir` would, so that others on a shared
        # cluster can read published checkpoints (files inside are written with open(): umask too).
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _owner_is_gone(host: str, pid: int) -> bool:
    """True when the writer is known dead: this host, no such pid. Unknown: keep the dir."""
    if host != socket.gethostname():
        return False  # another node of a shared filesystem may still be writing it
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_partials(path) -> list:
    """Remove temporary dirs of `path` left by our own runs that were killed (SIGKILL, OOM): only
    dirs named by `atomic_dir` whose process is gone. Returns the removed dirs."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    ours = re.compile(rf"\.{re.escape(path.name)}\.{PARTIAL_TAG}-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+\.tmp")
    for cand in sorted(path.parent.glob(f".{glob.escape(path.name)}.{PARTIAL_TAG}-*.tmp")):
        m = ours.fullmatch(cand.name)
        if m and cand.is_dir() and not cand.is_symlink() and _owner_is_gone(m["host"], int(m["pid"])):
            shutil.rmtree(cand, ignore_errors=True)
            log.warning("removed %s: a partial output left by an earlier run that was killed", cand)
            removed.append(cand)
    return removed


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path, required=(), hint: str = ""):
    """The JSON object in `path`; an InputError naming the file when it cannot be read, is not JSON, or
    lacks one of the `required` keys (`hint` is added to that message)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise InputError(path, f"not valid JSON ({e})") from None
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        raise InputError(path, f"missing key {missing[0]!r}{hint}")
    return data
