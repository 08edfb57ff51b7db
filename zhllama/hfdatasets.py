"""Hugging Face datasets as inputs: a folder written by `save_to_disk`, and a Hub dataset by name.

* A **saved dataset** (`Dataset.save_to_disk`: `state.json` and `data-*.arrow`; `DatasetDict.save_to_disk`:
  `dataset_dict.json` and one such folder per split) is read as the Arrow files of one split, in the
  dataset's order (`saved_dataset_files`): a `Dataset` whole, a `DatasetDict`'s split by `--split`.
  The files are then read like any Arrow file (`zhllama.columnar`).
* A **Hub dataset** is named `hf://OWNER/NAME[@REVISION][/CONFIG]`, and only so: a local path is never
  sent to the Hub, and a Hub name is never read from a local folder that happens to carry its name
  (refused). It is streamed (`datasets.load_dataset(..., streaming=True)`), pinned to the commit its
  revision resolves to (`resolve`), in the stream's own shards (its data files), so that a pack cut
  into those shards is deterministic and resumable. Offline (`HF_HUB_OFFLINE=1`) it is one line.

`datasets` takes seconds to import: it is imported only here, and only when one of these is read.
"""

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional, Tuple
from urllib.parse import quote, unquote

from .columnar import check_pyarrow, check_text
from .errors import InputError
from .inputfile import MAX_LINE_BYTES
from .log import get_logger
from .model_config import TRUST_REMOTE_CODE
from .versions import check_versions

log = get_logger("zhllama.hfdatasets")

HUB_PREFIX = "hf://"
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
_TRUE = {"1", "ON", "YES", "TRUE"}      # huggingface_hub's reading of a boolean environment variable
# Before 2.16 `load_dataset` ran a Hub dataset's loading script without asking (no trust_remote_code);
# 2.16 to 3.x ask on stdin unless it is False; 4.0 dropped scripts. Checked with pyarrow's floor (columnar).
DATASETS_FLOOR = {"datasets": ("2.16", "older releases run a Hub dataset's loading script without asking")}


def _datasets(what):
    try:
        import datasets
    except ImportError:
        raise InputError(what, "reading a Hugging Face dataset needs the datasets package "
                               "(pip install datasets)") from None
    check_versions(DATASETS_FLOOR)
    check_pyarrow()
    return datasets


# ------------------------------------------------------------------------------------- saved datasets

def is_saved_dataset(path) -> bool:
    """A folder `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in SAVED_DATASET_FILES)


@contextlib.contextmanager
def _no_tqdm_monitor():
    """datasets loads a saved dataset's files through tqdm's thread_map, whose monitor thread outlives
    it; a second thread makes `data pack` start its workers by spawn (seconds each) instead of fork.
    tqdm's documented switch (`monitor_interval = 0`) keeps it from starting, here only."""
    import tqdm                            # a dependency of datasets, loaded with it
    before = tqdm.tqdm.monitor_interval
    tqdm.tqdm.monitor_interval = 0
    try:
        yield
    finally:
        tqdm.tqdm.monitor_interval = before


def saved_dataset_files(path, split: str = "train") -> List[Path]:
    """The Arrow files of a saved dataset (of its split `split` if it is a DatasetDict), in order."""
    datasets = _datasets(path)
    try:
        with _no_tqdm_monitor():
            ds = datasets.load_from_disk(str(path), keep_in_memory=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(path, f"not a readable saved dataset ({first})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(path, f"the dataset has no split '{split}' (splits: {', '.join(ds)}; "
                                   "choose one with --split, or give the split's folder)")
        ds, what = ds[split], f"split '{split}'"
    else:
        what = "a Dataset without splits, read whole"
    files = [Path(f["filename"]) for f in ds.cache_files]
    if not files:
        raise InputError(path, "the saved dataset lists no data file")
    folder = Path(os.path.abspath(path))
    for f in files:     # state.json may name any path ("../x.arrow", "/home/..."): only the folder's own are read
        if not Path(os.path.abspath(f)).is_relative_to(folder):
            raise InputError(path, f"the saved dataset names a data file outside its folder: {f}")
    log.info("%s: saved dataset, %s: %d rows in %d Arrow file(s)", path, what, ds.num_rows, len(files))
    return files


# ------------------------------------------------------------------------------------------ the Hub

@dataclass(frozen=True)
class HubDataset:
    """A Hub dataset's split; `revision` is a commit and `shards` known once `resolve`d."""
    repo: str
    split: str = "train"
    config: Optional[str] = None
    revision: Optional[str] = None
    shards: int = 0

    @property
    def spec(self) -> str:
        """The `hf://` name (with the resolved commit once resolved)."""
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo}{rev}" + (f"/{self.config}" if self.config else "")

    @property
    def key(self) -> str:
        """What identifies the data read: name, commit, config and split."""
        return f"{self.spec}?split={self.split}"

    @property
    def name(self) -> str:
        return self.repo.replace("/", "_") + (f"_{self.config}" if self.config else "") + f"_{self.split}"

    def __str__(self) -> str:
        return f"{self.spec} (split {self.split})"


def is_hub_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


def parse_hub_spec(spec: str, split: str = "train") -> HubDataset:
    """`hf://OWNER/NAME[@REVISION][/CONFIG]` (a revision holding '/' written %2F, as in
    refs%2Fconvert%2Fparquet) -> HubDataset; one line naming the spec when it is not one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    parts = spec[len(HUB_PREFIX):].split("/")
    if len(parts) > 3 or not all(parts):
        raise InputError(spec, "a Hub dataset is hf://OWNER/NAME, hf://OWNER/NAME/CONFIG or "
                               "hf://OWNER/NAME@REVISION/CONFIG")
    repo, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    repo, _, revision = repo.partition("@")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise InputError(spec, f"not a Hub dataset name ({e})") from None
    if os.path.exists(repo):
        raise InputError(spec, f"a local '{repo}' exists here, and datasets would read it instead of the "
                               f"Hub; give the local path without {HUB_PREFIX}, or run from another folder")
    return HubDataset(repo, split, config, unquote(revision) or None)


def hub_offline() -> bool:
    """HF_DATASETS_OFFLINE if set, else HF_HUB_OFFLINE (as datasets reads them), read now."""
    value = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    return value.upper() in _TRUE


@contextlib.contextmanager
def hub_errors(hub: HubDataset):
    """A Hub dataset that cannot be reached, found or read, as one line naming it."""
    from huggingface_hub.errors import HfHubHTTPError
    import httpx
    try:
        yield
    except (OSError, ValueError, HfHubHTTPError, httpx.HTTPError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(hub, f"cannot read the Hub dataset ({type(e).__name__}: {first})") from None


def resolve(hub: HubDataset) -> HubDataset:
    """Pin `hub` to the commit its revision is now, and count its stream's shards (network)."""
    if hub_offline():
        raise InputError(hub.spec, "a Hub dataset needs the network, and HF_HUB_OFFLINE (or "
                                   "HF_DATASETS_OFFLINE) says offline; save it where there is a network "
                                   "(load_dataset(...).save_to_disk(DIR)) and give DIR, or go online")
    _datasets(hub.spec)
    from huggingface_hub import HfApi
    with hub_errors(hub):
        sha = HfApi().dataset_info(hub.repo, revision=hub.revision).sha
        pinned = replace(hub, revision=sha)
        shards = open_stream(pinned).n_shards
    log.info("%s: streaming the Hub dataset at commit %s, %d shard(s)", hub, sha, shards)
    return replace(pinned, shards=shards)


def open_stream(hub: HubDataset):
    """The split as a streaming `IterableDataset`."""
    datasets = _datasets(hub.spec)
    return datasets.load_dataset(hub.repo, hub.config, split=hub.split, streaming=True,
                                 revision=hub.revision, trust_remote_code=TRUST_REMOTE_CODE)


def iter_hub_rows(hub: HubDataset, shard: Optional[int] = None) -> Iterator[Tuple[int, dict]]:
    """(row number in the shard, row) of one shard of a resolved Hub dataset, or of all of them."""
    with hub_errors(hub):
        stream = open_stream(hub)
        if stream.n_shards != hub.shards:
            raise InputError(hub, f"the stream has {stream.n_shards} shards, not the {hub.shards} it had "
                                  "when the pack was planned; run again")
        if shard is not None:
            stream = stream.shard(hub.shards, shard, contiguous=True)
        yield from enumerate(stream)


def iter_hub_texts(hub: HubDataset, shard: int, field: str = "text", *, strict=False, stats=None,
                   max_line: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The documents of one shard of a resolved Hub dataset, each checked as a columnar file's
    cells are (`columnar.check_text`)."""
    where = f"{hub} shard {shard}"
    for row, obj in iter_hub_rows(hub, shard):
        if field not in obj:
            raise InputError(where, f"no column '{field}' (columns: {', '.join(obj) or 'none'}; "
                                    "name the text column with --text-field)")
        value = obj[field]
        if value is not None and not isinstance(value, str):
            raise InputError(where, f"column '{field}' holds {type(value).__name__} values, not strings; "
                                    "name a text column with --text-field", f"row {row}")
        size = len(value.encode("utf-8")) if value is not None else 0
        text = check_text(value, size, where, row, field, strict=strict, stats=stats, max_line=max_line)
        if text is not None:
            yield text
