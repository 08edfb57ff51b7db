"""Packed token shards: the on-disk format `zhllama data pack` writes, and how training reads it.

A pack directory holds:

    manifest.json          written last, atomically: tokenizer fingerprint, block size, sources with
                           sizes and sha256, counts. Its presence with "complete": true is what makes
                           the directory usable.
    index.json             the shard table, per split: file, tokens, full blocks, tail tokens.
    progress.jsonl         one record per finished work unit (what makes an interrupted pack resume).
    shards/*.bin           raw little-endian token ids, uint16 while the vocabulary fits, else uint32.

Each shard file is one work unit's token stream (every document as BOS ids EOS, concatenated). Its
first `blocks * block_size` tokens are its blocks; the `tail` tokens after them are moved, in unit
order, into one `tail.<split>.bin` shard, cut into blocks again, so a whole corpus loses only one final
partial block per split (counted as `dropped_tokens`). Reading is `np.memmap`: no copy, no pickling.

The dataset side: `PackedBlocks` maps a block id to its tokens; `BlockOrder` maps an endless stream
position to a block id (a fresh seeded permutation each epoch), so a run can start from any position;
`positions_for_rank` splits one global step's positions across ranks.
"""

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from zhllama.errors import UserError
from zhllama.spm import find_sp_model, sp_model_path

FORMAT = "zhllama.packed-blocks"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
PROGRESS = "progress.jsonl"
SHARD_DIR = "shards"
SPLITS = ("train", "validation")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and page cache of uint32), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokenizer_fingerprint(tokenizer_path) -> str:
    """sha256 over the files that define the tokenizer: `tokenizer.model`, plus `tokenizer.json` when
    the directory has one. Any change to either changes the ids, so shards are keyed by this."""
    p = Path(tokenizer_path)
    if p.is_dir() and find_sp_model(p) is None and (p / "tokenizer.json").is_file():
        files = [p / "tokenizer.json"]      # a tokenizer.json-only tokenizer (LLaMA-3, SmolLM2)
    elif p.is_file() and p.suffix == ".json":
        files = [p]
    else:
        files = [sp_model_path(p)]
    if p.is_dir() and (p / "tokenizer.json").is_file():
        files.append(p / "tokenizer.json")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def read_manifest(data_dir) -> dict:
    """The manifest of a complete pack, or a UserError saying why the directory is not one."""
    d = Path(data_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"{d}: no such pack directory (run `zhllama data pack --out {d}` first)")
    if not path.is_file():
        hint = ("an interrupted or failed pack: re-run the same `zhllama data pack` command to finish it"
                if (d / PROGRESS).exists() else "not a `zhllama data pack` output directory")
        raise UserError(f"{d}: no {MANIFEST} ({hint})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e}); re-run `zhllama data pack`") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a zhllama packed-blocks manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format version {manifest.get('format_version')} is not "
                        f"{FORMAT_VERSION}; re-run `zhllama data pack` with this zhllama")
    if not manifest.get("complete"):
        raise UserError(f"{path}: the pack is incomplete; re-run the same `zhllama data pack` "
                        "command to finish it")
    return manifest


class PackedBlocks:
    """Fixed-length token blocks of one split of a pack, memory-mapped.

    `ds[i]` is block i as an int64 array of shape (block_size,) (a copy of one block; the shards stay
    uint16/uint32 on disk and in the page cache). With `expect_tokenizer` / `expect_block_size` a pack
    built with another tokenizer or block size is refused before any training step.
    """

    MAX_OPEN = 256  # open memmaps kept; each holds a file descriptor

    def __init__(self, data_dir, split: str = "train", expect_tokenizer=None,
                 expect_block_size: Optional[int] = None):
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(self.data_dir)
        m = self.manifest
        self.block_size = int(m["block_size"])
        tok = m["tokenizer"]
        self.vocab_size = int(tok["vocab_size"])
        self.bos_id = int(tok["bos_id"]) if tok["bos_id"] is not None else None  # tokenizer.json without BOS
        self.eos_id = int(tok["eos_id"])
        self.dtype = np.dtype(m["dtype"])

        if expect_tokenizer is not None:
            fp = tokenizer_fingerprint(expect_tokenizer)
            if fp != tok["fingerprint"]:
                raise UserError(
                    f"{self.data_dir} was packed with tokenizer {tok['path']} (fingerprint "
                    f"{tok['fingerprint'][:12]}) but this run uses {expect_tokenizer} (fingerprint "
                    f"{fp[:12]}); its token ids would be wrong. Re-run `zhllama data pack "
                    f"--tokenizer {expect_tokenizer} ...` to build shards for this tokenizer")
        if expect_block_size is not None and int(expect_block_size) != self.block_size:
            raise UserError(
                f"{self.data_dir} holds blocks of {self.block_size} tokens but this run wants "
                f"{expect_block_size}; re-run `zhllama data pack --block-size {expect_block_size} ...` "
                "(or set the run's block size to match)")

        try:
            index = json.loads((self.data_dir / INDEX).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.data_dir / INDEX}: unreadable index ({e}); re-run "
                            "`zhllama data pack`") from None
        shards = [s for s in index["splits"][split]["shards"] if s["blocks"] > 0]
        self._files = [self.data_dir / SHARD_DIR / s["file"] for s in shards]
        for f, s in zip(self._files, shards):
            need = s["tokens"] * self.dtype.itemsize
            if not f.is_file() or f.stat().st_size < need:
                raise UserError(f"{f}: shard missing or shorter than the index says "
                                f"({need} bytes); re-run `zhllama data pack`")
        self._tokens = [int(s["tokens"]) for s in shards]
        # _starts[k] = first block id of shard k; searchsorted maps a block id to its shard.
        self._starts = np.concatenate([[0], np.cumsum([s["blocks"] for s in shards])]).astype(np.int64)
        self._maps: "OrderedDict[int, np.memmap]" = OrderedDict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return len(self) * self.block_size

    def _map(self, k: int) -> np.memmap:
        mm = self._maps.get(k)
        if mm is None:
            mm = np.memmap(self._files[k], dtype=self.dtype, mode="r", shape=(self._tokens[k],))
            self._maps[k] = mm
            if len(self._maps) > self.MAX_OPEN:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(k)
        return mm

    def __getitem__(self, i) -> np.ndarray:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        off = (i - int(self._starts[k])) * self.block_size
        return np.array(self._map(k)[off:off + self.block_size], dtype=np.int64)

    def __getstate__(self):  # DataLoader workers re-open their own maps
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (f"PackedBlocks({str(self.data_dir)!r}, split={self.split!r}: {len(self):,} blocks of "
                f"{self.block_size}, vocab {self.vocab_size})")


class BlockOrder:
    """Endless, deterministic, shuffled order over `num_blocks` blocks.

    Position p is in epoch p // num_blocks; each epoch is a permutation seeded by (seed, epoch) through
    numpy's SeedSequence + PCG64, the same on every machine and rank. Any position can be computed
    without replaying earlier ones, which is what exact resume needs. The current epoch's permutation
    is cached (4 bytes per block).
    """

    def __init__(self, num_blocks: int, seed: int):
        if num_blocks <= 0:
            raise UserError("the pack holds no blocks to train on (num_blocks is 0)")
        self.num_blocks = int(num_blocks)
        self.seed = int(seed)
        self._epoch = -1
        self._perm: Optional[np.ndarray] = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
            perm = rng.permutation(self.num_blocks)
            self._perm = perm.astype(np.uint32 if self.num_blocks < 1 << 32 else np.int64)
            self._epoch = epoch
        return self._perm

    def index(self, position: int) -> int:
        position = int(position)
        if position < 0:
            raise ValueError(f"position must be >= 0, not {position}")
        epoch, offset = divmod(position, self.num_blocks)
        return int(self.permutation(epoch)[offset])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_epoch"], state["_perm"] = -1, None
        return state


def positions_for_rank(step: int, global_batch: int, rank: int, world_size: int) -> range:
    """Stream positions of rank `rank` at global step `step`: the step uses positions
    [step * global_batch, (step + 1) * global_batch), and each rank takes its contiguous slice."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if global_batch % world_size:
        raise UserError(f"global batch {global_batch} is not divisible by world size {world_size}")
    per_rank = global_batch // world_size
    start = step * global_batch + rank * per_rank
    return range(start, start + per_rank)


def split_counts(manifest: dict) -> Dict[str, dict]:
    """Per-split counts of a manifest (documents, tokens, blocks, dropped_tokens, and characters in packs
    made since zhllama counted them)."""
    return manifest["counts"]["splits"]


def iter_unit_streams(data_dir, split: str = "train"):
    """(index entry, token array) of each work unit's shard, in corpus order, tails included.

    Concatenated, these are the split's whole token stream before cutting (the same documents, in
    input order, BOS/EOS included): what a round-trip check decodes. Not used by training.
    """
    d = Path(data_dir)
    manifest = read_manifest(d)
    dtype = np.dtype(manifest["dtype"])
    index = json.loads((d / INDEX).read_text(encoding="utf-8"))
    for e in index["splits"][split]["shards"]:
        if e.get("role") == "tail":
            continue
        yield e, np.memmap(d / SHARD_DIR / e["file"], dtype=dtype, mode="r", shape=(e["tokens"],))


def split_documents(data_dir, split: str = "validation") -> List[np.ndarray]:
    """Each document of a split as its ids without the closing EOS (BOS + text ids, or the text ids alone
    for a tokenizer without BOS), in corpus order: what `zhllama eval` scores for the same text. `data pack`
    writes every document as [BOS] ids EOS and text never encodes to BOS or EOS, so the documents are cut at
    the EOS ids; where BOS and EOS are one id (GPT-2's `<|endoftext|>`), its occurrences alternate between
    opening and closing a document."""
    tok = read_manifest(data_dir)["tokenizer"]
    eos = int(tok["eos_id"])
    same = tok["bos_id"] is not None and int(tok["bos_id"]) == eos
    docs = []
    for _, stream in iter_unit_streams(data_dir, split):
        marks = np.flatnonzero(np.asarray(stream) == eos)
        starts, ends = (marks[0::2], marks[1::2]) if same else (np.concatenate([[0], marks[:-1] + 1]), marks)
        docs.extend(np.array(stream[a:b], dtype=np.int64) for a, b in zip(starts, ends))
    return docs
