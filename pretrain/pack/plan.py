"""Planning: input files -> work units (one shard each) -> slices (one worker task each), cut on
document boundaries; and the validation split, decided per document by a hash of its text."""

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from zhllama import corpus
from zhllama.fsutil import sha256_file

READ_CHUNK = 8 << 20          # bytes per read when hashing inputs
BLANK_CAP = 1 << 16           # a line longer than this is not looked at whole: it is not blank


@dataclass
class Slice:
    """A byte range of a unit sent to one worker, and the line number it starts at (for error messages)."""
    start: int
    end: int
    first_line: int


@dataclass
class Unit:
    """A byte range of one input file that becomes one shard per split (a .gz or parquet file: the whole file)."""
    index: int            # position in the whole plan (input order, then file offset)
    path: Path
    sha256: str
    start: int
    end: int
    whole: bool           # read with corpus.iter_documents (gz, parquet): one slice, no byte ranges
    slices: List[Slice] = field(default_factory=list)

    @property
    def uid(self) -> str:
        key = f"{os.path.realpath(self.path)}\0{self.sha256}\0{self.start}\0{self.end}"
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]

    @property
    def name(self) -> str:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.path.name)[:48]
        return f"{stem}-{self.start:012d}-{self.uid}"


def _splittable(path: Path) -> bool:
    return corpus.data_format(path) != "parquet" and not str(path).lower().endswith(".gz")


def _is_blank(raw: bytes) -> bool:
    # the same test iter_documents uses for a paragraph break (str.strip, not bytes.strip: U+3000)
    return not raw.decode("utf-8", "replace").strip()


def _skip_line(f) -> bool:
    """Move past the rest of the current line (a bounded read at a time: a line may be gigabytes);
    True when it was blank (a long line is never taken for blank) or the file ended."""
    head = f.readline(BLANK_CAP)
    if not head:
        return True
    if head.endswith(b"\n") or len(head) < BLANK_CAP:
        return _is_blank(head)
    while True:
        part = f.readline(READ_CHUNK)
        if not part or part.endswith(b"\n"):
            return False


def _next_boundary(f, target: int, doc_sep: str) -> int:
    """The first document boundary at or after `target`: a line start, or after a blank line."""
    f.seek(target - 1)
    _skip_line(f)                     # finish the line that holds byte target-1
    if doc_sep == "line":
        return f.tell()
    while not _skip_line(f):
        pass
    return f.tell()


def _boundaries(f, start: int, end: int, step: int, doc_sep: str) -> List[int]:
    out = [start]
    while out[-1] + step < end:
        b = _next_boundary(f, out[-1] + step, doc_sep)
        if b >= end:
            break
        out.append(b)
    out.append(end)
    return out


def plan_file(path: Path, first_index: int, unit_bytes: int, slice_bytes: int, doc_sep: str) -> List[Unit]:
    """Units and slices of one file, with each slice's first line number, and the file's sha256.
    One sequential read (hashing and counting newlines), plus a few seeks to find boundaries."""
    size = os.path.getsize(path)
    if not _splittable(path):
        return [Unit(first_index, path, sha256_file(path), 0, size, True, [Slice(0, size, 1)])]
    sep = "line" if corpus.data_format(path) == "jsonl" else doc_sep
    with open(path, "rb") as f:
        unit_bounds = _boundaries(f, 0, size, unit_bytes, sep)
        slice_bounds = [_boundaries(f, a, b, min(slice_bytes, unit_bytes), sep)
                        for a, b in zip(unit_bounds, unit_bounds[1:])]
        starts = sorted({s for bounds in slice_bounds for s in bounds[:-1]})
        line_at: Dict[int, int] = {}
        h, pos, newlines, i = hashlib.sha256(), 0, 0, 0
        f.seek(0)
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            end = pos + len(chunk)
            while i < len(starts) and starts[i] < end:
                line_at[starts[i]] = newlines + chunk.count(b"\n", 0, starts[i] - pos) + 1
                i += 1
            newlines += chunk.count(b"\n")
            h.update(chunk)
            pos = end
    sha = h.hexdigest()
    units = []
    for k, bounds in enumerate(slice_bounds):
        slices = [Slice(a, b, line_at[a]) for a, b in zip(bounds, bounds[1:])]
        units.append(Unit(first_index + k, path, sha, bounds[0], bounds[-1], False, slices))
    return units



# ---------------------------------------------------------------------------------------------------
# The validation split: by document, the same on every run and machine


def validation_threshold(ratio: float) -> int:
    """Documents whose 64-bit text hash is below this go to validation (0: no validation split)."""
    return int(ratio * (1 << 64)) if ratio > 0 else 0


def is_validation_doc(text: str, ratio: float) -> bool:
    """The document-level split: a 64-bit hash of the UTF-8 text below ratio * 2^64."""
    return hash64(text) < validation_threshold(ratio)


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
