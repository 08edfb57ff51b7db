"""Each source's validation split scored on its own while training: `val_loss/<source>` and
`val_bits_per_char/<source>`, so a user sees English drift while it happens, not after merging.

A source's validation documents (`data pack` puts a document there by a hash of its text) are scored as
`zhllama eval --max-length B --stride B/2` scores the same text, B being the run's block size: each
document is BOS + its ids, cut into windows that score every token once (zhllama/heldout.py), with the
engine's loss. Bits per character divide the summed NLL by the characters the pack counted in the split;
a pack made before zhllama counted them gives the loss only. The whole split is scored at every
evaluation (its size is the pack's `--validation-ratio`); the windows are dealt round-robin to the ranks.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

from zhllama.heldout import Window, bits_per_char, longest_first, window_batch, windows

LOSS, BPC = "val_loss/", "val_bits_per_char/"


@dataclass
class SourceSet:
    name: str
    windows: List[Window]           # this rank's share, longest first
    characters: Optional[int]       # of the whole split; None: the pack did not count them
    documents: int
    tokens: int


class SourceValidation:
    """The validation documents of every source that has some, as this rank's windows."""

    def __init__(self, sources, block_size: int, rank: int, world: int, pad_id: int, batch_size: int):
        self.pad_id, self.batch_size = pad_id, batch_size
        self.sets: List[SourceSet] = []
        stride = max(1, block_size // 2)
        for s in sources:
            docs = s.heldout()
            if not docs:
                continue
            wins = longest_first([w for d in docs for w in windows(d, block_size, stride)])
            self.sets.append(SourceSet(s.name, wins[rank::world], s.characters, len(docs),
                                       sum(len(d) for d in docs)))

    def __len__(self) -> int:
        return len(self.sets)

    def describe(self) -> List[str]:
        """One line per source for the log: what every evaluation scores."""
        lines = []
        for s in self.sets:
            chars = (f"{s.characters:,} characters" if s.characters is not None else
                     "no character count in the pack (made by an older zhllama: re-run `zhllama data pack "
                     "--overwrite` for bits per character)")
            lines.append(f"validation of {s.name}: {s.documents:,} documents, {s.tokens:,} tokens, {chars}")
        return lines

    def batches(self) -> Iterator[tuple]:
        """(source index, batch) over this rank's windows."""
        for k, s in enumerate(self.sets):
            for i in range(0, len(s.windows), self.batch_size):
                yield k, window_batch(s.windows[i:i + self.batch_size], self.pad_id)

    def figures(self, sums) -> dict:
        """Metrics from the summed (NLL in nats, scored tokens) of each source over all ranks."""
        out = {}
        for s, (nll, tokens) in zip(self.sets, sums):
            out[LOSS + s.name] = nll / max(tokens, 1.0)
            if s.characters:
                out[BPC + s.name] = bits_per_char(nll, s.characters)
        return out


def first_and_last(metrics_path) -> dict:
    """Each source's first and last validation figures in a run's metrics.jsonl (summary.json)."""
    out = {}
    path = Path(metrics_path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for r in records:
        for key, value in r.items():
            if not key.startswith(LOSS) or value is None or not math.isfinite(value):
                continue
            name = key[len(LOSS):]
            figure = {"step": r["step"], "loss": value}
            if BPC + name in r:
                figure["bits_per_char"] = r[BPC + name]
            out.setdefault(name, {"first": figure})["last"] = figure
    return out
