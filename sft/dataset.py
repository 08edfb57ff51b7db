"""The SFT dataset the training engine consumes, its collate function, and optional packing.

    ds = SFTDataset(["alpaca_zh.json:2", "belle.json"], tokenizer, "chinese-alpaca", max_length=512)
    loader = DataLoader(ds, batch_size=4, sampler=..., collate_fn=make_collate(default_pad_id(tokenizer)))

Every record is tokenized once, eagerly, in `__init__` (deterministic: the same on every rank).
`ds.stats` counts files, records, skipped bad records, dropped and truncated examples and tokens;
They are logged at construction (`stats.log_summary()` for records, `stats.log_examples()` for
examples); `ds.stats.as_dict()` is JSON-ready for the run directory.

Packing (`pack=True`, off by default) concatenates consecutive examples into sequences of at most
`max_length` tokens and gives each a `position_ids` that restarts at 0 at every example. The collate
function then returns no `attention_mask`: HF LLaMA (transformers >= 4.54) reads the restarts in
`position_ids` and builds a block-diagonal causal mask, so no token attends across an example
boundary (tests/test_sft_examples.py checks logits against each example run alone). The forward
must run with `use_cache=False` (as training does anyway): with a KV cache transformers skips that
detection and attention would cross examples. FlashAttention-2 reads the same restarts. The first
token of every example is its BOS/prompt token, labelled -100, so no loss term predicts one example
from the one before it.
"""

import functools
from typing import Dict, List, Optional

import torch

from zhllama.errors import ConfigError
from zhllama.log import Progress, get_logger

from .examples import IGNORE_INDEX, tokenize_record
from .records import load_records
from .templates import get_template

log = get_logger("zhllama.sft.dataset")


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized SFT examples: `__getitem__` -> {"input_ids", "labels"} LongTensors (+ "position_ids"
    when packed).

    specs, field_map, strict, weights, seed: as `zhllama.sft.records.load_records`;
    template: a built-in name, a template file or a `Template`; max_length: tokens per example
    (prompt + response, truncated from the right of the response; an example whose prompt leaves no
    response token is dropped and counted in `stats.dropped`).
    """

    def __init__(self, specs, tokenizer, template, max_length: int = 512, strict: bool = False,
                 field_map=None, weights=None, seed: int = 0, pack: bool = False):
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2, not {max_length}")
        self.template = get_template(template)
        self.max_length = max_length
        self.pack = pack
        records, stats = load_records(specs, field_map=field_map, strict=strict, weights=weights, seed=seed)
        self.stats = stats
        if self.template.has_system is False:
            with_system = sum(r.system is not None for r in records)
            if with_system:
                log.warning("template '%s' has no system slot: the system prompt of %d records is "
                            "not used", self.template.name, with_system)

        examples: List[Dict[str, List[int]]] = []
        cache = {}  # weighted copies are the same Record objects: tokenize each once
        progress = Progress("sft tokenize", logger=log)
        for record in records:
            key = id(record)
            if key not in cache:
                cache[key] = tokenize_record(record, tokenizer, self.template, max_length)
            result = cache[key]
            progress.update(1)
            if result.example is None:
                stats.drop("no_response_token", f"{record.source}: {result.dropped}")
                continue
            stats.truncated += result.truncated
            examples.append(result.example)
        if not examples:
            raise ConfigError(f"no SFT example left: all {len(records)} records were dropped "
                              f"(max_length={max_length}); first: {stats.first_dropped[:1]}")
        stats.examples = len(examples)
        stats.tokens = sum(len(e["input_ids"]) for e in examples)
        stats.trained_tokens = sum(sum(lab != IGNORE_INDEX for lab in e["labels"]) for e in examples)
        self.items = pack_examples(examples, max_length) if pack else examples
        stats.sequences = len(self.items)
        stats.log_examples(log)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.long) for k, v in self.items[i].items()}


def pack_examples(examples, max_length: int) -> List[Dict[str, List[int]]]:
    """Consecutive examples joined greedily, in order, into sequences of at most max_length tokens,
    with position_ids restarting at 0 for each example (see the module docstring)."""
    _check_packing_support()
    packed, cur = [], None
    for ex in examples:
        n = len(ex["input_ids"])
        if cur is None or len(cur["input_ids"]) + n > max_length:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
            packed.append(cur)
        cur["input_ids"].extend(ex["input_ids"])
        cur["labels"].extend(ex["labels"])
        cur["position_ids"].extend(range(n))
    return packed


def _check_packing_support():
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    if masking_utils is None or not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise ConfigError("pack=True needs transformers >= 4.54 (it builds the per-example attention "
                          "mask from position_ids); upgrade transformers or set pack: false")


def default_pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else EOS (LLaMA has no pad token). Any id works: padding is masked
    out of attention and labels."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch, pad_id: int, pad_to_multiple_of: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest: input_ids with pad_id, labels with -100.

    Unpacked: returns input_ids, labels, attention_mask (1 on real tokens, from the lengths, not
    from pad_id, which may equal EOS). Packed (items carry position_ids): returns input_ids, labels,
    position_ids, and no attention_mask, so the model derives the per-example mask from position_ids;
    padding gets positions 0.. of its own, and being on the right it is never attended to.
    """
    longest = max(len(b["input_ids"]) for b in batch)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    packed = any("position_ids" in b for b in batch)
    n = len(batch)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    out = {"input_ids": input_ids, "labels": labels}
    if packed:
        out["position_ids"] = torch.arange(longest, dtype=torch.long).repeat(n, 1)
    else:
        out["attention_mask"] = torch.zeros((n, longest), dtype=torch.long)
    for row, b in enumerate(batch):
        k = len(b["input_ids"])
        input_ids[row, :k] = torch.as_tensor(b["input_ids"])
        labels[row, :k] = torch.as_tensor(b["labels"])
        if packed:
            if "position_ids" in b:  # an unpacked item in a packed batch is one example: 0..k-1
                out["position_ids"][row, :k] = torch.as_tensor(b["position_ids"])
            out["position_ids"][row, k:] = torch.arange(longest - k)
        else:
            out["attention_mask"][row, :k] = 1
    return out


def make_collate(pad_id: int, pad_to_multiple_of: Optional[int] = None):
    """`collate` with its pad id bound (picklable, for DataLoader workers)."""
    return functools.partial(collate, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
