"""`--keep-documents`: lay a unit's documents out so that documents that fit a block stay whole, and
the document length distribution every pack reports.

The default layout concatenates documents and cuts the stream every --block-size tokens, so a
10K-token document packed into 16K blocks is split across two blocks half the time: a long-context
stage then rarely sees it whole. With --keep-documents each block is filled from a window of the
next `WINDOW` documents, in input order:

  * the first document of the window that fits the block's remaining room goes in whole;
  * when none fits, the room is filled with the start of a document, which is cut: a longer-than-a-block
    document's remainder if the window holds one (it is cut anyway), else the window's shortest document.
    So gaps are closed with pieces of short documents, and long documents stay whole;
  * a document longer than a block gives whole blocks of its first tokens as it is read; its remainder
    joins the window;
  * what is left at the end of the unit (less than a block) is its tail, concatenated with the other
    units' tails as in the default layout.

Every block is full (no padding: the shard format and the training reader do not change), and the
manifest counts the documents kept whole, cut to fill a gap (and the longest of them), and left in the
tail. Only the order of a unit's tokens differs from the default layout.
"""

import os
from typing import List, Tuple

import numpy as np

WINDOW = 1024          # documents considered for a block's room


def plan_layout(lengths, block_size: int, window: int = WINDOW) -> Tuple[List[Tuple[int, int]], int, dict]:
    """(segments (offset, tokens) in output order, tokens in full blocks, counts) for documents of `lengths`
    tokens that lie back to back in a unit's stream. The first `full` tokens of the output are whole blocks."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    # the window: remaining tokens, next offset, input position and "already cut" of each document in it
    left, at, order, cut = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    segments: List[Tuple[int, int]] = []
    counts = {"fit": 0, "kept_whole": 0, "cut_to_fill": 0, "longest_cut": 0, "in_tail": 0, "longer": 0}
    read, full = 0, 0

    def refill():
        """Read documents until the window holds `window` of them and at least a block of tokens."""
        nonlocal left, at, order, cut, read, full
        add, count, pending = [], len(left), int(left.sum())
        while read < len(lengths) and (count < window or pending < block_size):
            n, start = int(lengths[read]), int(offsets[read])
            if n > block_size:
                counts["longer"] += 1
                k = n // block_size
                segments.extend((start + j * block_size, block_size) for j in range(k))
                full += k
                n, start, cut_already = n - k * block_size, start + k * block_size, True
            else:
                counts["fit"] += 1
                cut_already = False
            if n:
                add.append((n, start, read, cut_already))
                count, pending = count + 1, pending + n
            read += 1
        if add:
            a = np.array(add, dtype=np.int64)
            left, at, order = np.concatenate([left, a[:, 0]]), np.concatenate([at, a[:, 1]]), \
                np.concatenate([order, a[:, 2]])
            cut = np.concatenate([cut, a[:, 3].astype(bool)])

    def take(i: int, n: int) -> None:
        nonlocal left, at, order, cut
        segments.append((int(at[i]), n))
        if n == left[i]:
            counts["kept_whole"] += not cut[i]
            keep = np.arange(len(left)) != i
            left, at, order, cut = left[keep], at[keep], order[keep], cut[keep]
        else:
            if not cut[i]:
                counts["cut_to_fill"] += 1
                counts["longest_cut"] = max(counts["longest_cut"], int(lengths[order[i]]))
            left[i] -= n
            at[i] += n
            cut[i] = True

    while True:
        refill()
        if left.sum() < block_size:
            break
        room = block_size
        while room:
            fits = np.flatnonzero(left <= room)
            if len(fits):
                i = int(fits[np.argmin(order[fits])])          # the first document that fits, whole
            elif cut.any():
                i = int(np.flatnonzero(cut)[0])                # a long document's remainder
            else:
                i = int(np.lexsort((order, left))[0])          # the shortest document
            n = int(min(left[i], room))
            take(i, n)
            room -= n
        full += 1
    counts["in_tail"] = int((~cut).sum())
    for i in np.argsort(order):                                 # the tail, in input order
        segments.append((int(at[i]), int(left[i])))
    return segments, full * block_size, counts


def write_layout(src: np.ndarray, segments: List[Tuple[int, int]], out_path) -> None:
    """Write the stream `src` reordered by `segments` to `out_path` (fsynced), about 1M tokens at a time."""
    with open(out_path, "wb") as f:
        batch, size = [], 0
        for start, n in segments:
            batch.append(src[start:start + n])
            size += n
            if size >= 1 << 20:
                np.concatenate(batch).tofile(f)
                batch, size = [], 0
        if batch:
            np.concatenate(batch).tofile(f)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------ length distribution

def length_histogram(lengths, block_size: int) -> dict:
    """Documents and tokens per power-of-two length bucket (bucket k holds lengths in (2^(k-1), 2^k], k = 0
    for length 1), the longest, and the documents longer than a block. Adds up across units (`add_histograms`)."""
    a = np.asarray(lengths, dtype=np.int64)
    if len(a) == 0:
        return {"documents": [], "tokens": [], "max": 0, "longer_than_block": [0, 0]}
    k = np.ceil(np.log2(np.maximum(a, 1))).astype(np.int64)
    long = a[a > block_size]
    return {"documents": np.bincount(k).tolist(), "tokens": np.bincount(k, weights=a).astype(np.int64).tolist(),
            "max": int(a.max()), "longer_than_block": [int(len(long)), int(long.sum())]}


def add_histograms(a: dict, b: dict) -> dict:
    def add(x, y):
        n = max(len(x), len(y))
        return [(x[i] if i < len(x) else 0) + (y[i] if i < len(y) else 0) for i in range(n)]
    return {"documents": add(a["documents"], b["documents"]), "tokens": add(a["tokens"], b["tokens"]),
            "max": max(a["max"], b["max"]), "longer_than_block": add(a["longer_than_block"], b["longer_than_block"])}


def summarize(hist: dict) -> dict:
    """The manifest's document length distribution (tokens per document, BOS and EOS included)."""
    docs, tokens = hist["documents"], hist["tokens"]
    n, t = sum(docs), sum(tokens)
    return {"documents": n, "tokens": t, "mean": round(t / n, 1) if n else 0.0, "max": hist["max"],
            "buckets": [{"up_to": 1 << k, "documents": d, "tokens": tk}
                        for k, (d, tk) in enumerate(zip(docs, tokens)) if d],
            "longer_than_block": {"documents": hist["longer_than_block"][0], "tokens": hist["longer_than_block"][1]}}
