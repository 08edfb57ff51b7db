"""Read and write safetensors one tensor at a time, without memory-mapping and without buffering a shard.

Why not `safe_open` + `save_file`: pages of a memory-mapped shard count in the process's resident memory
once touched, until the file is closed, and `save_file` needs every tensor of a shard in memory at once.
For the merge that adds up to about three shards; for `vocab resize`, one. Here a tensor is read with
`readinto` into its own buffer, and the output shards are planned up front: names, shapes and dtypes are known from the base's
headers, so each header can be written first and each tensor streamed to disk as soon as it is produced.
Peak memory is then the tensor in hand (and its float32 working copy), not a shard.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} padded with spaces to a
multiple of 8, then the tensors' bytes.
"""

import json
import struct
from pathlib import Path
from typing import Dict, List, Tuple

from zhllama.dtypes import SAFETENSORS, st_code
from zhllama.fsutil import atomic_write_json

MAX_HEADER = 100 << 20


class HeaderError(ValueError):
    """A safetensors file whose header does not describe its bytes (the message says how)."""


def read_header(fh, size: int) -> Tuple[Dict[str, Tuple[str, tuple, int, int]], dict, int]:
    """({name: (dtype, shape, begin, end)}, metadata, data start) of the safetensors file open as `fh`
    (`size` bytes), after the checks the safetensors library makes: the header is a JSON object, every
    tensor has a known dtype, a shape of non-negative integers and offsets holding exactly its bytes,
    and the tensors tile the data without gap or overlap up to the end of the file. A HeaderError
    otherwise, so a damaged file is refused before any tensor is read."""
    raw = fh.read(8)
    if len(raw) < 8:
        raise HeaderError(f"not a safetensors file ({size} bytes, shorter than its header length)")
    n = struct.unpack("<Q", raw)[0]
    if n > min(MAX_HEADER, size - 8):
        raise HeaderError(f"corrupt safetensors header (header length {n} does not fit a file of {size} bytes: "
                          "truncated or damaged)")
    try:
        header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"corrupt safetensors header (not valid JSON: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise HeaderError("corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise HeaderError("corrupt safetensors header ('__metadata__' is not an object)")
    entries = {}
    for name, e in header.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
            nbytes = SAFETENSORS[dtype][1]
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
                raise TypeError
            for x in shape:
                nbytes *= x
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"corrupt safetensors header (entry '{name}' needs a known dtype, a shape of "
                              "non-negative integers and data_offsets)") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and end - begin == nbytes):
            raise HeaderError(f"corrupt safetensors header (tensor '{name}': offsets {begin}..{end} do not hold "
                              f"{dtype} {list(shape)})")
        entries[name] = (dtype, tuple(shape), begin, end)
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            how = f"overlaps '{prev}'" if begin < pos else f"leaves a gap after {'%r' % prev if prev else 'the header'}"
            raise HeaderError(f"corrupt safetensors header (tensor '{name}' at {begin}..{end} {how})")
        pos, prev = end, name
    if 8 + n + pos > size:
        raise HeaderError(f"truncated safetensors file ({size} bytes, the header needs {8 + n + pos})")
    if 8 + n + pos < size:
        raise HeaderError(f"corrupt safetensors file ({size - 8 - n - pos} bytes after the last tensor)")
    return entries, metadata, 8 + n


class Reader:
    """A safetensors file's header (checked by `read_header`), and `get(name)` reading one tensor into
    its own memory."""

    def __init__(self, path):
        self.path = Path(path)
        self.fh = open(self.path, "rb")
        try:
            self.entries, self.metadata, self.start = read_header(self.fh, self.path.stat().st_size)
        except BaseException:
            self.fh.close()
            raise

    def keys(self) -> List[str]:
        """Names in file order (sequential reads)."""
        return sorted(self.entries, key=lambda k: self.entries[k][2])

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def dtype(self, name) -> str:
        return self.entries[name][0]

    def get(self, name):
        import torch

        dt, shape, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self.fh.seek(self.start + begin)
        if end > begin and self.fh.readinto(memoryview(buf.numpy())) != end - begin:
            raise ValueError(f"{self.path}: {name} is truncated")
        return buf.view(getattr(torch, SAFETENSORS[dt][0])).reshape(shape)

    def close(self):
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plan_shards(tensors: List[Tuple[str, tuple, str]], max_bytes: int) -> List[List[Tuple[str, tuple, str]]]:
    """Group (name, shape, dtype) in order into shards of at most max_bytes (a larger tensor gets its own)."""
    shards, cur, size = [], [], 0
    for name, shape, dt in tensors:
        n = _nbytes(shape, dt)
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, dt))
        size += n
    if cur:
        shards.append(cur)
    return shards


def _nbytes(shape, dt) -> int:
    n = SAFETENSORS[dt][1]
    for d in shape:
        n *= d
    return n


class ShardWriter:
    """Writes planned shards; `write(name, tensor)` must be called in plan order. HF file names + index."""

    def __init__(self, out_dir, plan):
        self.out_dir, self.plan = Path(out_dir), plan
        n = len(plan)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                           for i in range(n)]
        self.order = [(i, name, shape, dt) for i, shard in enumerate(plan) for name, shape, dt in shard]
        self.pos, self.fh, self.shard = 0, None, -1

    def _open(self, i):
        if self.fh is not None:
            self.fh.close()
        header, off = {}, 0
        for name, shape, dt in self.plan[i]:
            n = _nbytes(shape, dt)
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.fh = open(self.out_dir / self.names[i], "wb")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)
        self.shard = i

    def write(self, name, tensor) -> None:
        i, want, shape, dt = self.order[self.pos]
        if name != want or tuple(tensor.shape) != tuple(shape) or st_code(tensor.dtype) != dt:
            raise RuntimeError(f"shard writer: got {name} {tuple(tensor.shape)} {tensor.dtype}, planned {want} "
                               f"{tuple(shape)} {dt}")
        if i != self.shard:
            self._open(i)
        import torch
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self.fh.write(memoryview(data.numpy()))
        self.pos += 1

    def finish(self) -> List[str]:
        """Close, check every planned tensor was written, write the index (several shards)."""
        if self.fh is not None:
            self.fh.close()
        if self.pos != len(self.order):
            raise RuntimeError(f"shard writer: {self.pos} of {len(self.order)} planned tensors written")
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, name, _, _ in self.order}
            total = sum(_nbytes(shape, dt) for _, _, shape, dt in self.order)
            atomic_write_json(self.out_dir / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        return list(self.names)
