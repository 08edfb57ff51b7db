"""Parent side, on disk: a unit's shard files (temp name, renamed when complete), the progress records
that make a pack resumable, the tail shards, the checks on an existing output directory, and the
directory a new pack is built in beside a complete one."""

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from zhllama.errors import UserError
from zhllama.fsutil import make_dirs, write_array
from zhllama.hfdatasets import HubDataset
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
        self.characters = {s: 0 for s in fmt.SPLITS}
        self.stats: Optional[dict] = None

    def temp_paths(self) -> Dict[str, str]:
        return {s: str(p) for s, p in self.temp.items()}

    def add(self, result: dict) -> None:
        for s in fmt.SPLITS:
            self.tokens[s] += result["tokens"][s]
            self.documents[s] += result["documents"][s]
            self.lengths[s].append(result["lengths"][s])
            self.characters[s] += result["characters"][s]
        if result["arrays"] is None:          # the worker wrote the temp files itself
            return
        if self.files is None:
            self.files = {s: open(p, "wb") for s, p in self.temp.items()}
        for s, arr in result["arrays"].items():
            if len(arr):
                write_array(self.files[s], arr)

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
                splits[s] = {"file": None, "tokens": 0, "blocks": 0, "tail": 0, "documents": 0, "characters": 0}
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
                         "tail": n - blocks * block_size, "documents": self.documents[s],
                         "characters": self.characters[s], **extra}
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


def append_record(path: Path, *records: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
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
                write_array(f, carry[:full * block_size])
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
    """What tells an input changed: a file's size and mtime; a Hub dataset's commit and shard count."""
    out = []
    for p in paths:
        if isinstance(p, HubDataset):
            out.append({"path": p.key, "revision": p.revision, "shards": p.shards})
            continue
        st = os.stat(p)
        out.append({"path": os.path.realpath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def manifest_is_current(out: Path, manifest: dict, settings: dict, sources: List[dict]) -> bool:
    if manifest.get("settings") != settings or not manifest.get("complete"):
        return False
    old = [{k: v for k, v in s.items() if k not in ("sha256", "given_as")} for s in manifest.get("sources", [])]
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


def staging_dir(out: Path) -> Path:
    """Where a new pack over a complete one is built: beside it, a fixed name (so that an interrupted
    rebuild resumes), not a `fsutil` temporary name (which other runs would remove as garbage)."""
    return out.parent / f".{out.name}.pack-next"


def prepare_staging(out: Path, settings: dict) -> Path:
    """The staging dir of `out`, holding what an interrupted rebuild finished, plus the old pack's
    units that the new settings can reuse, hard-linked (copied where links are not possible): the old
    pack is never written to, and the rebuild re-tokenizes only what changed."""
    stage = staging_dir(out)
    shard_dir = make_dirs(stage / fmt.SHARD_DIR)
    progress = stage / fmt.PROGRESS
    have = {r.get("uid") for r in read_records(progress)}
    itemsize = np.dtype(settings["dtype"]).itemsize
    old_shards = out / fmt.SHARD_DIR
    reuse = [r for r in read_records(out / fmt.PROGRESS)
             if r.get("uid") not in have and r.get("settings") == settings
             and record_is_usable(r, old_shards, itemsize)]
    for rec in reuse:
        for s in fmt.SPLITS:
            name = rec["splits"][s]["file"]
            if name is not None and not (shard_dir / name).exists():
                _link_or_copy(old_shards / name, shard_dir / name)
    if reuse:
        append_record(progress, *reuse)
    log.info("building the new pack beside the old one, in %s (%d unit(s) of the old pack linked there "
             "for reuse)", stage, len(reuse))
    return stage


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
        if manifest is None:    # no complete pack to keep: start over in place
            wipe(out)
    return manifest
