"""Training on several packs at once, with weights: `data: [packed/zh:0.85, packed/en:0.15]`.

Which sequences a step trains on is a pure function of (seed, step), so a resumed run and a run on
another world size see exactly what an uninterrupted run would (the engine keeps `positions_for_rank`:
each rank takes its contiguous slice of the step's list).

* **How many of each source** (`MixtureOrder.step_counts`): each step hands out its `global_batch`
  sequences by the largest-remainder (Hamilton) method applied to what every source is still owed:
  source i's deficit before step t is `p_i * G * t - (sequences it got in steps 0..t-1)`, plus its
  quota `p_i * G` for step t; each source gets the whole part of that (never below 0) and the seats left
  over go to the largest remainders (ties: the earlier source). No random draw is involved, and after
  every step each source's total is within one sequence of its target `p_i * G * (t+1)`: over any 100
  steps its share is within 2 / (100 G) of its weight. The weights are exact fractions of what was
  written ("0.85" is 17/20), so no rounding drifts over a long run.
* **Where in the step** (`MixtureOrder.index`): the step's source labels are put in a seeded random
  order (numpy PCG64 seeded by (seed, MIX_TAG, step)), so every rank's slice gets the mixture's blend,
  not one source.
* **Which block** of a source: the source's own endless `BlockOrder` (a fresh seeded permutation per
  epoch): a source that runs out starts its next epoch without touching the others' orders. Source 0
  uses the run's seed, so `data: [one_pack]` gives exactly the sequences a single pack always gave;
  source i > 0 uses a seed derived from (seed, i).

The engine also scores each source's validation split on its own (`Source.heldout`, see engine.py).
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from zhllama.corpus import parse_weighted_spec
from zhllama.errors import ConfigError, UserError

from .shards import BlockOrder, PackedBlocks, read_manifest, split_counts, split_documents

MIX_TAG = 0x6D6978  # "mix": keeps the step shuffle's seed apart from BlockOrder's (seed, epoch) seeds


@dataclass
class Source:
    """One pack of the mixture."""
    name: str                              # the pack dir's name, de-duplicated (val_loss/<name>)
    path: Path
    weight: Fraction                       # as written; 0: scored on validation, never trained on
    train: Optional[PackedBlocks]          # None when the weight is 0
    validation: Optional[PackedBlocks]     # None when the pack has no validation block
    characters: Optional[int]              # of the validation split's documents (None: an older pack)

    def heldout(self) -> List[np.ndarray]:
        """The validation split's documents (BOS + ids, no EOS), as `zhllama eval` scores the text."""
        return split_documents(self.path, "validation") if self.validation is not None else []


def source_names(paths: Sequence[Path]) -> List[str]:
    """Each pack dir's name; a name seen before gets -2, -3, ... (a/packed, b/packed -> packed, packed-2)."""
    names = []
    for p in paths:
        base = Path(p).resolve().name or "data"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def parse_sources(specs: Sequence[str]) -> List[tuple]:
    """(path, exact weight) of each `path[:weight]` spec; an unweighted path weighs 1."""
    if not specs:
        raise ConfigError("config: key 'data' is required (one or more `zhllama data pack` directories)")
    out = []
    for spec in specs:
        path, weight = parse_weighted_spec(spec)
        out.append((Path(path), Fraction(1) if weight is None else Fraction(str(weight))))
    if sum(w for _, w in out) <= 0:
        raise ConfigError(f"config: key 'data': every weight is 0 ({', '.join(map(str, specs))}); at least one "
                          "source must be trained on")
    return out


def _check_compatible(paths: Sequence[Path]) -> None:
    """Every pack must share one tokenizer and block size: a mismatch names both packs."""
    first = None
    for p in paths:
        m = read_manifest(p)
        tok = m["tokenizer"]
        if first is None:
            first = (p, tok, int(m["block_size"]))
            continue
        p0, tok0, bs0 = first
        if tok["fingerprint"] != tok0["fingerprint"]:
            raise UserError(f"config: key 'data': {p0} was packed with tokenizer {tok0['path']} (fingerprint "
                            f"{tok0['fingerprint'][:12]}) and {p} with {tok['path']} (fingerprint "
                            f"{tok['fingerprint'][:12]}); a mixture needs one tokenizer: re-pack one of them")
        if int(m["block_size"]) != bs0:
            raise UserError(f"config: key 'data': {p0} holds blocks of {bs0} tokens and {p} blocks of "
                            f"{m['block_size']}; a mixture needs one block size: re-pack one of them")


def load_sources(specs: Sequence[str], tokenizer_path, block_size: int) -> List[Source]:
    """The mixture's sources, checked against each other and against the run's tokenizer and block size."""
    parsed = parse_sources(specs)
    paths = [p for p, _ in parsed]
    _check_compatible(paths)
    sources = []
    for (path, weight), name in zip(parsed, source_names(paths)):
        kw = dict(expect_tokenizer=tokenizer_path, expect_block_size=block_size)
        train = PackedBlocks(path, "train", **kw) if weight > 0 else None
        if train is not None and len(train) == 0:
            raise UserError(f"{path}: the training split holds no block")
        val = PackedBlocks(path, "validation", **kw)
        val = val if len(val) else None
        if train is None and val is None:
            raise UserError(f"{path}: weight 0 and no validation split: the run would neither train on it nor "
                            "score it")
        chars = split_counts(read_manifest(path))["validation"].get("characters")
        sources.append(Source(name, path, weight, train, val, chars))
    return sources


class MixedBlocks:
    """The trained sources' training blocks under one id space: source k's block b is `offsets[k] + b`."""

    def __init__(self, datasets: Sequence[PackedBlocks]):
        self.datasets = list(datasets)
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in self.datasets])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, int(i), side="right")) - 1
        return self.datasets[k][int(i) - int(self.offsets[k])]


def source_seed(seed: int, k: int) -> int:
    """The BlockOrder seed of source k: the run's seed for source 0, one derived from (seed, k) after."""
    return int(seed) if k == 0 else int(np.random.SeedSequence([int(seed), k]).generate_state(1)[0])


class MixtureOrder:
    """Stream position -> id in `MixedBlocks`, for sources of `sizes` blocks mixed by `weights`.

    Positions [t*G, (t+1)*G) are step t's slots (G = global batch). The counts per step need the deficits
    of the steps before, so they are computed forward from step 0 and the state of the latest step is kept:
    training asks for steps in order, and a resume at step k recomputes k cheap steps once.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[Fraction], seed: int, global_batch: int):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source")
        total = sum(weights)
        self.shares = [Fraction(w) / total for w in weights]
        self.seed, self.global_batch = int(seed), int(global_batch)
        self.orders = [BlockOrder(n, source_seed(seed, k)) for k, n in enumerate(sizes)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._reset()
        self._table_step, self._table = -1, None

    # how many sequences of each source ------------------------------------------------------------
    def _reset(self):
        self._step = 0                                     # the state is that before this step
        self._consumed = [0] * len(self.shares)            # sequences of each source in steps < _step
        self._owed = [Fraction(0)] * len(self.shares)      # target minus consumed, before _step

    def _allocate(self) -> List[int]:
        """Step `_step`'s counts: largest remainder on each source's deficit plus its quota."""
        due = [o + s * self.global_batch for o, s in zip(self._owed, self.shares)]
        counts = [max(math.floor(d), 0) for d in due]
        left = self.global_batch - sum(counts)
        by_remainder = sorted(range(len(due)), key=lambda k: (-(due[k] - counts[k]), k))
        for k in by_remainder[:left]:
            counts[k] += 1
        return counts

    def _advance_to(self, step: int) -> None:
        if step < self._step:
            self._reset()
        while self._step < step:
            counts = self._allocate()
            self._owed = [o + s * self.global_batch - c for o, s, c in zip(self._owed, self.shares, counts)]
            self._consumed = [a + c for a, c in zip(self._consumed, counts)]
            self._step += 1

    def step_counts(self, step: int) -> List[int]:
        """Sequences of each source in step `step`."""
        self._advance_to(step)
        return self._allocate()

    def consumed(self, step: int) -> List[int]:
        """Sequences of each source in steps 0..step-1."""
        self._advance_to(step)
        return list(self._consumed)

    # which sequence in each slot ------------------------------------------------------------------
    def step_table(self, step: int) -> np.ndarray:
        """The `MixedBlocks` ids of step `step`'s G slots, in slot order."""
        if step != self._table_step:
            counts, before = self.step_counts(step), self.consumed(step)
            labels = np.repeat(np.arange(len(counts)), counts)
            if len(counts) > 1:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, MIX_TAG, int(step)])))
                labels = labels[rng.permutation(len(labels))]
            nth = [0] * len(counts)
            table = np.empty(len(labels), dtype=np.int64)
            for slot, k in enumerate(labels):
                table[slot] = self.offsets[k] + self.orders[k].index(before[k] + nth[k])
                nth[k] += 1
            self._table_step, self._table = step, table
        return self._table

    def index(self, position: int) -> int:
        step, slot = divmod(int(position), self.global_batch)
        return int(self.step_table(step)[slot])


class Mixture:
    """The sources, their training blocks under one id space (`train`) and the order over them."""

    def __init__(self, sources: List[Source], seed: int, global_batch: int):
        self.sources = sources
        self.trained = [s for s in sources if s.weight > 0]
        self.train = MixedBlocks([s.train for s in self.trained])
        self.order = MixtureOrder([len(s.train) for s in self.trained], [s.weight for s in self.trained],
                                  seed, global_batch)

    def step_counts(self, step: int) -> dict:
        return dict(zip((s.name for s in self.trained), self.order.step_counts(step)))

    def shares(self, steps_done: int) -> dict:
        """Each trained source's share of the sequences of steps 0..steps_done-1."""
        consumed = self.order.consumed(steps_done)
        total = max(sum(consumed), 1)
        return {s.name: c / total for s, c in zip(self.trained, consumed)}

    def describe(self) -> str:
        parts = [f"{s.name} {float(s.weight):g}" + ("" if s.weight > 0 else " (validation only)")
                 for s in self.sources]
        blocks = f"{len(self.train):,} blocks of {self.trained[0].train.block_size} tokens"
        if len(self.sources) == 1:
            return f"{blocks} from {self.sources[0].path}"
        return f"{blocks} from {len(self.sources)} packs mixed by weight: {', '.join(parts)}"
