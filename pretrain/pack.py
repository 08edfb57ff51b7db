"""Tokenize a corpus and pack it into fixed-length token blocks for pretraining.

Every document becomes BOS + ids + EOS (a tokenizer.json tokenizer: its own BOS/EOS from
tokenizer_config.json, ids + EOS when it has no BOS); documents are concatenated and cut into blocks of exactly
--block-size tokens (blocks span document boundaries, as the group_texts step of HF run_clm does).
The result is a directory of uint16/uint32 token shards, an index and a manifest (tokenizer
fingerprint, block size, sources with sizes and sha256, counts) that `zhllama train` memory-maps.

How it stays fast, bounded and safe:
  * Inputs are cut into work units (--unit-mb of text, on document boundaries; a .gz or parquet file is
    one unit) and units into ~1 MB slices that worker processes tokenize with SentencePiece. Memory
    is bounded by the slices in flight, whatever the corpus size.
  * Each unit becomes one shard, written to a temp name, renamed when complete, and recorded in
    progress.jsonl. An interrupted pack resumes with the units that are not recorded.
  * The tokens after a unit's last full block go, in unit order, into one tail shard per split, so the
    corpus loses only one final partial block per split (counted in the manifest).
  * manifest.json is written last, atomically. Re-running with the same tokenizer, options and
    unchanged input files does nothing; a changed input re-packs only that file's units.
  * The validation split is by document: a hash of the document's text decides, so it is the same on
    every run and machine, and identical documents never straddle train and validation.

examples:
  zhllama data pack --tokenizer out/merged --input corpus/ --block-size 512 --out data/packed
  zhllama data pack --tokenizer out/merged --input 'web/*.jsonl.gz' --text-field content \\
      --out data/web --workers 16 --validation-ratio 0.001
"""

import array
import hashlib
import json
import os
import re
import shutil
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from zhllama import __version__, bpe, corpus
from zhllama.bpe import is_bpe_json_base
from zhllama.errors import InputError, UserError
from zhllama.fsutil import atomic_write_json, atomic_write_text, check_output_path, make_dirs, sha256_file
from zhllama.log import Progress, get_logger

from . import shards as fmt

log = get_logger("zhllama.pack")

READ_CHUNK = 8 << 20          # bytes per read when hashing inputs
ENCODE_BATCH_CHARS = 1 << 20  # characters per sentencepiece call inside a worker


def add_arguments(parser) -> None:
    parser.add_argument("--tokenizer", required=True,
                        help="SentencePiece tokenizer: a .model file or a dir with tokenizer.model "
                             "(e.g. the output of `zhllama vocab merge`); or a HF tokenizer.json (a dir "
                             "with one and no tokenizer.model: LLaMA-3, SmolLM2), BOS/EOS from its "
                             "tokenizer_config.json")
    parser.add_argument("--input", required=True, nargs="+", metavar="F",
                        help="text inputs: files, directories, globs; .txt (one document per line, or "
                             "see --doc-sep), .jsonl (see --text-field), .parquet, optionally .gz")
    parser.add_argument("--out", required=True, help="output directory for shards, index and manifest")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per block (default 512)")
    parser.add_argument("--workers", type=int, default=_default_workers(),
                        help="tokenizer processes (default: the CPUs available, %(default)s here)")
    parser.add_argument("--validation-ratio", type=float, default=0.001,
                        help="share of documents in the validation split, chosen by a hash of the "
                             "document's text (default 0.001; 0 for none)")
    parser.add_argument("--text-field", default="text",
                        help="field holding the text in JSON lines / column in parquet (default text)")
    parser.add_argument("--doc-sep", choices=("line", "blank"), default="line",
                        help="text files: one document per line (default) or blank-line separated "
                             "paragraphs")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first undecodable or malformed line instead of counting and "
                             "skipping it")
    parser.add_argument("--unit-mb", type=float, default=64.0,
                        help="text per work unit / shard in MB (default 64): the resume granularity")
    parser.add_argument("--slice-mb", type=float, default=1.0,
                        help="text per task sent to a worker in MB (default 1): the load-balancing "
                             "granularity; does not change the output")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a pack in --out that was built with another tokenizer or options")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------
# Tokenizer and settings


@dataclass
class Tokenizer:
    path: str
    model_file: Path
    fingerprint: str
    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    kind: str = "sentencepiece"   # or "tokenizers" (a tokenizer.json)


def load_json_tokenizer(path) -> Tokenizer:
    """A `tokenizer.json` tokenizer (byte-level BPE bases). BOS/EOS are the tokenizer's own, as
    transformers reads them (tokenizer_config.json bos_token/eos_token, else the post-processor's
    template); a base without BOS (GPT-2 style) packs documents as ids + EOS."""
    tok = bpe.load_tokenizer(path)
    bos, eos = bpe.special_ids(path, tok)
    if eos is None:
        raise UserError(f"{path}: the tokenizer defines no EOS token (eos_token in tokenizer_config.json); "
                        "pretraining blocks need one between documents")
    return Tokenizer(str(path), bpe.tokenizer_json_path(path), fmt.tokenizer_fingerprint(path),
                     tok.get_vocab_size(with_added_tokens=True), bos, eos, kind="tokenizers")


def load_tokenizer(path) -> Tokenizer:
    import sentencepiece as spm
    if is_bpe_json_base(path):
        return load_json_tokenizer(path)
    model_file = fmt.tokenizer_model_path(path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(model_file))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{model_file}: not a loadable SentencePiece model ({e})") from None
    bos, eos = sp.bos_id(), sp.eos_id()
    if bos < 0 or eos < 0:
        raise UserError(f"{model_file}: the model has no BOS/EOS piece (bos_id={bos}, eos_id={eos}); "
                        "pretraining blocks need both")
    return Tokenizer(str(path), model_file, fmt.tokenizer_fingerprint(path), sp.GetPieceSize(),
                     bos, eos)


def make_settings(args, tok: Tokenizer) -> dict:
    """Everything that changes the bytes of the output. Same settings + same inputs = same pack."""
    return {
        "format_version": fmt.FORMAT_VERSION,
        "tokenizer_fingerprint": tok.fingerprint,
        "block_size": args.block_size,
        "dtype": fmt.dtype_for_vocab(tok.vocab_size).str,
        "text_field": args.text_field,
        "doc_sep": args.doc_sep,
        "strict": bool(args.strict),
        "validation_ratio": args.validation_ratio,
        "unit_bytes": _mb(args.unit_mb),
        "document": "bos+ids+eos",
        "validation_hash": "blake2b-64(utf8 text) < ratio * 2^64",
    } | ({} if tok.kind == "sentencepiece" else {   # SentencePiece packs keep their settings (resume keys)
        "tokenizer_kind": tok.kind, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "document": "bos+ids+eos" if tok.bos_id is not None else "ids+eos"})


def _mb(x: float) -> int:
    return max(1, int(x * 1_000_000))


def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_args(args) -> None:
    if args.block_size < 2:
        raise UserError(f"--block-size must be at least 2, not {args.block_size}")
    if not 0.0 <= args.validation_ratio < 1.0:
        raise UserError(f"--validation-ratio must be in [0, 1), not {args.validation_ratio}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, not {args.workers}")
    if args.unit_mb <= 0 or args.slice_mb <= 0:
        raise UserError("--unit-mb and --slice-mb must be positive")


# ---------------------------------------------------------------------------------------------------
# Planning: files -> units -> slices, on document boundaries


@dataclass
class Slice:
    start: int
    end: int
    first_line: int


@dataclass
class Unit:
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


def _next_boundary(f, target: int, doc_sep: str) -> int:
    """The first document boundary at or after `target`: a line start, or after a blank line."""
    f.seek(target - 1)
    f.readline()                      # finish the line that holds byte target-1
    if doc_sep == "line":
        return f.tell()
    while True:
        line = f.readline()
        if not line or _is_blank(line):
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
# Worker side: documents -> token arrays

_W: dict = {}


def _init_worker(model_file: str, cfg: dict, pool: bool = True) -> None:
    _W.clear()  # an in-process (--workers 1) pack may follow one with another kind of tokenizer
    if cfg.get("tokenizer_kind") == "tokenizers":
        if pool:  # one thread per worker process: --workers is the parallelism, as for sentencepiece
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer
        tk = Tokenizer.from_file(model_file)
        tk.encode_special_tokens = True   # "<|endoftext|>" in a document is text, never a control token
        _W["tk"] = tk
    else:
        import sentencepiece as spm
        _W["sp"] = spm.SentencePieceProcessor(model_file=model_file)
    _W["cfg"] = cfg
    ratio = cfg["validation_ratio"]
    _W["threshold"] = int(ratio * (1 << 64)) if ratio > 0 else 0


def is_validation_doc(text: str, ratio: float) -> bool:
    """The document-level split: a 64-bit hash of the UTF-8 text below ratio * 2^64."""
    return _hash64(text) < int(ratio * (1 << 64))


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


_TYPECODES = {2: "H", 4: "I"}


def _flatten(ids: List[List[int]], dtype) -> np.ndarray:
    """Concatenate sentencepiece's lists of ids into one array (array.fromlist: the fastest way
    from Python ints to machine words, about 1.6x np.fromiter; overflow raises)."""
    buf = array.array(_TYPECODES[dtype.itemsize])
    for x in ids:
        buf.fromlist(x)
    return np.frombuffer(buf, dtype=dtype.newbyteorder("=")).astype(dtype, copy=False)


class _Sink:
    """Collects a task's tokens per split: in memory (byte-range slices, bounded by --slice-mb), or
    straight into the unit's temp files (a whole .gz/parquet file, which may be large)."""

    def __init__(self, dtype, paths: Optional[Dict[str, str]] = None):
        self.dtype = dtype
        self.arrays = {s: [] for s in fmt.SPLITS}
        self.tokens = {s: 0 for s in fmt.SPLITS}
        self.documents = {s: 0 for s in fmt.SPLITS}
        self.files = {s: open(p, "wb") for s, p in paths.items()} if paths else None

    def add(self, split: str, ids: List[List[int]]) -> None:
        if not ids:
            return
        arr = _flatten(ids, self.dtype)
        self.tokens[split] += len(arr)
        self.documents[split] += len(ids)
        if self.files is not None:
            arr.tofile(self.files[split])
        else:
            self.arrays[split].append(arr)

    def close(self) -> None:
        if self.files is not None:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()


def _encode_json(docs: List[str]) -> List[List[int]]:
    """BOS + ids + EOS per document with `tokenizers` (no post-processor: BOS/EOS by id, as configured)."""
    tk, cfg = _W["tk"], _W["cfg"]
    encode = getattr(tk, "encode_batch_fast", tk.encode_batch)  # no offsets (tokenizers >= 0.20)
    head = [cfg["bos_id"]] if cfg["bos_id"] is not None else []
    tail = [cfg["eos_id"]]
    return [head + e.ids + tail for e in encode(docs, add_special_tokens=False)]


def _encode_into(docs: List[str], sink: _Sink) -> None:
    if "tk" in _W:
        ids = _encode_json(docs)
    else:
        ids = _W["sp"].encode(docs, add_bos=True, add_eos=True, num_threads=1)
    threshold = _W["threshold"]
    if not threshold:
        sink.add("train", ids)
        return
    val = [_hash64(d) < threshold for d in docs]
    sink.add("train", [x for x, v in zip(ids, val) if not v])
    sink.add("validation", [x for x, v in zip(ids, val) if v])


def pack_task(task: dict) -> dict:
    """Tokenize one slice. Returns arrays (or the temp files written), counts and input stats; a bad
    input line under --strict comes back as an error record (InputError does not pickle)."""
    cfg = _W["cfg"]
    dtype = np.dtype(cfg["dtype"])
    stats = corpus.CorpusStats()
    sink = _Sink(dtype, task.get("write_to"))
    kw = dict(text_field=cfg["text_field"], doc_sep=cfg["doc_sep"], strict=cfg["strict"], stats=stats)
    try:
        if task["whole"]:
            docs = corpus.iter_documents(task["path"], **kw)
        else:
            docs = corpus.iter_documents_range(task["path"], task["start"], task["end"],
                                               task["first_line"], **kw)
        batch, chars = [], 0
        for doc in docs:
            batch.append(doc)
            chars += len(doc)
            if chars >= ENCODE_BATCH_CHARS:
                _encode_into(batch, sink)
                batch, chars = [], 0
        if batch:
            _encode_into(batch, sink)
    except InputError as e:
        sink.close()
        where = f"{e.path}:{e.line}" if e.line is not None else e.path
        return {"error": (e.path, e.line, str(e)[len(where) + 2:])}
    sink.close()
    arrays = None
    if sink.files is None:
        arrays = {s: (np.concatenate(a) if a else np.empty(0, dtype)) for s, a in sink.arrays.items()}
    return {"error": None, "arrays": arrays, "tokens": sink.tokens, "documents": sink.documents,
            "stats": stats.as_dict()}


def _mp_context():
    """fork where it is safe (no other threads in this process: the CLI), else spawn. Forked workers
    start in milliseconds instead of re-importing numpy and sentencepiece."""
    import multiprocessing as mp
    import threading
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


class _InlineExecutor:
    """--workers 1: run tasks in this process (no pickling, no process start-up)."""

    def __init__(self, model_file: str, cfg: dict):
        _init_worker(model_file, cfg, pool=False)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait=True, cancel_futures=False) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# Parent side: unit files, progress records, tail shards, index, manifest


class _UnitWriter:
    """Appends a unit's slices to temp files; `finish` fsyncs and renames them to their final names."""

    def __init__(self, shard_dir: Path, unit: Unit, dtype):
        self.shard_dir = shard_dir
        self.unit = unit
        self.dtype = dtype
        self.final = {s: shard_dir / f"{unit.name}.{s}.bin" for s in fmt.SPLITS}
        self.temp = {s: shard_dir / f".{unit.name}.{s}.bin.tmp" for s in fmt.SPLITS}
        self.files = None
        self.tokens = {s: 0 for s in fmt.SPLITS}
        self.documents = {s: 0 for s in fmt.SPLITS}
        self.stats: Optional[dict] = None

    def temp_paths(self) -> Dict[str, str]:
        return {s: str(p) for s, p in self.temp.items()}

    def add(self, result: dict) -> None:
        for s in fmt.SPLITS:
            self.tokens[s] += result["tokens"][s]
            self.documents[s] += result["documents"][s]
        if result["arrays"] is None:          # the worker wrote the temp files itself
            return
        if self.files is None:
            self.files = {s: open(p, "wb") for s, p in self.temp.items()}
        for s, arr in result["arrays"].items():
            if len(arr):
                arr.tofile(self.files[s])

    def finish(self, block_size: int) -> dict:
        if self.files is not None:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            self.files = None
        splits = {}
        for s in fmt.SPLITS:
            n = self.tokens[s]
            if n == 0:
                _unlink(self.temp[s])
                splits[s] = {"file": None, "tokens": 0, "blocks": 0, "tail": 0, "documents": 0}
                continue
            if not self.temp[s].exists() and n:
                raise RuntimeError(f"{self.temp[s]} vanished before it was finished")
            os.replace(self.temp[s], self.final[s])
            blocks = n // block_size
            splits[s] = {"file": self.final[s].name, "tokens": n, "blocks": blocks,
                         "tail": n - blocks * block_size, "documents": self.documents[s]}
        return splits

    def abort(self) -> None:
        if self.files is not None:
            for f in self.files.values():
                f.close()
            self.files = None
        for p in self.temp.values():
            _unlink(p)


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _append_record(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_records(path: Path) -> List[dict]:
    """Progress records; a torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _record_is_usable(rec: dict, shard_dir: Path, itemsize: int) -> bool:
    for s in fmt.SPLITS:
        e = rec["splits"][s]
        if e["file"] is None:
            continue
        p = shard_dir / e["file"]
        if not p.is_file() or p.stat().st_size != e["tokens"] * itemsize:
            return False
    return True


def _write_tail(shard_dir: Path, split: str, records: List[dict], block_size: int, dtype) -> dict:
    """Concatenate the units' tails, in unit order, into blocks; what is left is dropped."""
    name = f"tail.{split}.bin"
    tmp = shard_dir / f".{name}.tmp"
    carry = np.empty(0, dtype)
    blocks = 0
    with open(tmp, "wb") as f:
        for rec in records:
            e = rec["splits"][split]
            if not e["tail"]:
                continue
            mm = np.memmap(shard_dir / e["file"], dtype=dtype, mode="r", shape=(e["tokens"],))
            carry = np.concatenate([carry, mm[e["blocks"] * block_size:]])
            del mm
            full = len(carry) // block_size
            if full:
                carry[:full * block_size].tofile(f)
                blocks += full
                carry = carry[full * block_size:]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, shard_dir / name)
    return {"file": name, "tokens": blocks * block_size, "blocks": blocks, "tail": 0,
            "documents": 0, "role": "tail", "dropped_tokens": len(carry)}


# ---------------------------------------------------------------------------------------------------
# The command


def _source_stats(paths) -> List[dict]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": os.path.realpath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _manifest_is_current(out: Path, manifest: dict, settings: dict, sources: List[dict]) -> bool:
    if manifest.get("settings") != settings or not manifest.get("complete"):
        return False
    old = [{k: s[k] for k in ("path", "size", "mtime_ns")} for s in manifest.get("sources", [])]
    if old != sources:
        return False
    try:
        index = json.loads((out / fmt.INDEX).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    itemsize = np.dtype(settings["dtype"]).itemsize
    for split in index["splits"].values():
        for e in split["shards"]:
            p = out / fmt.SHARD_DIR / e["file"]
            if not p.is_file() or p.stat().st_size < e["tokens"] * itemsize:
                return False
    return True


def _settings_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(d if not d.startswith("tokenizer_fingerprint") else "the tokenizer differs"
                     for d in diffs)


def _wipe(out: Path) -> None:
    for name in (fmt.MANIFEST, fmt.INDEX, fmt.PROGRESS):
        _unlink(out / name)
    shutil.rmtree(out / fmt.SHARD_DIR, ignore_errors=True)


def _prepare_out_dir(out: Path, settings: dict, overwrite: bool) -> Optional[dict]:
    """Make `out` ready; return the existing manifest if there is one (to test for up-to-date)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    make_dirs(out)
    manifest_path, progress_path = out / fmt.MANIFEST, out / fmt.PROGRESS
    ours = manifest_path.exists() or progress_path.exists()
    if not ours and any(out.iterdir()):
        raise UserError(f"{out}: directory is not empty and holds no zhllama pack; choose an empty "
                        "or new --out")
    old_settings = None
    manifest = None
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            old_settings = manifest.get("settings")
        except (OSError, json.JSONDecodeError):
            manifest, old_settings = None, {}
    if old_settings is None:
        recs = _read_records(progress_path)
        if recs:
            old_settings = recs[0].get("settings")
    if old_settings is not None and old_settings != settings:
        if not overwrite:
            raise UserError(f"{out}: holds a pack built with other settings ({_settings_diff(old_settings, settings)}); "
                            "pass --overwrite to replace it, or choose another --out")
        log.info("%s: replacing a pack built with other settings (--overwrite)", out)
        _wipe(out)
        manifest = None
    return manifest


def run(args) -> int:
    _check_args(args)
    check_output_path(args.out)
    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer)
    paths = corpus.expand_inputs(args.input)
    for p in paths:                       # every input problem surfaces before any work is done
        corpus.check_readable(p)
    settings = make_settings(args, tok)
    out = Path(args.out)
    manifest = _prepare_out_dir(out, settings, args.overwrite)
    sources = _source_stats(paths)
    if manifest is not None and _manifest_is_current(out, manifest, settings, sources):
        msg = (f"{out} is up to date: same tokenizer, options and {len(paths)} unchanged input "
               f"file(s); nothing to do")
        log.info(msg)
        print(msg)
        return 0

    # From here the directory is being changed: it must not look complete until the new manifest.
    _unlink(out / fmt.MANIFEST)
    _unlink(out / fmt.INDEX)
    (out / fmt.PROGRESS).touch()         # marks the dir as a pack in progress (resumable)
    shard_dir = out / fmt.SHARD_DIR
    shard_dir.mkdir(exist_ok=True)
    for p in shard_dir.glob(".*.tmp"):
        _unlink(p)

    result = Packer(args, tok, settings, out, paths, sources).pack()
    elapsed = time.perf_counter() - t0
    c = result["counts"]
    tr, va = c["splits"]["train"], c["splits"]["validation"]
    mb = c["input"]["bytes"] / 1e6
    print(f"packed {c['input']['documents']:,} documents ({mb:,.1f} MB) into {tr['blocks']:,} train + "
          f"{va['blocks']:,} validation blocks of {args.block_size} tokens "
          f"({tr['tokens'] + va['tokens']:,} tokens; dropped {tr['dropped_tokens'] + va['dropped_tokens']} "
          f"in final partial blocks; skipped {c['input']['skipped']} bad lines, {c['input']['empty']} "
          f"empty documents) in {elapsed:,.1f}s -> {out}")
    return 0


class Packer:
    """One `data pack` run over a prepared output directory."""

    # test hook: called with the unit after each unit is recorded (lets tests interrupt a pack)
    after_unit = None

    def __init__(self, args, tok: Tokenizer, settings: dict, out: Path, paths: List[Path],
                 sources: List[dict]):
        self.args = args
        self.tok = tok
        self.settings = settings
        self.settings_key = _settings_key(settings)
        self.out = out
        self.paths = paths
        self.sources = sources      # stat taken before reading: a file changed meanwhile is redone next time
        self.shard_dir = out / fmt.SHARD_DIR
        self.progress_path = out / fmt.PROGRESS
        self.dtype = np.dtype(settings["dtype"])
        self.block_size = args.block_size
        self.units: List[Unit] = []
        self.file_sha: Dict[str, str] = {}
        self.records: Dict[str, dict] = {}
        self.totals = corpus.CorpusStats()
        self.problems: List[str] = []
        self.tokens_done = 0

    def pack(self) -> dict:
        done = {r["uid"]: r for r in _read_records(self.progress_path)
                if r.get("settings") == self.settings
                and _record_is_usable(r, self.shard_dir, self.dtype.itemsize)}
        total = corpus.total_size(self.paths)
        self.progress = Progress("data pack", total_bytes=total, logger=log)
        cfg = {k: self.settings[k] for k in ("text_field", "doc_sep", "strict", "validation_ratio", "dtype")}
        cfg.update(tokenizer_kind=self.tok.kind, bos_id=self.tok.bos_id, eos_id=self.tok.eos_id)
        workers = self.args.workers
        if workers > 1:
            executor = ProcessPoolExecutor(workers, mp_context=_mp_context(),
                                           initializer=_init_worker,
                                           initargs=(str(self.tok.model_file), cfg))
        else:
            executor = _InlineExecutor(str(self.tok.model_file), cfg)
        log.info("packing %d file(s), %.1f MB with %d worker(s) into %s", len(self.paths), total / 1e6,
                 workers, self.out)
        reused = 0
        writers: Dict[str, _UnitWriter] = {}
        inflight: deque = deque()
        max_inflight = 4 * workers
        try:
            for unit in self._plan():
                rec = done.get(unit.uid)
                if rec is not None:
                    self.records[unit.uid] = rec
                    self._count(rec)
                    self.progress.total_bytes -= unit.end - unit.start
                    reused += 1
                    continue
                writer = writers[unit.uid] = _UnitWriter(self.shard_dir, unit, self.dtype)
                for j, sl in enumerate(unit.slices):
                    task = {"path": str(unit.path), "whole": unit.whole, "start": sl.start,
                            "end": sl.end, "first_line": sl.first_line,
                            "write_to": writer.temp_paths() if unit.whole else None}
                    inflight.append((unit, j, executor.submit(pack_task, task)))
                    while len(inflight) >= max_inflight:
                        self._consume(*inflight.popleft(), writers)
            while inflight:
                self._consume(*inflight.popleft(), writers)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            for w in writers.values():
                w.abort()
            raise
        executor.shutdown(wait=True)
        if reused:
            log.info("resumed: %d of %d unit(s) were already packed", reused, len(self.units))
        self.progress.done(f"{self.tokens_done:,} tokens")
        return self._finish()

    def _plan(self):
        unit_bytes = self.settings["unit_bytes"]
        slice_bytes = _mb(self.args.slice_mb)
        for path in self.paths:
            try:
                units = plan_file(path, len(self.units), unit_bytes, slice_bytes,
                                  self.settings["doc_sep"])
            except OSError as e:
                raise InputError(path, f"cannot read: {e}") from None
            self.file_sha[os.path.realpath(path)] = units[0].sha256
            self.units.extend(units)
            yield from units

    def _consume(self, unit: Unit, j: int, fut: Future, writers: Dict[str, _UnitWriter]) -> None:
        res = fut.result()
        if res["error"] is not None:
            path, line, message = res["error"]
            raise InputError(path, message, line)
        writer = writers[unit.uid]
        writer.add(res)
        st = res["stats"]
        self.problems.extend(st["first_problems"][:max(0, 5 - len(self.problems))])
        tokens = sum(res["tokens"].values())
        self.tokens_done += tokens
        sl = unit.slices[j]
        elapsed = max(time.perf_counter() - self.progress.start, 1e-9)
        self.progress.update(st["documents"], sl.end - sl.start,
                             extra=f"{self.tokens_done:,} tokens ({self.tokens_done / elapsed:,.0f}/s)")
        writer.stats = _add_stats(writer.stats, st)
        if j == len(unit.slices) - 1:
            splits = writer.finish(self.block_size)
            del writers[unit.uid]
            rec = {"uid": unit.uid, "settings": self.settings, "source": os.path.realpath(unit.path),
                   "source_sha256": unit.sha256, "start": unit.start, "end": unit.end,
                   "splits": splits, "stats": writer.stats}
            _append_record(self.progress_path, rec)
            self.records[unit.uid] = rec
            self._count(rec, problems_noted=True)
            if Packer.after_unit is not None:
                Packer.after_unit(unit)

    def _count(self, rec: dict, problems_noted: bool = False) -> None:
        st = rec["stats"]
        for k in ("documents", "bytes", "empty", "bad_utf8", "bad_json", "missing_field"):
            setattr(self.totals, k, getattr(self.totals, k) + st[k])
        if not problems_noted:
            self.problems.extend(st["first_problems"][:max(0, 5 - len(self.problems))])

    def _finish(self) -> dict:
        records = [self.records[u.uid] for u in self.units]
        splits_index, counts = {}, {}
        for s in fmt.SPLITS:
            tail = _write_tail(self.shard_dir, s, records, self.block_size, self.dtype)
            shards = []
            for u, r in zip(self.units, records):
                e = r["splits"][s]
                if e["file"] is not None:
                    shards.append({**e, "source": str(u.path), "start": u.start, "end": u.end})
            if tail["blocks"]:
                shards.append(tail)
            blocks = sum(e["blocks"] for e in shards)
            counts[s] = {"documents": sum(r["splits"][s]["documents"] for r in records),
                         "tokens": sum(r["splits"][s]["tokens"] for r in records),
                         "blocks": blocks, "dropped_tokens": tail["dropped_tokens"]}
            splits_index[s] = {"blocks": blocks, "shards": shards}
        t = self.totals
        if counts["train"]["blocks"] == 0:
            raise UserError(
                f"the inputs yield no complete block of {self.block_size} tokens "
                f"({t.documents} documents, {counts['train']['tokens']} train tokens; "
                f"{t.skipped()} bad lines and {t.empty} empty documents skipped); "
                "give more text or a smaller --block-size")
        if t.skipped():
            log.warning("skipped %d bad line(s) (%d undecodable, %d bad JSON, %d missing field); "
                        "first: %s", t.skipped(), t.bad_utf8, t.bad_json, t.missing_field,
                        " | ".join(self.problems))
        sources = []
        for p, st in zip(self.paths, self.sources):
            sources.append({**st, "sha256": self.file_sha[st["path"]], "given_as": str(p)})
        index = {"format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION,
                 "block_size": self.block_size, "dtype": self.dtype.str, "splits": splits_index}
        manifest = {
            "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "complete": True,
            "created_by": f"zhllama {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokenizer": {"path": str(self.tok.path), "fingerprint": self.tok.fingerprint,
                          "vocab_size": self.tok.vocab_size, "bos_id": self.tok.bos_id,
                          "eos_id": self.tok.eos_id},
            "block_size": self.block_size, "dtype": self.dtype.str, "settings": self.settings,
            "sources": sources,
            "counts": {"input": {**{k: v for k, v in t.as_dict().items() if k != "first_problems"},
                                 "files": len(self.paths), "skipped": t.skipped(),
                                 "first_problems": self.problems},
                       "splits": counts},
        }
        atomic_write_json(self.out / fmt.INDEX, index)
        atomic_write_json(self.out / fmt.MANIFEST, manifest)    # last: the pack is now complete
        # Keep only the current units' records and files (inputs may have changed since last time).
        atomic_write_text(self.progress_path,
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        keep = {e["file"] for s in splits_index.values() for e in s["shards"]}
        keep |= {r["splits"][s]["file"] for r in records for s in fmt.SPLITS}
        for p in self.shard_dir.iterdir():
            if p.name not in keep:
                _unlink(p)
        return manifest


def _add_stats(acc: Optional[dict], st: dict) -> dict:
    if acc is None:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in st.items()}
    for k, v in st.items():
        if isinstance(v, list):
            acc[k] = (acc[k] + v)[:5]
        else:
            acc[k] += v
    return acc
