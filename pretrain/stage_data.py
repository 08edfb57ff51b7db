"""Where the engine gets the data of a stage whose format lives in another folder.

The engine reads `zhllama data pack` shards itself (stage1, stage2). A stage with its own data format
(sft: instruction records and a prompt template) registers a `StageData` here from its own folder, so
pretrain never imports that stage (docs/architecture.md: sft sits above pretrain). The application
imports the registering modules before it runs the engine (zhllama/app/train.py).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from zhllama.errors import ConfigError


@dataclass
class Data:
    train: object
    validation: object  # a dataset of blocks, a tuple of them (one per source of a mixture), or None
    collate: object  # list of dataset items -> dict of tensors with input_ids, labels (+ attention_mask)
    description: str
    mixture: Optional[object] = None  # packed stages: pretrain/mixture.py's Mixture (order, sources, shares)


@dataclass
class StageData:
    """build(cfg, preset, tokenizer) -> Data; run_record(cfg) -> extra keys for the run record saved with
    the adapter; run_files(cfg) -> {file name: JSON object} written into the run directory;
    fingerprint(cfg) -> a JSON object that changes when the data changes (checkpoints record it, and a
    resume on other data is refused; see pretrain/checkpoint.py); check(cfg): the stage's own settings (a
    template file), refused by `zhllama train` before any model or process group (also on --dry-run)."""
    build: Callable
    run_record: Optional[Callable] = None
    run_files: Optional[Callable] = None
    fingerprint: Optional[Callable] = None
    check: Optional[Callable] = None


_REGISTRY: Dict[str, StageData] = {}


def register(stage: str, data: StageData) -> None:
    _REGISTRY[stage] = data


def registered(stage: str, *, required: bool = False) -> Optional[StageData]:
    """The registered data of `stage`, or None for a stage that trains on packed shards. A stage that
    needs one (`required`) and has none is a setup error, named."""
    found = _REGISTRY.get(stage)
    if found is None and required:
        raise ConfigError(f"stage {stage}: no data reader registered (run it through `zhllama train`, which "
                          f"loads every stage's reader; registered: {sorted(_REGISTRY) or 'none'})")
    return found
