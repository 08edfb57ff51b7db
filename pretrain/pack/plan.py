"""Planning: inputs -> work units (one shard each) -> slices (one worker task each), cut on document
boundaries; and the validation split, decided per document by a hash of its text.

How each kind of input maps onto units, deterministically from its content (so a pack resumes):
  * a txt / jsonl file: byte ranges of about --unit-mb on document boundaries, each cut into slices of
    about --slice-mb for the workers (`reader="text"`);
  * a .gz file: one unit, one slice, read whole by one worker (`whole`);
  * a parquet or Arrow file (a saved dataset is its split's Arrow files): row ranges of about --unit-mb
    of text, cut on the file's own blocks (parquet row groups, Arrow record batches, never split), and
    slices of about --slice-mb of them; a unit with a block larger than BIG_BLOCK slices is one slice,
    read by one worker that writes the unit's shard itself (memory: one batch of rows) (`reader="rows"`);
  * a Hub dataset: one unit per shard of its stream, at the commit it was resolved to (`reader="hub"`).
"""

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from zhllama import corpus
from zhllama.columnar import ColumnarFile
from zhllama.fsutil import sha256_file
from zhllama.hfdatasets import HubDataset

READ_CHUNK = 8 << 20          # bytes per read when hashing inputs
BLANK_CAP = 1 << 16           # a line longer than this is not looked at whole: it is not blank
BIG_BLOCK = 4                 # a row group / record batch of more slices' text: its unit is written by one worker


@dataclass
class Slice:
    """A byte range of a unit sent to one worker, and the line number it starts at (for error messages).
    `nbytes`: the input bytes it stands for in the progress line, where start/end are not bytes."""
    start: int
    end: int
    first_line: int
    nbytes: Optional[int] = None

    @property
    def size(self) -> int:
        return self.end - self.start if self.nbytes is None else self.nbytes


@dataclass
class Unit:
    """A range of one input that becomes one shard per split: bytes of a txt/jsonl file, the whole of a
    .gz file, rows of a columnar file, a shard of a Hub dataset's stream (see the module's docstring)."""
    index: int            # position in the whole plan (input order, then file offset)
    path: Union[Path, HubDataset]
    sha256: str           # of the file; a Hub dataset's commit
    start: int
    end: int
    whole: bool           # one slice, read by one worker that writes the unit's shard itself
    slices: List[Slice] = field(default_factory=list)
    reader: str = "text"  # "text" (byte ranges or whole), "rows" (columnar), "hub"

    @property
    def uid(self) -> str:
        if self.reader == "text":
            key = f"{os.path.realpath(self.path)}\0{self.sha256}\0{self.start}\0{self.end}"
        else:
            key = f"{source_key(self.path)}\0{self.sha256}\0{self.reader}\0{self.start}\0{self.end}"
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]

    @property
    def name(self) -> str:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.path.name)[:48]
        return f"{stem}-{self.start:012d}-{self.uid}"

    @property
    def size(self) -> int:
        """Input bytes, for the progress line."""
        return sum(s.size for s in self.slices)


def source_key(source) -> str:
    """What names an input in progress records and the manifest: a file's real path, a Hub dataset's key."""
    return source.key if isinstance(source, HubDataset) else os.path.realpath(source)


def _splittable(path: Path) -> bool:
    return not corpus.is_columnar(path) and not str(path).lower().endswith(".gz")


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


def plan_source(source, first_index: int, unit_bytes: int, slice_bytes: int, doc_sep: str,
                text_field: str = "text") -> List[Unit]:
    """The units of one input: a file (`plan_file`, `plan_columnar`) or a resolved Hub dataset."""
    if isinstance(source, HubDataset):
        return [Unit(first_index + k, source, source.revision, k, k + 1, True, [Slice(k, k + 1, 0, 0)], "hub")
                for k in range(source.shards)]
    if corpus.is_columnar(source):
        return plan_columnar(source, first_index, unit_bytes, slice_bytes, text_field)
    return plan_file(source, first_index, unit_bytes, slice_bytes, doc_sep)


def plan_columnar(path: Path, first_index: int, unit_bytes: int, slice_bytes: int, text_field: str) -> List[Unit]:
    """Row ranges of a parquet/Arrow file holding about `unit_bytes` of text each, cut on the file's
    blocks (row groups, record batches), and slices of about `slice_bytes` within them, as for text. A
    unit holding a block larger than BIG_BLOCK slices is one slice that its worker writes itself (a
    block is never split, and a 1 GB row group must not come back through memory). Progress counts the
    file's bytes in proportion to the text."""
    f = ColumnarFile(path)
    f.check_text_column(text_field)
    sha, size = sha256_file(path), os.path.getsize(path)
    text = f.block_text_bytes(text_field)
    total = sum(text)

    def share(done: int) -> int:
        return size if done >= total else size * done // total

    units: List[Unit] = []
    row = done = 0                                    # rows and text bytes before the current block
    for group in _groups(list(zip(f.block_rows, text)), unit_bytes):
        whole = max(n for _, n in group) > BIG_BLOCK * slice_bytes
        slices = []
        for part in ([group] if whole else _groups(group, slice_bytes)):
            rows, nbytes = sum(r for r, _ in part), sum(n for _, n in part)
            slices.append(Slice(row, row + rows, row, share(done + nbytes) - share(done)))
            row, done = row + rows, done + nbytes
        units.append(Unit(first_index + len(units), path, sha, slices[0].start, slices[-1].end, whole,
                          slices, "rows"))
    if not units:                                     # a file without rows: one empty unit
        units.append(Unit(first_index, path, sha, 0, 0, True, [Slice(0, 0, 0, size)], "rows"))
    return units


def _groups(blocks: List[Tuple[int, int]], target: int) -> List[List[Tuple[int, int]]]:
    """Consecutive (rows, text bytes) blocks grouped until a group holds `target` bytes of text."""
    groups, current, acc = [], [], 0
    for block in blocks:
        current.append(block)
        acc += block[1]
        if acc >= target:
            groups.append(current)
            current, acc = [], 0
    if current:
        groups.append(current)
    return groups


def plan_file(path: Path, first_index: int, unit_bytes: int, slice_bytes: int, doc_sep: str) -> List[Unit]:
    """Units and slices of one txt/jsonl file, with each slice's first line number, and the file's sha256.
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
