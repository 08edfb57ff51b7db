"""Worker side: a slice of documents -> token arrays per split. Runs in a process pool (or inline for
--workers 1); each worker holds one tokenizer, loaded once by `init_worker`."""

import array
import multiprocessing as mp
import os
import threading
from concurrent.futures import Future
from typing import Dict, List, Optional

import numpy as np
import sentencepiece as spm
import tokenizers

from zhllama import columnar, corpus
from zhllama.errors import InputError
from zhllama.fsutil import write_array
from zhllama.hfdatasets import iter_hub_texts
from zhllama.inputfile import MAX_LINE_BYTES

from .. import shards as fmt
from .plan import hash64, validation_threshold

ENCODE_BATCH_CHARS = 1 << 20  # characters per sentencepiece call inside a worker

_W: dict = {}   # this process's tokenizer and settings, set by init_worker


def init_worker(model_file: str, cfg: dict, pool: bool = True) -> None:
    """Load the tokenizer once per worker process (ProcessPoolExecutor's initializer)."""
    _W.clear()  # an in-process (--workers 1) pack may follow one with another kind of tokenizer
    if cfg.get("tokenizer_kind") == "tokenizers":
        if pool:  # one thread per worker process: --workers is the parallelism, as for sentencepiece
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        tk = tokenizers.Tokenizer.from_file(model_file)
        tk.encode_special_tokens = True   # "<|endoftext|>" in a document is text, never a control token
        _W["tk"] = tk
    else:
        _W["sp"] = spm.SentencePieceProcessor(model_file=model_file)
    _W["cfg"] = cfg
    _W["threshold"] = validation_threshold(cfg["validation_ratio"])


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
    straight into the unit's temp files (a whole .gz file, a columnar row range, a Hub shard: large)."""

    def __init__(self, dtype, paths: Optional[Dict[str, str]] = None):
        self.dtype = dtype
        self.arrays = {s: [] for s in fmt.SPLITS}
        self.tokens = {s: 0 for s in fmt.SPLITS}
        self.documents = {s: 0 for s in fmt.SPLITS}
        self.lengths = {s: [] for s in fmt.SPLITS}     # tokens of each document, in stream order
        self.characters = {s: 0 for s in fmt.SPLITS}   # what bits per character divide by
        self.files = {s: open(p, "wb") for s, p in paths.items()} if paths else None

    def add(self, split: str, ids: List[List[int]], characters: int) -> None:
        if not ids:
            return
        arr = _flatten(ids, self.dtype)
        self.tokens[split] += len(arr)
        self.documents[split] += len(ids)
        self.lengths[split].extend(map(len, ids))
        self.characters[split] += characters
        if self.files is not None:
            write_array(self.files[split], arr)
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
        sink.add("train", ids, sum(map(len, docs)))
        return
    val = [hash64(d) < threshold for d in docs]
    sink.add("train", [x for x, v in zip(ids, val) if not v], sum(len(d) for d, v in zip(docs, val) if not v))
    sink.add("validation", [x for x, v in zip(ids, val) if v], sum(len(d) for d, v in zip(docs, val) if v))


def pack_task(task: dict) -> dict:
    """Tokenize one slice. Returns arrays (or the temp files written), counts and input stats; a bad
    input line under --strict comes back as an error record (InputError does not pickle)."""
    cfg = _W["cfg"]
    dtype = np.dtype(cfg["dtype"])
    stats = corpus.CorpusStats()
    sink = _Sink(dtype, task.get("write_to"))
    kw = dict(text_field=cfg["text_field"], doc_sep=cfg["doc_sep"], strict=cfg["strict"], stats=stats,
              max_line=cfg.get("max_line", MAX_LINE_BYTES))
    try:
        if task["reader"] == "rows":
            docs = columnar.iter_texts(task["path"], cfg["text_field"], task["start"], task["end"],
                                       strict=cfg["strict"], stats=stats, max_line=kw["max_line"])
        elif task["reader"] == "hub":
            docs = iter_hub_texts(task["path"], task["start"], cfg["text_field"], strict=cfg["strict"],
                                  stats=stats, max_line=kw["max_line"])
        elif task["whole"]:
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
            "lengths": {s: np.asarray(v, dtype=np.int64) for s, v in sink.lengths.items()},
            "characters": sink.characters, "stats": stats.as_dict()}


def mp_context():
    """fork where it is safe (no other threads in this process: the CLI), else spawn. Forked workers
    start in milliseconds instead of re-importing numpy and sentencepiece."""
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


class InlineExecutor:
    """--workers 1: run tasks in this process (no pickling, no process start-up)."""

    def __init__(self, model_file: str, cfg: dict):
        init_worker(model_file, cfg, pool=False)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait=True, cancel_futures=False) -> None:
        pass
