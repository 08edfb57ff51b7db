"""Columnar files as text and records: parquet, and Arrow files (the IPC stream `datasets` writes with
`save_to_disk`, or the IPC file format, Feather v2).

A columnar file is read in its own blocks: a parquet row group, an Arrow record batch. `data pack` cuts
a file into work units on block boundaries (`blocks`), and a worker reads one unit's rows
(`iter_texts`) at most `BATCH_ROWS` rows at a time: memory is one batch (for parquet, the pages of a row
group's column being read), never the file. Arrow files are memory-mapped, so any row range is read
without reading the rows before it.

The text column must hold strings: a missing column, or a column of another type, is one line naming
the file and the column. A null cell is counted and skipped like a JSON line without its text field
(with `strict`, one line naming its row); a cell longer than `max_line` bytes is refused naming its row.
Rows are counted from 0 within their file, as `Dataset[i]` and pandas count them.

pyarrow (a dependency of `datasets`) is imported only when a columnar file is read, so commands on
text stay light. A pyarrow older than `PYARROW_FLOOR` is refused before any file is opened: its readers
unpickle a type a file's schema names, so reading a stranger's file could run code.
"""

import contextlib
import functools
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from .errors import InputError
from .inputfile import MAX_LINE_BYTES, too_long
from .versions import check_versions

PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
COLUMNAR_SUFFIXES = PARQUET_SUFFIXES + ARROW_SUFFIXES
BATCH_ROWS = 1024               # rows converted to Python at a time
_ARROW_FILE_MAGIC = b"ARROW1"   # the IPC file format starts with it; the stream format does not
PYARROW_FLOOR = {"pyarrow": ("14.0.1", "older releases unpickle the extension type an Arrow or parquet file names "
                                       "(CVE-2023-47248): reading a file could run code")}


def kind(path) -> Optional[str]:
    """'parquet', 'arrow' or None, from the file name."""
    name = str(path).lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(ARROW_SUFFIXES):
        return "arrow"
    return None


@functools.lru_cache(maxsize=None)
def check_pyarrow() -> None:
    """A VersionError (one line) when the installed pyarrow is older than PYARROW_FLOOR; asked once."""
    check_versions(PYARROW_FLOOR)


@contextlib.contextmanager
def read_errors(path):
    """A file pyarrow cannot read (not parquet/Arrow, cut short, corrupt), noticed while opening or
    reading it, as one line naming the file."""
    import pyarrow as pa
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        what = "parquet" if kind(path) == "parquet" else "Arrow"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(path, f"not a readable {what} file ({first})") from None


class ColumnarFile:
    """One parquet or Arrow file: its schema, its blocks, and batches of a row range."""

    def __init__(self, path):
        check_pyarrow()
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.path = Path(path)
        self.kind = kind(path)
        with read_errors(self.path):
            if self.kind == "parquet":
                self._pf = pq.ParquetFile(str(self.path), memory_map=True)
                self.schema = self._pf.schema_arrow
                meta = self._pf.metadata
                self.block_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            else:
                source = pa.memory_map(str(self.path))
                if source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC:
                    source.seek(0)
                    reader = pa.ipc.open_file(source)
                    self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                else:
                    source.seek(0)
                    reader = pa.ipc.open_stream(source)
                    self._batches = list(reader)     # zero-copy: the batches point into the mapping
                self.schema = reader.schema
                self.block_rows = [b.num_rows for b in self._batches]

    @property
    def num_rows(self) -> int:
        return sum(self.block_rows)

    def check_text_column(self, field: str) -> None:
        """Refuse a missing text column, or one that does not hold strings, naming the file and column."""
        names = self.schema.names
        if field not in names:
            raise InputError(self.path, f"no column '{field}' (columns: {', '.join(names) or 'none'}; "
                                        "name the text column with --text-field)")
        problem = text_type_problem(self.schema.field(field).type)
        if problem:
            raise InputError(self.path, f"column '{field}' {problem}; name a text column with --text-field")

    def block_text_bytes(self, field: str) -> List[int]:
        """Bytes of the text column per block (parquet: uncompressed size from the metadata; Arrow:
        the strings' lengths), to cut units of about --unit-mb of text."""
        import pyarrow.compute as pc
        with read_errors(self.path):
            if self.kind == "parquet":
                meta = self._pf.metadata
                out = []
                for g in range(meta.num_row_groups):
                    rg = meta.row_group(g)
                    out.append(sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                                   if rg.column(j).path_in_schema == field))
                return out
            return [int(pc.sum(pc.binary_length(_plain(b.column(field)))).as_py() or 0)
                    for b in self._batches]

    def batches(self, start: int = 0, end: Optional[int] = None,
                columns: Optional[List[str]] = None) -> Iterator[Tuple[int, "object"]]:
        """(first row, record batch) covering rows [start, end) in order, at most BATCH_ROWS rows each."""
        end = self.num_rows if end is None else end
        row = 0
        with read_errors(self.path):
            for b, n in enumerate(self.block_rows):
                lo, hi = max(start, row), min(end, row + n)
                if lo < hi:
                    yield from self._block_batches(b, row, lo, hi, columns)
                row += n
                if row >= end:
                    return

    def _block_batches(self, b: int, first: int, lo: int, hi: int, columns):
        if self.kind == "parquet":
            at = first
            for batch in self._pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[b], columns=columns,
                                               use_threads=False):
                a, z = max(lo, at), min(hi, at + batch.num_rows)
                if a < z:
                    yield a, batch.slice(a - at, z - a)
                at += batch.num_rows
                if at >= hi:
                    return
            return
        batch = self._batches[b]
        if columns is not None:
            batch = batch.select(columns)
        for a in range(lo, hi, BATCH_ROWS):
            yield a, batch.slice(a - first, min(BATCH_ROWS, hi - a))


def text_type_problem(dtype) -> Optional[str]:
    """Why a column of this Arrow type is not text (None when it holds strings)."""
    import pyarrow as pa
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return None
    return f"holds {dtype} values, not strings"


def _plain(column):
    """A string column as plain (large) strings: dictionary-encoded and string views decoded."""
    import pyarrow as pa
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())
    return column


def iter_texts(path, field: str = "text", start: int = 0, end: Optional[int] = None, *, strict=False,
               stats=None, max_line: int = MAX_LINE_BYTES, source: Optional[ColumnarFile] = None) -> Iterator[str]:
    """The documents of rows [start, end) of a columnar file: the `field` column's non-empty strings.

    `stats` (a `corpus.CorpusStats`) counts documents, bytes, empty documents and null cells (as
    `missing_field`, the first few noted with their row); with `strict` a null cell is an InputError
    naming its row. A cell longer than `max_line` bytes is always refused, before it is converted."""
    import pyarrow.compute as pc
    f = source or ColumnarFile(path)
    f.check_text_column(field)
    for first, batch in f.batches(start, end, [field]):
        column = _plain(batch.column(0))
        lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy()
        over = np.flatnonzero(lengths > max_line)
        if len(over):
            raise too_long(f.path, f"row {first + int(over[0])}", max_line, unit="text")
        nulls = column.is_null().to_numpy(zero_copy_only=False)
        for i, text in enumerate(_to_python(column, f.path, first, strict, stats)):
            if text is None and not nulls[i]:    # not UTF-8: counted by _to_python
                continue
            text = check_text(text, int(lengths[i]), f.path, first + i, field, strict=strict, stats=stats,
                              max_line=max_line)
            if text is not None:
                yield text


def check_text(text: Optional[str], size: int, path, row: int, field: str, *, strict=False, stats=None,
               max_line: int = MAX_LINE_BYTES) -> Optional[str]:
    """The document in one cell (`size` bytes of UTF-8), or None when there is none: a null cell (counted
    in `stats.missing_field`, its row noted; an InputError naming the row with `strict`) or a blank one
    (counted as empty). A cell longer than `max_line` bytes is an InputError naming its row."""
    where = f"row {row}"
    if text is None:
        problem = f"column '{field}' is null (no text)"
        if strict:
            raise InputError(path, problem, where)
        if stats is not None:
            stats.missing_field += 1
            stats.note(f"{path}:{where}: {problem}")
        return None
    if size > max_line:
        raise too_long(path, where, max_line, unit="text")
    if not text.strip():
        if stats is not None:
            stats.empty += 1
        return None
    if stats is not None:
        stats.documents += 1
        stats.bytes += size
    return text


def _to_python(column, path, first: int, strict, stats) -> list:
    """The column's strings (None for nulls). Strings that are not UTF-8 (a parquet writer need not check)
    become None, counted as undecodable, or raise with `strict`."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    out = []
    for i in range(len(column)):
        try:
            out.append(column[i].as_py())
        except UnicodeDecodeError as e:
            problem = f"not valid UTF-8 ({e.reason} at byte {e.start})"
            if strict:
                raise InputError(path, problem, f"row {first + i}") from None
            if stats is not None:
                stats.bad_utf8 += 1
                stats.note(f"{path}:row {first + i}: {problem}")
            out.append(None)
    return out


def iter_rows(path, start: int = 0, end: Optional[int] = None) -> Iterator[Tuple[int, dict]]:
    """(row number, row as a dict without its null fields) of a columnar file: instruction records.
    A null is an absent field (Arrow fills a field that some rows lack with nulls)."""
    f = ColumnarFile(path)
    for first, batch in f.batches(start, end):
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError as e:
            raise InputError(f.path, f"not valid UTF-8 ({e.reason}) in rows {first}-"
                                     f"{first + batch.num_rows - 1}") from None
        for i, row in enumerate(rows):
            yield first + i, drop_nulls(row)


def drop_nulls(value):
    """`value` with the null (None) entries of its mappings removed, at any depth."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value
