"""Self-instruct's similarity filter: the index against Stanford's all-pairs rouge_score loop.

Filters N candidate instructions (default 10,000; a share of them near-duplicates of pool entries)
against a pool (default 20,000) the way self-instruct does: a candidate is dropped when its ROUGE-L F
with any pool entry is > 0.7, and each kept candidate joins the pool.

- ours: `zhllama.sft.rouge.SimilarityIndex` (inverted index + overlap bound + bit-parallel LCS).
- baseline: Stanford's loop, `rouge_scorer._score_lcs` against every pool entry, on the same tokens
  (jieba words for Chinese). Stanford spreads it over a multiprocessing Pool; here it runs in one
  process, like ours. It is far too slow to run on all candidates, so it is timed on a subsample
  (--naive-sample, the first candidates, against the full initial pool) and extrapolated to N: the
  printed figure says so. Extrapolating with the initial pool size underestimates the baseline a
  little (the real pool grows as candidates are kept).
Both give the same decisions on the subsample (checked, printed). Tokenization (identical for both)
is timed separately.

Data: Chinese sentences from ../shared/data/zh/news_train.txt when present (clipped to instruction
length), else the bundled zhllama/data/zh_sample.txt; --lang en uses the bundled en_sample.txt.

  python bench/selfinstruct_filter.py                       # 20k pool, 10k candidates, Chinese
  python bench/selfinstruct_filter.py --pool 2000 --candidates 1000 --naive-sample 20
"""

import argparse
import random
import re
import sys
import time
from pathlib import Path

from rouge_score import rouge_scorer

from zhllama.sft.rouge import SimilarityIndex, edited, tokenize

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def _sentences(lang: str):
    if lang == "zh":
        news = SHARED / "data" / "zh" / "news_train.txt"
        src = news if news.exists() else REPO / "zhllama" / "data" / "zh_sample.txt"
        parts = re.split(r"(?<=[。！？；])", src.read_text("utf-8"))
    else:
        src = REPO / "zhllama" / "data" / "en_sample.txt"
        parts = re.split(r"(?<=[.!?;])\s+", src.read_text("utf-8"))
    out, seen = [], set()
    for s in parts:
        s = " ".join(s.split())
        if lang == "zh" and len(s) > 60:            # instruction length: clip at a comma
            cut = max(s.rfind("，", 0, 60), s.rfind("、", 0, 60))
            s = s[:cut] if cut >= 10 else s[:60]
        if (len(s) >= 8 if lang == "zh" else len(s.split()) >= 4) and s not in seen:
            seen.add(s)
            out.append(s)
    return out, src


def _make_data(lang, n_pool, n_cand, near_share, seed):
    rng = random.Random(seed)
    sents, src = _sentences(lang)
    rng.shuffle(sents)
    need = n_pool + n_cand
    if len(sents) < need:                           # small source: recombine clauses
        clauses = [c for s in sents for c in re.split(r"[，,]", s) if len(c) >= 4]
        joiner = "，" if lang == "zh" else ", "
        seen = set(sents)
        while len(sents) < need:
            s = joiner.join(rng.sample(clauses, 2))
            if s not in seen:
                seen.add(s)
                sents.append(s)
    pool = sents[:n_pool]
    fresh = sents[n_pool:n_pool + n_cand]
    cands = []
    for i in range(n_cand):
        if rng.random() < near_share:
            cands.append(("near", rng.choice(pool)))  # mutated after tokenization
        else:
            cands.append(("fresh", fresh[i]))
    return pool, cands, src


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lang", choices=["zh", "en"], default="zh")
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--candidates", type=int, default=10000)
    ap.add_argument("--near-share", type=float, default=0.3, help="share of candidates that are near-duplicates")
    ap.add_argument("--naive-sample", type=int, default=10, help="candidates the baseline is timed on")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    pool_text, cands, src = _make_data(args.lang, args.pool, args.candidates, args.near_share, args.seed)
    print(f"data: {src} ({args.lang}); pool {len(pool_text):,}, candidates {len(cands):,} "
          f"({args.near_share:.0%} near-duplicates), threshold {args.threshold}")

    t0 = time.perf_counter()
    pool = [tokenize(s, args.lang) for s in pool_text]
    vocab = sorted({t for toks in pool for t in toks})
    cand_toks = [edited(rng, tokenize(s, args.lang), vocab, rng.randint(1, 3), keep=2) if kind == "near"
                 else tokenize(s, args.lang) for kind, s in cands]
    t_tok = time.perf_counter() - t0
    mean_len = sum(map(len, pool)) / len(pool)
    print(f"tokenize ({'jieba' if args.lang == 'zh' else 'rouge_score'}): {t_tok:.2f}s for "
          f"{len(pool) + len(cand_toks):,} texts (mean {mean_len:.1f} tokens; same for both methods)")

    # Correctness on the subsample: both methods against the initial pool.
    k = min(args.naive_sample, len(cand_toks))
    index = SimilarityIndex(args.lang, args.threshold)
    t0 = time.perf_counter()
    for toks in pool:
        index.add_tokens(toks)
    t_build = time.perf_counter() - t0
    ours_dec = [index.nearest_tokens(c, first=True)[0] is not None for c in cand_toks[:k]]

    t0 = time.perf_counter()
    naive_dec = []
    for c in cand_toks[:k]:
        scores = [rouge_scorer._score_lcs(c, p).fmeasure for p in pool]
        naive_dec.append(max(scores) > args.threshold)
    t_naive = time.perf_counter() - t0
    agree = ours_dec == naive_dec
    per_naive = t_naive / k

    # The full sequential filter with the index.
    index.lcs_computed = 0
    t0 = time.perf_counter()
    kept = 0
    for c in cand_toks:
        if index.nearest_tokens(c, first=True)[0] is None:
            index.add_tokens(c)
            kept += 1
    t_filter = time.perf_counter() - t0
    ours_total = t_build + t_filter
    naive_total = per_naive * len(cand_toks)

    print(f"subsample of {k}: rejected {sum(naive_dec)} (baseline) / {sum(ours_dec)} (index); "
          f"decisions identical: {agree}")
    print(f"index: kept {kept:,}, rejected {len(cand_toks) - kept:,}; exact LCS computed for "
          f"{index.lcs_computed:,} pairs (all-pairs would be ~{len(cand_toks) * (len(pool) + kept / 2):,.0f})")
    print()
    print(f"{'method':<52}{'seconds':>12}{'ms/candidate':>14}")
    print(f"{'index (build ' + f'{t_build:.2f}s' + ' + filter)':<52}{ours_total:>12.2f}{1000 * ours_total / len(cand_toks):>14.3f}")
    print(f"{'rouge_score all-pairs loop (EXTRAPOLATED from ' + str(k) + ')':<52}{naive_total:>12.1f}{1000 * per_naive:>14.1f}")
    print(f"speedup: {naive_total / ours_total:,.0f}x  (baseline measured on {k} candidates x {len(pool):,} pool "
          f"in {t_naive:.1f}s, one process)")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
