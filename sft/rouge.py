"""Language-aware ROUGE-L and an index that finds near-duplicate instructions fast.

Why not `rouge_score`: its tokenizer keeps only [a-z0-9] runs, so a Chinese instruction has no tokens
and every Chinese pair scores 0: Stanford's self-instruct filter keeps every Chinese duplicate. Here
Chinese text is cut into words with jieba; English keeps rouge_score's tokenization exactly, so English
scores are identical to the ones Stanford's generator computed.

Why an index: self-instruct checks each new instruction against the whole pool (seeds + everything kept
so far). Stanford scores all pairs, which is O(pool) LCS computations per candidate and takes hours at
50k. ROUGE-L F = 2 * LCS / (m + n), and an LCS is a common sub-multiset of both token lists, so
LCS <= overlap = sum over tokens of min(count in a, count in b). An inverted index (token -> ids, counts)
gives the overlap with every pool entry in one numpy `bincount`; only entries whose bound
2 * overlap / (m + n) exceeds the threshold get an exact LCS, computed bit-parallel (Hyyro 2004) on
Python integers. The pruning is exact: the index returns the same decisions as the all-pairs scan
(tests/test_rouge.py checks it against rouge_score on random data).
"""

import logging
import re
from collections import Counter

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_jieba = None


def _get_jieba():
    global _jieba
    if _jieba is None:
        import jieba
        jieba.setLogLevel(logging.WARNING)  # "Building prefix dict..." on every first use otherwise
        _jieba = jieba
    return _jieba


def tokenize_en(text: str) -> list:
    """rouge_score's default tokenization (lowercase, [a-z0-9] runs), so English scores match it."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def tokenize_zh(text: str) -> list:
    """jieba words, lowercased; whitespace and punctuation-only tokens dropped.

    `str.isalnum` is true for CJK characters and digits, false for ，。、！ and ASCII punctuation.
    """
    words = _get_jieba().lcut(text)
    return [w for w in (t.strip().lower() for t in words) if w and any(ch.isalnum() for ch in w)]


def tokenize(text: str, lang: str) -> list:
    if lang == "zh":
        return tokenize_zh(text)
    if lang == "en":
        return tokenize_en(text)
    raise ValueError(f"unknown language {lang!r} (expected 'zh' or 'en')")


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two token sequences, bit-parallel.

    One big-integer step per token of `b` instead of len(a) * len(b) Python operations.
    """
    if not a or not b:
        return 0
    masks = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return _lcs_with_masks(masks, len(a), b)


def _lcs_with_masks(masks: dict, m: int, b) -> int:
    full = (1 << m) - 1
    v = full
    for tok in b:
        bits = masks.get(tok)
        if bits is None:
            continue
        u = v & bits
        v = ((v + u) | (v - u)) & full
    return m - bin(v).count("1")


def fmeasure(lcs: int, m: int, n: int) -> float:
    """ROUGE-L F1 with rouge_score's exact float arithmetic (precision, recall, then harmonic mean),
    so threshold decisions agree with it to the last bit."""
    if lcs == 0 or m == 0 or n == 0:
        return 0.0
    precision, recall = lcs / n, lcs / m
    return 2 * precision * recall / (precision + recall)


def rouge_l(a: str, b: str, lang: str) -> float:
    """ROUGE-L F1 between two texts (symmetric)."""
    ta, tb = tokenize(a, lang), tokenize(b, lang)
    return fmeasure(lcs_length(ta, tb), len(ta), len(tb))



def edited(rng, seq, alphabet, edits: int, keep: int = 0) -> list:
    """A near-duplicate of `seq`: a copy after `edits` random deletions, insertions and substitutions
    (tokens from `alphabet`); deletions only while more than `keep` tokens are left. tests/test_rouge.py
    and bench/selfinstruct_filter.py make the near-duplicates they filter with it."""
    seq = list(seq)
    for _ in range(edits):
        op = rng.random()
        if op < 0.34 and len(seq) > keep:
            del seq[rng.randrange(len(seq))]
        elif op < 0.67:
            seq.insert(rng.randint(0, len(seq)), rng.choice(alphabet))
        elif seq:
            seq[rng.randrange(len(seq))] = rng.choice(alphabet)
    return seq

class _Buffer:
    """A growable int32 numpy array (amortised O(1) append, zero-copy view of the filled part)."""

    __slots__ = ("data", "size")

    def __init__(self, capacity: int = 4):
        self.data = np.empty(capacity, dtype=np.int32)
        self.size = 0

    def append(self, value: int) -> None:
        if self.size == len(self.data):
            grown = np.empty(2 * len(self.data), dtype=np.int32)
            grown[: self.size] = self.data
            self.data = grown
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class SimilarityIndex:
    """A pool of texts that answers "which pool entry has ROUGE-L F > threshold with this text?".

    `add(text)` tokenizes and indexes a text; `nearest(text)` returns (id, score) of the most similar
    entry scoring above the threshold, or (None, 0.0) when there is none. Exact, not approximate.
    """

    def __init__(self, lang: str, threshold: float = 0.7):
        if lang not in ("zh", "en"):
            raise ValueError(f"unknown language {lang!r} (expected 'zh' or 'en')")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.lang = lang
        self.threshold = threshold
        self._vocab = {}                 # token -> int id
        self._docs = []                  # per entry: tuple of token ids
        self._lengths = _Buffer(1024)
        self._post_ids = {}              # token id -> _Buffer of entry ids
        self._post_counts = {}           # token id -> _Buffer of counts in that entry
        self.lcs_computed = 0            # exact LCS evaluations (to show how much the bound prunes)

    def __len__(self) -> int:
        return len(self._docs)

    def tokenize(self, text: str) -> list:
        return tokenize(text, self.lang)

    def add(self, text: str) -> int:
        return self.add_tokens(self.tokenize(text))

    def add_tokens(self, tokens) -> int:
        doc_id = len(self._docs)
        ids = tuple(self._vocab.setdefault(t, len(self._vocab)) for t in tokens)
        self._docs.append(ids)
        self._lengths.append(len(ids))
        for tid, count in Counter(ids).items():
            if tid not in self._post_ids:
                self._post_ids[tid] = _Buffer()
                self._post_counts[tid] = _Buffer()
            self._post_ids[tid].append(doc_id)
            self._post_counts[tid].append(count)
        return doc_id

    def nearest(self, text: str):
        return self.nearest_tokens(self.tokenize(text))

    def nearest_tokens(self, tokens, first: bool = False):
        """(entry id, ROUGE-L F) of the most similar entry with F > threshold, else (None, 0.0).

        With `first`, stop at the first entry above the threshold (enough to reject a candidate)."""
        m = len(tokens)
        if m == 0 or not self._docs:
            return None, 0.0
        counts = Counter(self._vocab[t] for t in tokens if t in self._vocab)
        if not counts:
            return None, 0.0
        part_ids, part_w = [], []
        for tid, c in counts.items():
            part_ids.append(self._post_ids[tid].view())
            part_w.append(np.minimum(self._post_counts[tid].view(), c))
        ids = np.concatenate(part_ids)
        overlap = np.bincount(ids, weights=np.concatenate(part_w), minlength=len(self._docs))
        lengths = self._lengths.view()
        bound = 2.0 * overlap / (m + lengths)
        # Margin keeps the pruning exact despite float rounding; the exact check below decides.
        survivors = np.nonzero(bound > self.threshold - 1e-9)[0]
        if len(survivors) == 0:
            return None, 0.0
        survivors = survivors[np.argsort(-bound[survivors], kind="stable")]

        masks = {}
        for i, tok in enumerate(self._vocab.get(t, -1 - j) for j, t in enumerate(tokens)):
            masks[tok] = masks.get(tok, 0) | (1 << i)
        best_id, best = None, 0.0
        for doc_id in survivors.tolist():
            if bound[doc_id] <= best:        # sorted by bound: nothing later can beat `best`
                break
            doc = self._docs[doc_id]
            self.lcs_computed += 1
            score = fmeasure(_lcs_with_masks(masks, m, doc), m, len(doc))
            if score > self.threshold and score > best:
                best_id, best = doc_id, score
                if first:
                    break
        return best_id, best
