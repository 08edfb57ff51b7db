"""Files: atomic output (write to a temporary sibling, fsync, swap in), checked JSON input.

A crash or a full disk mid-write leaves either the previous complete file/directory or nothing, never
a half-written one that looks complete: the new output is written beside the old one and swapped in
only when complete (a directory by one atomic exchange where the kernel has it, `renameat2`).
"""

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError, UserError
from .log import get_logger

log = get_logger(__name__)

# A temporary output (file or dir) is named `.<out>.partial-<host>-<pid>-<random>.tmp`, and an old
# output moved aside during a swap `.<out>.old-<host>-<pid>-<random>.tmp`: the name says it is ours
# and which process writes it, so a later run of any command in that folder can remove one whose
# process is gone (SIGKILL, OOM, a lost node), or put back an old output that was moved aside and
# never replaced, without a marker file that would show up among the outputs.
PARTIAL_TAG = "partial"
OLD_TAG = "old"
_TEMP_NAME = re.compile(rf"\.(?P<out>.+)\.(?P<tag>{PARTIAL_TAG}|{OLD_TAG})-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp")


def temp_prefix(path, tag: str = PARTIAL_TAG) -> str:
    """The name prefix of a temporary sibling of `path` written by this process."""
    return f".{Path(path).name}.{tag}-{socket.gethostname()}-{os.getpid()}-"


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
    """Fail before any work when `path` cannot be created because an ancestor is a regular file, or
    cannot be written because the folder it goes in (or `path` itself, a directory) is not writable."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{path}: cannot create this {what}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{path}: cannot create this {what}: {parent} is not writable")
            break
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write this {what}: the directory is not writable")


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=str(path.parent))
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
    path = output_target(path)
    check_output_path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path}: output exists; pass --overwrite to replace it")
    make_dirs(path.parent)
    remove_stale_partials(path)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_target(path) -> Path:
    """Where an output named `path` is written: the directory a symbolic link points to (a data dir
    linked to another disk stays on that disk, and the link stays a link), else `path` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def make_temp_dir(path) -> Path:
    """A new empty temporary sibling of `path`, named as ours (see `_TEMP_NAME`)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=str(path.parent)))
    # mkdtemp creates 0700; give the dir the mode `mkdir` would, so that others on a shared
    # cluster can read published checkpoints (files inside are written with open(): umask too).
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def swap_in(new, path) -> None:
    """Make the complete directory `new` (a sibling) be `path`, replacing what is there, and remove
    the old one. With renameat2(RENAME_EXCHANGE) `path` is never missing; without it (another OS, a
    filesystem that lacks it) the old output is first moved to an `.old-` sibling, which the next run
    in this folder puts back should we be killed before `new` is in place."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)       # `new` now holds the old output
    else:
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(path, OLD_TAG), suffix=".tmp", dir=str(path.parent)))
        os.replace(path, old)   # a dir onto an empty dir: allowed
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2). False where unavailable; other errors raise."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            _libc.renameat2  # glibc >= 2.28
        except (OSError, AttributeError, TypeError):
            _libc = False
    if not _libc:
        return False
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_array(f, arr) -> None:
    """Write a numpy array's bytes to an open binary file. (`ndarray.tofile` reports a short write on
    a full disk as "N requested and M written", without the errno that names it as a full disk.)"""
    f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))


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
    """Clean the folder `path` is written in of what our killed runs left there (SIGKILL, OOM): the
    temporary files and dirs of any output in that folder whose process is gone are removed, and an old
    output moved aside by `swap_in` whose replacement never came is put back. Only names made by this
    module, only dead processes of this host. Returns the paths removed."""
    parent = Path(path).parent
    removed = []
    try:
        names = [e.name for e in os.scandir(parent) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for name in sorted(names):
        m = _TEMP_NAME.fullmatch(name)
        cand = parent / name
        if not m or cand.is_symlink() or not _owner_is_gone(m["host"], int(m["pid"])):
            continue
        target = parent / m["out"]
        if m["tag"] == OLD_TAG and not os.path.lexists(target) and cand.is_dir() and any(cand.iterdir()):
            os.replace(cand, target)
            log.warning("restored %s: it was moved aside by a run that was killed before its new "
                        "output was in place", target)
            continue
        if cand.is_dir():
            shutil.rmtree(cand, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                cand.unlink()
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
    lacks one of the `required` keys (`hint` is added to that message). A UTF-8 BOM is skipped."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise InputError(path, f"not valid JSON ({e})") from None
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        raise InputError(path, f"missing key {missing[0]!r}{hint}")
    return data
