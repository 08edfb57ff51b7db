"""Parent side, on disk: a unit's shard files (temp name, renamed when complete), the progress records
that make a pack resumable, the tail shards, and the checks on an existing output directory."""

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from zhllama.errors import UserError
from zhllama.fsutil import make_dirs
from zhllama.log import get_logger

from .. import shards as fmt
from .layout import length_histogram, plan_layout, write_layout
from .plan import Unit

log = get_logger("zhllama.pack")


class UnitWriter:
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
        self.lengths = {s: [] for s in fmt.SPLITS}
        self.stats: Optional[dict] = None

    def temp_paths(self) -> Dict[str, str]:
        return {s: str(p) for s, p in self.temp.items()}

    def add(self, result: dict) -> None:
        for s in fmt.SPLITS:
            self.tokens[s] += result["tokens"][s]
            self.documents[s] += result["documents"][s]
            self.lengths[s].append(result["lengths"][s])
        if result["arrays"] is None:          # the worker wrote the temp files itself
            return
        if self.files is None:
            self.files = {s: open(p, "wb") for s, p in self.temp.items()}
        for s, arr in result["arrays"].items():
            if len(arr):
                arr.tofile(self.files[s])

    def finish(self, block_size: int, keep_documents: bool = False) -> dict:
        """Close the temp files, lay them out (--keep-documents) and rename them; the unit's split records."""
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
                unlink(self.temp[s])
                splits[s] = {"file": None, "tokens": 0, "blocks": 0, "tail": 0, "documents": 0}
                continue
            if not self.temp[s].exists() and n:
                raise RuntimeError(f"{self.temp[s]} vanished before it was finished")
            lengths = np.concatenate(self.lengths[s])
            extra = {"lengths": length_histogram(lengths, block_size)}
            blocks = n // block_size
            if keep_documents:
                blocks, extra["layout"] = self._lay_out(s, lengths, block_size)
            os.replace(self.temp[s], self.final[s])
            splits[s] = {"file": self.final[s].name, "tokens": n, "blocks": blocks,
                         "tail": n - blocks * block_size, "documents": self.documents[s], **extra}
        return splits

    def _lay_out(self, split: str, lengths, block_size: int):
        """Rewrite the split's temp file with its documents kept whole (layout.py); (full blocks, counts)."""
        n = self.tokens[split]
        if int(lengths.sum()) != n:
            raise RuntimeError(f"{self.temp[split]}: {n} tokens but the documents add up to {int(lengths.sum())}")
        segments, full_tokens, counts = plan_layout(lengths, block_size)
        src = np.memmap(self.temp[split], dtype=self.dtype, mode="r", shape=(n,))
        laid = self.shard_dir / f".{self.unit.name}.{split}.layout.tmp"
        write_layout(src, segments, laid)
        del src
        os.replace(laid, self.temp[split])
        return full_tokens // block_size, counts

    def abort(self) -> None:
        if self.files is not None:
            for f in self.files.values():
                f.close()
            self.files = None
        for p in self.temp.values():
            unlink(p)


def unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def append_record(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> List[dict]:
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


def record_is_usable(rec: dict, shard_dir: Path, itemsize: int) -> bool:
    for s in fmt.SPLITS:
        e = rec["splits"][s]
        if e["file"] is None:
            continue
        p = shard_dir / e["file"]
        if not p.is_file() or p.stat().st_size != e["tokens"] * itemsize:
            return False
    return True


def write_tail(shard_dir: Path, split: str, records: List[dict], block_size: int, dtype) -> dict:
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
# The output directory: up to date, resumable, or to be replaced


def source_stats(paths) -> List[dict]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": os.path.realpath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def manifest_is_current(out: Path, manifest: dict, settings: dict, sources: List[dict]) -> bool:
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


def wipe(out: Path) -> None:
    for name in (fmt.MANIFEST, fmt.INDEX, fmt.PROGRESS):
        unlink(out / name)
    shutil.rmtree(out / fmt.SHARD_DIR, ignore_errors=True)


def prepare_out_dir(out: Path, settings: dict, overwrite: bool) -> Optional[dict]:
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
        recs = read_records(progress_path)
        if recs:
            old_settings = recs[0].get("settings")
    if old_settings is not None and old_settings != settings:
        if not overwrite:
            raise UserError(f"{out}: holds a pack built with other settings ({_settings_diff(old_settings, settings)}); "
                            "pass --overwrite to replace it, or choose another --out")
        log.info("%s: replacing a pack built with other settings (--overwrite)", out)
        wipe(out)
        manifest = None
    return manifest
