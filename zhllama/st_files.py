"""Safetensors checkpoints on disk, as the stages that rewrite them (vocab resize, export merge) read them:
which shard files a checkpoint has, how big a shard may be, and how much memory the rewrite took.

One home for what `zhllama vocab resize` and `zhllama merge` share, so neither stage imports the other.
"""

import re
import resource
import sys
from pathlib import Path

from zhllama.errors import UserError
from zhllama.modelio import checkpoint_shards


def input_shards(model_dir):
    """The safetensors files of a checkpoint, in index order (`modelio.checkpoint_shards`, which refuses
    pickled pytorch_model*.bin weights); what resize and merge stream."""
    return checkpoint_shards(model_dir)


def parse_size(text) -> int:
    """Bytes in a size such as 2GB, 500MB or 1.5GiB (K, M, G, T are powers of 1024 here)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()] if m else 0
    size = int(float(m.group(1)) * mult) if m else 0
    if not 1 <= size <= 1 << 50:
        raise UserError(f"--max-shard-size: cannot read '{text}' as a size from 1 byte to 1 PiB (examples: 2GB, 500MB)")
    return size


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a process
    started by a big parent reports the parent's size."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
