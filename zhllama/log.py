"""Logging and progress lines for long jobs (stderr, one line every few seconds)."""

import logging
import sys
import time

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter that buries our progress lines.
    for noisy in ("jieba", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


class Progress:
    """Rate-limited progress reporting: `update(n_items, n_bytes)`; prints items/s and MB/s."""

    def __init__(self, what: str, total_bytes: int = 0, every: float = 5.0, logger=None):
        self.what = what
        self.total_bytes = total_bytes
        self.every = every
        self.items = 0
        self.bytes = 0
        self.start = time.perf_counter()
        self._last = self.start
        self.log = logger or get_logger("zhllama.progress")

    def update(self, items: int = 0, nbytes: int = 0, extra: str = "") -> None:
        self.items += items
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self.log.info(self.line(extra))

    def line(self, extra: str = "") -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        mb = self.bytes / 1e6
        pct = f" ({100.0 * self.bytes / self.total_bytes:.1f}%)" if self.total_bytes else ""
        tail = f", {extra}" if extra else ""
        return (f"{self.what}: {self.items:,} items, {mb:,.1f} MB{pct}, "
                f"{mb / elapsed:,.2f} MB/s, {elapsed:,.1f}s{tail}")

    def done(self, extra: str = "") -> str:
        msg = self.line(extra)
        self.log.info(msg + " (done)")
        return msg
