"""Scoring held-out documents: sliding windows that score every token once, and their padded batches.

One home for what `zhllama eval` (export/evaluate.py) and the trainer's per-source validation
(pretrain/engine.py) both do, so the two figures are the same computation: a document's ids (BOS + text
tokens) are cut into windows of at most `max_length` tokens that advance by `stride`; each window scores
only the positions no earlier window scored, with the rest as context. Bits per character divide the
summed NLL (nats) by ln 2 and by the characters of the scored text.
"""

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch

from .loss import IGNORE_INDEX


@dataclass
class Window:
    ids: List[int]
    first: int          # positions >= first are scored (each predicted from the positions before it)
    start: int = 0      # where the window begins in its document


def windows(ids: Sequence[int], max_length: int, stride: int) -> List[Window]:
    """Sliding windows over one document that score every position 1..len-1 exactly once."""
    if len(ids) < 2:
        return []
    ids = list(ids)
    out, begin, scored_to = [], 0, 1
    while True:
        end = min(begin + max_length, len(ids))
        out.append(Window(ids[begin:end], scored_to - begin, begin))
        scored_to = end
        if end == len(ids):
            return out
        begin += stride      # stride < max_length: the next window overlaps, scoring only new tokens


def longest_first(items: List[Window]) -> List[Window]:
    """Windows longest first (ties in input order): padding stays small and the first batch shows the peak
    memory. Deterministic, so every rank of a run sorts alike."""
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (-len(items[i].ids), i))]


def window_batch(batch: Sequence[Window], pad_id: int) -> dict:
    """input_ids, attention_mask and labels (-100 outside the scored positions) of a list of windows."""
    width = max(len(w.ids) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, w in enumerate(batch):
        n = len(w.ids)
        ids[row, :n] = torch.tensor(w.ids)
        mask[row, :n] = 1
        labels[row, w.first:n] = ids[row, w.first:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer) -> int:
    """The id padding a batch of windows (masked out, never scored): pad, else EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def bits_per_char(nll_nats: float, characters: int) -> float:
    return nll_nats / math.log(2) / characters
