"""User-facing errors.

Anything a user can fix (a bad path, a bad config key, a malformed line) raises `UserError` with a
message that names the file, line or key. The CLI prints it on one line and exits non-zero, without a
traceback; everything else is a bug and keeps its traceback.
"""


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
