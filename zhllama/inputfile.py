"""What an input path is, and reading it in lines of bounded length.

Every command that reads a user's file goes through `check_input_file` first: a FIFO, a device, a
socket, a symbolic link loop, a dangling link or an unreadable file is one line naming the path and
what it is, instead of "no such file", a hang (opening a FIFO waits for a writer) or a traceback.

Text is read as bytes, one line at a time, at most `max_line` bytes a line (`--max-line-mb`, 16 MB by
default): a longer line is refused naming its file and line, so a file that is one 256 MB line costs
16 MB of memory, not gigabytes of token lists. A UTF-8 byte order mark at the start of a file is not
content: it is skipped.
"""

import argparse
import errno
import math
import os
import stat
from pathlib import Path

from .errors import InputError

BOM = b"\xef\xbb\xbf"
MAX_LINE_MB = 16.0
MAX_LINE_BYTES = int(MAX_LINE_MB * 1_000_000)

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_input_file(path, what: str = "input") -> Path:
    """`path` if it is a readable regular file (or a link to one); else an InputError saying what it is."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(path, _stat_problem(path, e, what)) from None
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise InputError(path, f"is {kind}, not a regular file (zhllama reads an {what} more than "
                                   "once); write the data to a file and give that")
    if stat.S_ISDIR(st.st_mode):
        raise InputError(path, f"is a directory, not a file ({what})")
    if not os.access(path, os.R_OK):
        raise InputError(path, "cannot be read: permission denied")
    return path


def _stat_problem(path: Path, e: OSError, what: str) -> str:
    if e.errno == errno.ELOOP:
        return "symbolic link loop: the link leads back to itself"
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            return f"dangling symbolic link: its target {os.readlink(path)} does not exist"
        return "no such file or directory"
    if e.errno == errno.EACCES:
        return "cannot be read: permission denied (on the file or a folder above it)"
    return f"cannot be read ({e.strerror or e})"


def check_input_entry(path, what: str = "input") -> None:
    """For a name found while listing a folder or a glob: refuse what `check_input_file` refuses, but
    let directories through (the caller walks or skips them)."""
    if os.path.isdir(path) and not os.path.islink(path):
        return
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            return
    except OSError:
        pass
    check_input_file(path, what)


def too_long(path, where, limit: int, unit: str = "line", flag: str = "--max-line-mb") -> InputError:
    """The error for a line (record, paragraph) over the limit, naming where it is and how to raise it."""
    return InputError(path, f"{unit} longer than {limit / 1e6:g} MB; split it, or raise the limit with {flag}",
                      where)


def read_lines(f, path, max_line: int = MAX_LINE_BYTES, flag: str = "--max-line-mb"):
    """(line number, raw bytes with the newline) of a binary file object, each at most `max_line`
    bytes long (the newline not counted; `flag` raises the limit), the BOM of the first line removed.
    Memory: one line."""
    lineno = 0
    while True:
        raw = f.readline(max_line + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_line and not raw.endswith(b"\n"):
            raise too_long(path, lineno, max_line, flag=flag)
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        yield lineno, raw


def read_text(path, what: str = "input", max_bytes: int = None) -> str:
    """A whole small file (a template, a list of seed tasks) as text, its BOM removed; an InputError
    naming the file when it is not a readable regular file, is larger than `max_bytes`, or not UTF-8."""
    check_input_file(path, what)
    try:
        if max_bytes is not None and os.path.getsize(path) > max_bytes:
            raise InputError(path, f"larger than {max_bytes / 1e6:g} MB, the limit for this {what}")
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e})") from None
    try:
        return data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def megabytes(text: str) -> float:
    """argparse type of --max-line-mb: a positive, finite number of MB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of MB") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of MB, not {text}")
    return value


def add_max_line_argument(parser, what: str = "line", flag: str = "--max-line-mb",
                          default: float = MAX_LINE_MB) -> None:
    parser.add_argument(flag, type=megabytes, default=default,
                        help=f"longest {what} read, in MB (default {default:g}); a longer one is refused "
                             "naming its file and line, so that memory stays bounded")


def max_line_bytes(args, dest: str = "max_line_mb") -> int:
    """The option `dest` (--max-line-mb) in bytes (commands without the option get the default)."""
    return int(getattr(args, dest, MAX_LINE_MB) * 1_000_000)
