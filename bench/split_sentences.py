"""`vocab train`'s sentence splitting: the linear rewrite against the quadratic one it replaced.

    python bench/split_sentences.py [--mb 1 4 16]

For each size, one line of that many MB (UTF-8) of Chinese text, in two shapes: sentences of ~45
bytes ending in "。" (cut at punctuation, gathered into pieces of --max-sentence-length 4192) and no
punctuation at all (hard cuts only). Times `zhllama.vocab.train.split_sentences` and the old
implementation (kept as the reference of tests/test_bad_files.py), checks both give the same pieces,
and prints seconds and the ratio old/new, plus how each grows from the smallest size to the largest
(linear: by the size ratio; quadratic: by its square). The old one is skipped above --old-max-mb.
"""

import argparse
import sys
import time
from pathlib import Path

from zhllama.vocab.train import split_sentences

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_bad_files import reference_split_sentences  # noqa: E402  (the baseline lives with its test)

MAX_BYTES = 4192


def line_of(mb: float, punctuated: bool) -> str:
    unit = "今天天气很好我们去公园散步" + ("。" if punctuated else "")
    n = int(mb * 1_000_000) // len(unit.encode("utf-8"))
    return unit * n


def timed(fn, text):
    t0 = time.perf_counter()
    pieces = list(fn(text, MAX_BYTES))
    return time.perf_counter() - t0, pieces


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[1, 4, 16])
    ap.add_argument("--old-max-mb", type=float, default=16)
    args = ap.parse_args(argv)
    for punctuated in (True, False):
        shape = "sentences ending in 。" if punctuated else "no punctuation (hard cuts)"
        print(f"{shape}:")
        new_t, old_t = {}, {}
        for mb in args.mb:
            text = line_of(mb, punctuated)
            new_t[mb], new = timed(split_sentences, text)
            row = f"  {mb:6g} MB  new {new_t[mb]:7.3f}s"
            if mb <= args.old_max_mb:
                old_t[mb], old = timed(reference_split_sentences, text)
                assert old == new, f"{mb} MB: the two disagree"
                row += f"  old {old_t[mb]:8.3f}s  old/new {old_t[mb] / new_t[mb]:7.1f}x"
            print(row)
        lo, hi = min(args.mb), max(args.mb)
        growth = f"  {lo:g} -> {hi:g} MB ({hi / lo:g}x the text): new x{new_t[hi] / new_t[lo]:.1f}"
        if hi in old_t and lo in old_t:
            growth += f", old x{old_t[hi] / old_t[lo]:.1f}"
        print(growth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
