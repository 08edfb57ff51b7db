"""User-facing errors.

Anything a user can fix (a bad path, a bad config key, a malformed line) raises `UserError` with a
message that names the file, line or key. The CLI prints it on one line and exits non-zero, without a
traceback; everything else is a bug and keeps its traceback. A full disk is the user's to fix too:
`disk_full_error` turns it into such a line.
"""

import errno
import os
import re
from typing import Optional


class UserError(Exception):
    """An error caused by the user's input, with a message that says what to fix."""


class InputError(UserError):
    """A bad input file: missing, empty, binary, undecodable, or malformed at a given line."""

    def __init__(self, path, message, line=None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


class ConfigError(UserError):
    """A bad configuration key or value."""


class OutputBusyError(UserError):
    """Another run is writing the same output (it holds the output's lock)."""


# A full disk, a full quota, or the file size limit (`ulimit -f`): the errno of Python's writes, and
# the "(os error N)" that Rust libraries (tokenizers, safetensors) put in their messages instead.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def disk_full_error(e: BaseException, out=None) -> Optional[UserError]:
    """The one-line error for a write that failed because the disk is full; None for any other error.

    `out` names the output the command was writing (the failing file is often a temporary one)."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = _RUST_OS_ERROR.search(str(e))
        code = int(m.group(1)) if m else None
    if code not in DISK_FULL_ERRNOS:
        return None
    where = out if out is not None else (getattr(e, "filename", None) or "the output")
    return UserError(f"{where}: disk full ({os.strerror(code)}); nothing was replaced: the previous "
                     "output, if any, is as it was; free space and run the command again")
