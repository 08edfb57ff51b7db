"""One `data pack` run: plan the units, send their slices to the workers (at most 4 per worker in
flight, so memory stays bounded), write each unit's shard as its slices come back in order, then the
tail shards, the index and, last, the manifest."""

import json
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from zhllama import __version__, corpus
from zhllama.errors import InputError, UserError
from zhllama.fsutil import atomic_write_json, atomic_write_text
from zhllama.inputfile import MAX_LINE_BYTES
from zhllama.log import Progress, get_logger

from .. import shards as fmt
from .layout import add_histograms, summarize
from .plan import Unit, plan_source, source_key
from .settings import Tokenizer, mb_to_bytes, settings_key
from .workers import InlineExecutor, init_worker, mp_context, pack_task
from .writer import UnitWriter, append_record, read_records, record_is_usable, unlink, write_tail

log = get_logger("zhllama.pack")


class Packer:
    """One `data pack` run over a prepared output directory."""

    # test hook: called with the unit after each unit is recorded (lets tests interrupt a pack)
    after_unit = None

    def __init__(self, args, tok: Tokenizer, settings: dict, out: Path, paths: list,
                 sources: List[dict], max_line: int = MAX_LINE_BYTES):
        self.args = args
        self.tok = tok
        self.settings = settings
        self.settings_key = settings_key(settings)
        self.out = out
        self.paths = paths          # files, and resolved Hub datasets (hfdatasets.HubDataset)
        self.sources = sources      # stat taken before reading: a file changed meanwhile is redone next time
        self.max_line = max_line    # longest line read (not a setting: it changes no output byte)
        self.shard_dir = out / fmt.SHARD_DIR
        self.progress_path = out / fmt.PROGRESS
        self.dtype = np.dtype(settings["dtype"])
        self.block_size = args.block_size
        self.keep_documents = settings.get("layout") == "documents-whole"
        self.units: List[Unit] = []
        self.file_sha: Dict[str, str] = {}
        self.records: Dict[str, dict] = {}
        self.totals = corpus.CorpusStats()
        self.problems: List[str] = []
        self.tokens_done = 0

    def pack(self) -> dict:
        done = {r["uid"]: r for r in read_records(self.progress_path)
                if r.get("settings") == self.settings
                and record_is_usable(r, self.shard_dir, self.dtype.itemsize)}
        total = corpus.total_size(p for p in self.paths if isinstance(p, Path))
        self.progress = Progress("data pack", total_bytes=total, logger=log)
        cfg = {k: self.settings[k] for k in ("text_field", "doc_sep", "strict", "validation_ratio", "dtype")}
        cfg.update(tokenizer_kind=self.tok.kind, bos_id=self.tok.bos_id, eos_id=self.tok.eos_id,
                   max_line=self.max_line)
        workers = self.args.workers
        if workers > 1:
            executor = ProcessPoolExecutor(workers, mp_context=mp_context(),
                                           initializer=init_worker,
                                           initargs=(str(self.tok.model_file), cfg))
        else:
            executor = InlineExecutor(str(self.tok.model_file), cfg)
        log.info("packing %d input(s), %.1f MB with %d worker(s) into %s", len(self.paths), total / 1e6,
                 workers, self.out)
        reused = 0
        writers: Dict[str, UnitWriter] = {}
        inflight: deque = deque()
        max_inflight = 4 * workers
        try:
            for unit in self._plan():
                rec = done.get(unit.uid)
                if rec is not None:
                    self.records[unit.uid] = rec
                    self._count(rec)
                    self.progress.total_bytes -= unit.size
                    reused += 1
                    continue
                writer = writers[unit.uid] = UnitWriter(self.shard_dir, unit, self.dtype)
                for j, sl in enumerate(unit.slices):
                    task = {"path": str(unit.path) if isinstance(unit.path, Path) else unit.path,
                            "reader": unit.reader, "whole": unit.whole, "start": sl.start,
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
        slice_bytes = mb_to_bytes(self.args.slice_mb)
        for path in self.paths:
            try:
                units = plan_source(path, len(self.units), unit_bytes, slice_bytes,
                                    self.settings["doc_sep"], self.settings["text_field"])
            except OSError as e:
                raise InputError(path, f"cannot read: {e}") from None
            self.file_sha[source_key(path)] = units[0].sha256
            self.units.extend(units)
            yield from units

    def _consume(self, unit: Unit, j: int, fut: Future, writers: Dict[str, UnitWriter]) -> None:
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
        self.progress.update(st["documents"], sl.size,
                             extra=f"{self.tokens_done:,} tokens ({self.tokens_done / elapsed:,.0f}/s)")
        writer.stats = _add_stats(writer.stats, st)
        if j == len(unit.slices) - 1:
            splits = writer.finish(self.block_size, keep_documents=self.keep_documents)
            del writers[unit.uid]
            rec = {"uid": unit.uid, "settings": self.settings, "source": source_key(unit.path),
                   "source_sha256": unit.sha256, "start": unit.start, "end": unit.end,
                   "splits": splits, "stats": writer.stats}
            append_record(self.progress_path, rec)
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
            tail = write_tail(self.shard_dir, s, records, self.block_size, self.dtype)
            shards = []
            for u, r in zip(self.units, records):
                e = r["splits"][s]
                if e["file"] is not None:
                    shards.append({**e, "source": str(u.path), "start": u.start, "end": u.end,
                                   **_RANGE.get(u.reader, {})})
            if tail["blocks"]:
                shards.append(tail)
            blocks = sum(e["blocks"] for e in shards)
            counts[s] = {"documents": sum(r["splits"][s]["documents"] for r in records),
                         "tokens": sum(r["splits"][s]["tokens"] for r in records),
                         "blocks": blocks, "dropped_tokens": tail["dropped_tokens"],
                         **_documents(records, s)}
            # Characters of the split's documents (bits per character divide by them); units packed by a
            # zhllama that did not count them leave the figure out rather than undercount it.
            if all("characters" in r["splits"][s] for r in records):
                counts[s]["characters"] = sum(r["splits"][s]["characters"] for r in records)
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
                unlink(p)
        return manifest


_RANGE = {"rows": {"range": "rows"}, "hub": {"range": "stream shards"}}   # start/end are not bytes


def _documents(records: List[dict], split: str) -> dict:
    """The split's document length distribution and, with --keep-documents, how many stayed whole: summed
    over the units' records (a record from before lengths were recorded leaves the distribution out)."""
    entries = [r["splits"][split] for r in records if r["splits"][split]["tokens"]]   # a unit's empty split: none
    if not entries or not all("lengths" in e for e in entries):
        return {}
    hist = {"documents": [], "tokens": [], "max": 0, "longer_than_block": [0, 0]}
    for e in entries:
        hist = add_histograms(hist, e["lengths"])
    out = {"document_lengths": summarize(hist)}
    if entries and all("layout" in e for e in entries):
        kept = {k: sum(e["layout"][k] for e in entries) for k in ("fit", "kept_whole", "cut_to_fill", "in_tail",
                                                                  "longer")}
        out["documents_kept_whole"] = {**kept, "longest_cut": max(e["layout"]["longest_cut"] for e in entries)}
    return out


def _add_stats(acc: Optional[dict], st: dict) -> dict:
    if acc is None:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in st.items()}
    for k, v in st.items():
        if isinstance(v, list):
            acc[k] = (acc[k] + v)[:5]
        else:
            acc[k] += v
    return acc
