"""Reading text corpora: files, directories and globs of txt / jsonl (optionally .gz) and parquet / arrow,
and datasets saved with `save_to_disk` (their split's Arrow files).

Shared by `vocab train`, `vocab report`, `data pack` and `eval`; `parse_weighted_spec` reads the
`path:weight` form that SFT data and a pretraining mixture both take. Every problem names its file (and
line): a missing path, a glob that matches nothing, a FIFO, device or broken link (`inputfile`), an
empty or binary file, undecodable bytes, a line longer than `max_line` bytes, a JSON line that is not
an object or lacks the text field. Bad lines are counted and skipped, or raise with `strict=True`; a
line too long is always refused (reading it would cost memory without bound). A UTF-8 BOM at the start
of a file is skipped. Columnar files (parquet, Arrow) are read by `columnar`, saved datasets and `hf://`
Hub names resolved by `hfdatasets`.
"""

import contextlib
import glob
import gzip
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from . import columnar, hfdatasets
from .errors import ConfigError, InputError
from .inputfile import BOM, MAX_LINE_BYTES, check_input_entry, check_input_file, read_lines, too_long

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + columnar.COLUMNAR_SUFFIXES
_GLOB_CHARS = set("*?[")
# A lone surrogate ("\ud800" in JSON) is not a character: no encoder (UTF-8, SentencePiece) takes it.
_SURROGATES = re.compile("[\ud800-\udfff]")
# What a cut-short or corrupt .gz raises mid-stream.
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


@dataclass
class CorpusStats:
    """Counts of what was read and what was skipped, per reason."""
    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty: int = 0
    bad_utf8: int = 0
    bad_json: int = 0
    missing_field: int = 0
    first_problems: List[str] = field(default_factory=list)

    def skipped(self) -> int:
        return self.bad_utf8 + self.bad_json + self.missing_field

    def note(self, message: str) -> None:
        if len(self.first_problems) < 5:
            self.first_problems.append(message)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def data_format(path) -> str:
    """'text', 'jsonl', 'parquet' or 'arrow' from the file name (a trailing .gz is looked through)."""
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSON_SUFFIXES):
        return "jsonl"
    return columnar.kind(name) or "text"


def parse_weighted_spec(spec) -> Tuple[str, Optional[float]]:
    """"path:weight" -> (path, weight); a plain path (or one whose tail after ':' is no number) -> (path, None)."""
    spec = str(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"data spec '{spec}': weight must be a number >= 0")
        return head, weight
    return spec, None


def is_columnar(path) -> bool:
    """A parquet or Arrow file: read by rows (`columnar`), not by lines."""
    return data_format(path) in ("parquet", "arrow")


def expand_inputs(specs, split: str = "train") -> List[Path]:
    """Files named directly, the known-format files under directories (recursively, sorted), glob
    matches (sorted), and the Arrow files of a dataset saved with `save_to_disk` (of its split `split`
    if it is a DatasetDict). Order is deterministic; duplicates are dropped. A `hf://` Hub name is
    refused: only `expand_sources` keeps it."""
    return _expand(specs, split, hub=False)


def expand_sources(specs, split: str = "train") -> list:
    """`expand_inputs`, with each `hf://` Hub name kept in its place as an (unresolved)
    `hfdatasets.HubDataset` of split `split`: the inputs of `data pack` and SFT data."""
    return _expand(specs, split, hub=True)


def _expand(specs, split: str, hub: bool) -> list:
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    out, seen = [], set()

    def add(p):
        key = p.key if isinstance(p, hfdatasets.HubDataset) else os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    for spec in specs:
        if hfdatasets.is_hub_spec(spec):
            if not hub:
                raise InputError(spec, "a Hub dataset is read by `data pack` and SFT data only; save it "
                                       "(load_dataset(...).save_to_disk(DIR)) and give DIR here")
            add(hfdatasets.parse_hub_spec(spec, split))
            continue
        spec = str(spec)
        if hfdatasets.is_saved_dataset(spec):
            for f in hfdatasets.saved_dataset_files(spec, split):
                add(check_input_file(f))
        elif _GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            for m in matches:
                check_input_entry(m)
            files = [Path(m) for m in matches if os.path.isfile(m)]
            if not files:
                raise InputError(spec, "glob matches no file")
            for f in files:
                add(f)
        elif os.path.isdir(spec):
            files = sorted(
                Path(root) / name
                for root, _, names in os.walk(spec)
                if not _saved_dataset_inside(root)
                for name in names
                if not name.startswith(".")
                and name.lower().removesuffix(".gz").endswith(KNOWN_SUFFIXES))
            if not files:
                raise InputError(spec, f"directory holds no {'/'.join(KNOWN_SUFFIXES)} file")
            for f in files:
                add(check_input_file(f))
        elif os.path.isfile(spec):
            add(check_input_file(spec))
        elif os.path.lexists(spec) or os.path.islink(spec):
            add(check_input_file(spec))      # raises: says what it is instead of "no such file"
        else:
            raise InputError(spec, "no such file or directory")
    return out


def _saved_dataset_inside(folder) -> bool:
    """Refuse a saved dataset met while walking a folder: its state.json is no corpus, and a
    DatasetDict's splits would all be read."""
    if hfdatasets.is_saved_dataset(folder):
        raise InputError(folder, "is a dataset saved with save_to_disk, inside a folder given as input; "
                                 "give it as an input of its own (its split is chosen with --split)")
    return False


def _open_binary(path: Path):
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


@contextlib.contextmanager
def gzip_errors(path):
    """Turn a truncated or corrupt .gz, noticed while reading it, into one line naming the file."""
    try:
        yield
    except GZIP_ERRORS as e:
        raise InputError(path, f"truncated or corrupt gzip stream ({e or type(e).__name__}); "
                               "re-download or re-compress the file") from None


def check_readable(path: Path, text_field: Optional[str] = None) -> None:
    """Refuse what is not a regular readable file, and empty and binary files, up front, with the
    file's name; and a parquet/Arrow file without a `text_field` column of strings."""
    check_input_file(path)
    if os.path.getsize(path) == 0:
        raise InputError(path, "file is empty")
    if is_columnar(path):
        if str(path).lower().endswith(".gz"):
            raise InputError(path, "a compressed parquet/Arrow file is not read (the format compresses "
                                   "itself); decompress it")
        if text_field is not None:
            columnar.ColumnarFile(path).check_text_column(text_field)
        return
    try:
        with gzip_errors(path), _open_binary(path) as f:
            head = f.read(8192)
    except OSError as e:
        raise InputError(path, f"cannot read: {e}") from None
    if not head.removeprefix(BOM).strip():
        raise InputError(path, "file holds no text")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise InputError(path, f"looks like a binary file (NUL byte at offset {nul}), not text")


def _decode(raw: bytes, path, lineno, strict, stats) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"
        if strict:
            raise InputError(path, f"not valid UTF-8 ({e.reason} at byte {e.start}); "
                                   "convert the file to UTF-8 (e.g. iconv -f GBK -t UTF-8)", lineno) from None
        stats.bad_utf8 += 1
        stats.note(msg)
        return None


def iter_lines(path: Path, strict=False, stats: Optional[CorpusStats] = None,
               max_line: int = MAX_LINE_BYTES) -> Iterator[tuple]:
    """(line number, decoded line without newline) for each decodable line; a line longer than
    `max_line` bytes is an InputError naming it."""
    stats = stats if stats is not None else CorpusStats()
    with gzip_errors(path), _open_binary(path) as f:
        for lineno, raw in read_lines(f, path, max_line):
            stats.bytes += len(raw)
            text = _decode(raw, path, lineno, strict, stats)
            if text is not None:
                yield lineno, text.rstrip("\r\n")


def iter_documents(path, *, text_field="text", doc_sep="line", strict=False,
                   stats: Optional[CorpusStats] = None, max_line: int = MAX_LINE_BYTES) -> Iterator[str]:
    """Documents of one file.

    text: one document per line (`doc_sep="line"`) or blank-line separated paragraphs
    (`doc_sep="blank"`); jsonl: the `text_field` of each JSON object; parquet, Arrow: the `text_field`
    column (`columnar.iter_texts`). Empty documents are counted and skipped. A line, a paragraph or a
    cell longer than `max_line` bytes is refused.
    """
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    check_readable(path)
    stats.files += 1
    kind = data_format(path)
    if is_columnar(path):
        yield from columnar.iter_texts(path, text_field, strict=strict, stats=stats, max_line=max_line)
        return
    docs_before, bad_before = stats.documents, stats.bad_utf8
    yield from _split_documents(iter_lines(path, strict, stats, max_line), path, kind, text_field,
                                doc_sep, strict, stats, max_line)
    if stats.documents == docs_before and stats.bad_utf8 > bad_before:
        raise InputError(path, f"not UTF-8 text: none of its lines decodes ({stats.bad_utf8 - bad_before} "
                               "undecodable); convert the file to UTF-8 (e.g. iconv -f GBK -t UTF-8)")


def iter_lines_range(path, start: int, end: int, first_line: int = 1, strict=False,
                     stats: Optional[CorpusStats] = None, chunk_bytes: int = 4 << 20,
                     max_line: int = MAX_LINE_BYTES) -> Iterator[tuple]:
    """(line number, decoded line) for the lines of the byte range [start, end) of an uncompressed
    file; `start` must be a line start and `end` a line start or the end of the file, `first_line`
    the line number at `start`. Lets several workers read one large file without reading its prefix.

    Same lines, numbers and skips as `iter_lines`, but faster: the range is read and decoded in
    chunks of whole lines (UTF-8 never holds a newline byte inside a character), falling back to
    line-by-line decoding only for a chunk that holds undecodable bytes. Memory: one chunk, or one
    line of at most `max_line` bytes (a longer one is an InputError naming it)."""
    stats = stats if stats is not None else CorpusStats()
    lineno = first_line
    with open(path, "rb") as f:
        f.seek(start)
        pos, pending = start, b""
        while pos < end:
            chunk = f.read(min(end - pos, chunk_bytes))
            if not chunk:
                break
            read = len(chunk)
            if pos == 0 and chunk.startswith(BOM):  # the file's BOM: not content
                chunk = chunk[len(BOM):]
            pos += read
            data = pending + chunk
            pending = b""
            if pos < end:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    if len(data) > max_line:
                        raise too_long(path, lineno, max_line)
                    pending = data
                    continue
                data, pending = data[:cut], data[cut:]
                if len(pending) > max_line:
                    raise too_long(path, lineno + data.count(b"\n"), max_line)
            if len(data) > max_line:
                _check_line_lengths(data, path, lineno, max_line)
            stats.bytes += len(data)
            try:
                lines = data.decode("utf-8").split("\n")
            except UnicodeDecodeError:
                raws = data.split(b"\n")
                if data.endswith(b"\n"):
                    raws.pop()
                for raw in raws:
                    text = _decode(raw, path, lineno, strict, stats)
                    if text is not None:
                        yield lineno, text.rstrip("\r\n")
                    lineno += 1
                continue
            if data.endswith(b"\n"):
                lines.pop()
            if b"\r" in data:
                lines = [line.rstrip("\r") for line in lines]
            yield from zip(range(lineno, lineno + len(lines)), lines)
            lineno += len(lines)
        if pending:  # a last line longer than the chunk, without a newline
            if len(pending) > max_line:
                raise too_long(path, lineno, max_line)
            stats.bytes += len(pending)
            text = _decode(pending, path, lineno, strict, stats)
            if text is not None:
                yield lineno, text.rstrip("\r\n")


def _check_line_lengths(data: bytes, path, first_line: int, max_line: int) -> None:
    """Refuse the first line of `data` (whole lines) longer than `max_line` bytes, by its number."""
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 0x0A)
    lengths = np.diff(np.concatenate([[-1], ends, [len(data)]])) - 1
    over = np.flatnonzero(lengths > max_line)
    if len(over):
        raise too_long(path, first_line + int(over[0]), max_line)


def iter_documents_range(path, start: int, end: int, first_line: int = 1, *, text_field="text",
                         doc_sep="line", strict=False, stats: Optional[CorpusStats] = None,
                         max_line: int = MAX_LINE_BYTES) -> Iterator[str]:
    """Documents of the byte range [start, end) of an uncompressed txt/jsonl file, split exactly as
    `iter_documents` splits the whole file (the range must start and end on a document boundary:
    a line start, or after a blank line with `doc_sep="blank"`). Does not count the file in
    `stats.files` (a file read in several ranges is still one file)."""
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    kind = data_format(path)
    if is_columnar(path) or str(path).lower().endswith(".gz"):
        raise ValueError(f"{path}: byte ranges need an uncompressed text or JSON-lines file")
    lines = iter_lines_range(path, start, end, first_line, strict, stats, max_line=max_line)
    yield from _split_documents(lines, path, kind, text_field, doc_sep, strict, stats, max_line)


def _split_documents(lines, path, kind, text_field, doc_sep, strict, stats,
                     max_line: int = MAX_LINE_BYTES) -> Iterator[str]:
    """Documents from (line number, line) pairs: JSON objects' text fields, one line each, or
    blank-line separated paragraphs (at most `max_line` bytes each). Empty documents are counted and
    skipped."""
    if kind == "jsonl":
        for lineno, line in lines:
            if not line.strip():
                continue
            text = _json_text(line, path, lineno, text_field, strict, stats)
            if text is None:
                continue
            if not text.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            yield text
        return
    if doc_sep == "line":
        for _, line in lines:
            if not line.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            yield line
    elif doc_sep == "blank":
        para: List[str] = []
        size = first = 0
        for lineno, line in lines:
            if line.strip():
                if not para:
                    size, first = 0, lineno
                size += len(line.encode("utf-8")) + 1
                if size > max_line:
                    raise too_long(path, first, max_line, unit="paragraph (from this line to the next blank line)")
                para.append(line)
            elif para:
                stats.documents += 1
                yield "\n".join(para)
                para = []
        if para:
            stats.documents += 1
            yield "\n".join(para)
    else:
        raise ValueError(f"doc_sep must be 'line' or 'blank', not {doc_sep!r}")


def _json_text(line, path, lineno, text_field, strict, stats) -> Optional[str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e.msg} at column {e.colno})"
        counter = "bad_json"
    except RecursionError:
        problem, counter = "JSON nested too deeply to read", "bad_json"
    else:
        if not isinstance(obj, dict):
            problem, counter = f"JSON line is a {type(obj).__name__}, not an object", "bad_json"
        elif text_field not in obj:
            problem, counter = f"JSON object has no field '{text_field}' (use --text-field)", "missing_field"
        elif not isinstance(obj[text_field], str):
            problem = f"field '{text_field}' is a {type(obj[text_field]).__name__}, not a string"
            counter = "bad_json"
        elif _SURROGATES.search(obj[text_field]):
            problem = f"field '{text_field}' holds a lone surrogate escape (e.g. \\ud800), not text"
            counter = "bad_json"
        else:
            return obj[text_field]
    if strict:
        raise InputError(path, problem, lineno)
    setattr(stats, counter, getattr(stats, counter) + 1)
    stats.note(f"{path}:{lineno}: {problem}")
    return None


def iter_corpus(specs, **kwargs) -> Iterator[str]:
    """Documents of all inputs, in `expand_inputs` order."""
    for path in expand_inputs(specs):
        yield from iter_documents(path, **kwargs)


def total_size(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


def read_json_records(path, what: str = "input file", max_record: int = MAX_LINE_BYTES,
                      flag: str = "--max-record-mb") -> list:
    """(where, value) for each item of a JSON array file or each line of a JSON-lines file.

    `where` is the line number (JSON lines) or "record N" (array), for `InputError(path, msg, where)`.
    For small files whose records are all kept (seed tasks, instruction sets to translate); corpora
    stream instead. A record (a line, or an array element as JSON) longer than `max_record` bytes is
    refused naming it.
    """
    path = Path(path)
    check_input_file(path, what)
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(BOM)
    if head.lstrip().startswith(b"["):
        text = _read_utf8(path)
        try:
            items = [(f"record {i}", obj) for i, obj in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise InputError(path, f"invalid JSON: {e.msg}", e.lineno) from None
        except RecursionError:
            raise InputError(path, "JSON nested too deeply to read") from None
        for where, obj in items:
            if len(json.dumps(obj, ensure_ascii=False).encode("utf-8")) > max_record:
                raise too_long(path, where, max_record, unit="record", flag=flag)
        return _refuse_surrogates(path, items)
    items = []
    with open(path, "rb") as f:
        for lineno, raw in read_lines(f, path, max_record, flag):
            line = _decode(raw, path, lineno, True, None)
            if line.strip():
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(path, f"invalid JSON ({e.msg} at column {e.colno})", lineno) from None
                except RecursionError:
                    raise InputError(path, "JSON nested too deeply to read", lineno) from None
    return _refuse_surrogates(path, items)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def _refuse_surrogates(path, items) -> list:
    """A lone surrogate escape ("\\ud800") decodes to a str no encoder accepts: refuse it here, by line."""
    for where, value in items:
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                if _SURROGATES.search(v):
                    raise InputError(path, "lone surrogate escape (half of a UTF-16 pair, not a character)", where)
            elif isinstance(v, dict):
                stack.extend(v.keys())
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    return items
