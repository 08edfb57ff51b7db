"""Checkpoints that a crash, a full disk or a NaN cannot corrupt, that hold only what training changes,
and exact resume, on any number of ranks.

Layout: `RUN/checkpoints/step-N/` holds the DeepSpeed engine state (`engine/`: the trainable weights,
the ZeRO-partitioned fp32 master weights and Adam moments, the LR scheduler), each rank's RNG state
(`rng_rank{r}.json`) and `zhllama_state.json` (step, data position, world size, the settings a resume
must not change, the fingerprints of the base model and of the data). Frozen parameters are never
saved: the base weights come from the run's `model` directory, whose fingerprint is recorded and
checked on resume. At 7B in stage 2 that is ~0.4B trainable parameters x (2 bytes bf16 + 12 bytes fp32
master and Adam moments) ~ 6 GB per checkpoint, not the 33 GB of the whole model plus ZeRO's frozen
fragments. A resume on another number of ranks reads the same files (`reshard.py`): no second copy.

Every rank writes into `.tmp-step-N/`; after the ranks agree that every write succeeded, global rank 0
alone writes the state file and renames the directory to `step-N`, so a `step-N` directory is complete
by construction, two nodes on shared storage never race, and `.tmp-*` is crash garbage. A failed write
on any rank (a full disk) stops every rank with one line naming the file; a non-finite trainable weight
on any rank stops the run before anything is written. Either way the last complete checkpoint is
untouched.

Nothing on the resume path unpickles code: the RNG state and our state are JSON, and DeepSpeed's
`engine/*.pt` files are read with `torch.load(weights_only=True)` and an allowlist of DeepSpeed's own
plain classes (`safe_load.py`). A file holding anything else is refused with one line.
"""

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from zhllama.corpus import parse_weighted_spec
from zhllama.errors import UserError
from zhllama.fsutil import atomic_write_json, fsync_dir
from zhllama.log import get_logger

from . import reshard
from .ds_config import stage_ds_config
from .presets import OVERRIDE_KEYS
from .safe_load import safe_torch_load
from .shards import read_manifest
from .stage_data import registered

log = get_logger("zhllama.train")

ENGINE_TAG = "engine"
STATE_FILE = "zhllama_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings whose change would silently alter the run on resume (the schedule, the data order, what is
# trained, the base). max_steps and epochs may change: they only say how long the run goes on.
RESUME_KEYS = ("stage", "model", "tokenizer", "init_adapters", "data", "template", "field_map", "pack_examples",
               "new_rows_only", "embed_lr_base", "embed_lr_new", "seed", "min_lr_ratio", *OVERRIDE_KEYS,
               "precision", "ds_config", "rope_scaling", "context_length")


class NonFiniteWeights(UserError):
    """A checkpoint was due but a trainable weight is NaN or inf on some rank: nothing was written."""


# ----------------------------------------------------------------------------- RNG state, as JSON

def rng_state() -> dict:
    """This process's RNG states as JSON-ready lists (no pickle)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- what a resume must match

def model_fingerprint(model_dir) -> str:
    """A cheap identity of the base weights: config.json, and each weight file's name, size and the
    sha256 of its first MiB (a safetensors header lists every tensor's name, dtype and offsets)."""
    h = hashlib.sha256()
    d = Path(model_dir)
    for p in sorted(d.glob("*")):
        if p.name == "config.json" or p.suffix in (".safetensors", ".bin"):
            h.update(p.name.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
    return h.hexdigest()


def pack_fingerprint(data_dir) -> dict:
    """What a `zhllama data pack` directory holds, from its manifest: the sha256 of every source file, the
    tokenizer's fingerprint, the block size and the pack settings. A pack rebuilt from the same text with
    the same settings has the same fingerprint (the same blocks); one rebuilt from other text does not."""
    m = read_manifest(data_dir)
    return {"sha256 of": {s["path"]: s["sha256"] for s in m.get("sources", [])},
            "tokenizer": m["tokenizer"]["fingerprint"], "block size": m["block_size"],
            "settings": m.get("settings")}


def data_fingerprint(cfg) -> Optional[dict]:
    """The fingerprint of the run's data, recorded in every checkpoint: per pack directory of `data`, its
    `pack_fingerprint`; for a stage with its own reader (sft), what that reader reports (the input
    files' sha256), or None when it reports nothing."""
    stage_data = registered(cfg.stage)
    if stage_data is not None:
        return stage_data.fingerprint(cfg) if stage_data.fingerprint is not None else None
    return {str(d): pack_fingerprint(parse_weighted_spec(d)[0]) for d in cfg.data}  # "packed/zh:0.85"


def _short(value):
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


def fingerprint_changes(old, new, where: str = "") -> list:
    """'where: old -> new' for each leaf that differs between two fingerprints (nested dicts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += fingerprint_changes(old.get(key, "absent"), new.get(key, "absent"), f"{where} {key}".strip())
        return out
    return [] if old == new else [f"{where}: {_short(old)!s} -> {_short(new)!s}"]


def resume_settings(cfg) -> dict:
    """The run's resolved values of RESUME_KEYS (preset values filled in, `ds_config: null` as the stage's
    default: a run started without a config file and resumed with one naming that default is the same run)."""
    preset = cfg.preset()
    out = {}
    for key in RESUME_KEYS:
        value = getattr(preset, key) if hasattr(preset, key) else getattr(cfg, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    out["ds_config"] = stage_ds_config(cfg.stage, cfg.ds_config)
    return out


def run_state(cfg, step: int, world: int, fingerprint: Optional[str] = None, data: Optional[dict] = None) -> dict:
    """The JSON state of a checkpoint."""
    return {"step": step, "positions_consumed": step * cfg.preset().global_batch, "seed": cfg.seed,
            "stage": cfg.stage, "world_size": world, "settings": resume_settings(cfg),
            "model_fingerprint": fingerprint, "data_fingerprint": data}


def check_resume(path, cfg, world: int, fingerprint: Optional[str] = None, allow_config_change: bool = False) -> dict:
    """Refuse, before any model is loaded, a resume that would not continue the same run: a changed
    setting or base model (unless `allow_config_change`). Another world size is not a change: the state
    is redistributed on load (`load`)."""
    state = read_state(path)
    if allow_config_change:
        return state
    saved = state.get("settings") or {}
    now = resume_settings(cfg)
    differing = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
    fp = state.get("model_fingerprint")
    if fp and fingerprint and fp != fingerprint:
        differing.append(f"the weights in {cfg.model} changed since the checkpoint")
    if differing:
        raise UserError(f"{path}: the config differs from the run being resumed ({'; '.join(differing)}); "
                        "resuming would keep the old optimizer and schedule. Use a new out=, resume=false, "
                        "or --allow-config-change to resume anyway")
    return state


def check_data(path, data: Optional[dict]) -> None:
    """Refuse a resume whose data's fingerprint differs from the checkpoint's, naming what changed (up to
    three differences). A checkpoint without one (older zhllama) or a stage that reports none: no check."""
    saved = read_state(path).get("data_fingerprint")
    if saved is None or data is None:
        return
    changes = fingerprint_changes(saved, data)
    if changes:
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise UserError(f"{path}: the training data changed since this checkpoint ({'; '.join(changes[:3])}{more}); "
                        "the resumed run would go on with the old data order over other blocks. Use "
                        "--allow-data-change to resume on the new data, or a new out= / resume=false to start over")


def read_state(path) -> dict:
    f = Path(path) / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: unreadable checkpoint state ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{f}: not a zhllama checkpoint state (no integer 'step')")
    return state


# ----------------------------------------------------------------------------- which checkpoint

def complete_checkpoints(root) -> list:
    """(step, path) of complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def choose_resume(root, *, rank: int, broadcast: Callable[[int], int], wait_s: float = 60.0) -> Optional[Path]:
    """The checkpoint every rank resumes from. Global rank 0 lists `root` and picks the latest complete
    one; `broadcast` gives its step to every rank (right after a fast restart, NFS attribute caching can
    show another node an older or newer listing, and ranks resuming from different steps would train
    on silently). A rank that cannot yet see the chosen checkpoint waits for it up to `wait_s`."""
    step = -1
    if rank == 0:
        found = complete_checkpoints(root)
        step = found[-1][0] if found else -1
    step = int(broadcast(step))
    if step < 0:
        return None
    path = Path(root) / f"step-{step}"
    deadline = time.monotonic() + wait_s
    while not (path / STATE_FILE).is_file():
        if time.monotonic() >= deadline:
            raise UserError(f"{path}: global rank 0 resumes from this checkpoint, but rank {rank} cannot see it after "
                            f"{wait_s:.0f} s; the run directory must be on storage every node shares")
        time.sleep(0.5)
        os.listdir(root)  # a fresh listing makes NFS revalidate the directory's cached attributes
    return path


def dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- save

def nonfinite_weight(engine) -> Optional[str]:
    """The name of this rank's first trainable tensor holding a NaN or inf (a module weight, or this rank's
    ZeRO partition of the fp32 master weights), or None."""
    module = getattr(engine, "module", None)
    for name, p in (module.named_parameters() if module is not None else ()):
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            return name
    groups = getattr(getattr(engine, "optimizer", None), "single_partition_of_fp32_groups", None) or []
    for i, flat in enumerate(groups):
        if not bool(torch.isfinite(flat.detach()).all()):
            return f"the fp32 master weights of parameter group {i}"
    return None


def _write_error(path, e: BaseException) -> str:
    """One line for a failed checkpoint write. torch.save reports a short write as a bare RuntimeError."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
    try:
        free = f"; {shutil.disk_usage(Path(path).parent).free / 1e9:.1f} GB free there"
    except OSError:
        free = ""
    return f"{path}: {reason} (a full disk, a quota or a file-size limit{free})"


class _GuardedWrites:
    """DeepSpeed's checkpoint writes on this rank (its directory, its state files, the recovery scripts it
    copies beside them), with the first failure recorded instead of raised and later writes skipped: a rank
    that raised there would leave the others waiting at DeepSpeed's closing barrier for ever."""

    def __init__(self, engine):
        self.error = None
        ckpt_engine = getattr(engine, "checkpoint_engine", None)
        self.patched = [(obj, name, getattr(obj, name)) for obj, name in
                        ((ckpt_engine, "makedirs"), (ckpt_engine, "save"), (engine, "_copy_recovery_script"))
                        if obj is not None and callable(getattr(obj, name, None))]

    def _guard(self, write):
        def guarded(*args, **kwargs):
            if self.error is not None:
                return None
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
                path = kwargs.get("path") or next((a for a in args if isinstance(a, (str, Path))), "?")
                self.error = _write_error(path, e)
            return None
        return guarded

    def __enter__(self):
        for obj, name, write in self.patched:
            setattr(obj, name, self._guard(write))
        return self

    def __exit__(self, *exc):
        for obj, name, write in self.patched:
            setattr(obj, name, write)
        return False


def _attempt(action, path) -> Optional[str]:
    try:
        action()
    except OSError as e:
        return _write_error(path, e)
    return None


def save(engine, root, step: int, state: dict, *, rank: int, barrier, keep_last: int, crash_hook=None,
         agree: Optional[Callable[[Optional[str]], Optional[str]]] = None) -> Path:
    """Save on every rank; global rank 0 alone finalises. Returns the final `step-N` path.

    `agree(message or None)` is a barrier that also returns the lowest rank's message to every rank (the
    engine's `first_message`); without it each rank only waits at `barrier`. It is how every rank learns
    that some rank's weights are not finite (NonFiniteWeights: nothing is written) or that some rank's
    write failed (UserError naming the file; the half-written `.tmp-step-N` is removed)."""
    if agree is None:
        def agree(message):
            barrier()
            return message
    root = Path(root)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    bad = nonfinite_weight(engine)
    bad = agree(f"{bad} on rank {rank}" if bad else None)
    if bad:
        raise NonFiniteWeights(f"the trainable weights are not finite ({bad}); checkpoint step-{step} was not "
                               f"written, {_kept(root, 'kept')}")

    def fail(error: str):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{error}; checkpoint step-{step} was not written, {_kept(root, 'intact')}: free space and "
                        "rerun the same command to go on from there")

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    error = agree(_attempt(prepare, tmp) if rank == 0 else None)
    if error:
        fail(error)
    with _GuardedWrites(engine) as writes:
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={"zhllama": state}, save_latest=False,
                               exclude_frozen_parameters=True)
    rng_file = tmp / f"rng_rank{rank}.json"
    error = writes.error or _attempt(lambda: atomic_write_json(rng_file, rng_state()), rng_file)
    error = agree(error)
    if error:
        fail(error)
    if crash_hook is not None:
        crash_hook()

    def finalise():
        # The state file is written last: it marks the directory complete (see complete_checkpoints).
        atomic_write_json(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)

    error = agree(_attempt(finalise, tmp / STATE_FILE) if rank == 0 else None)
    if error:
        fail(error)
    if rank == 0:
        log.info("checkpoint %s: %.1f MB (trainable weights + optimizer state)", final, dir_bytes(final) / 1e6)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def _kept(root, how: str) -> str:
    found = complete_checkpoints(root)
    return f"the last complete checkpoint {found[-1][1]} is {how}" if found else "and there is no earlier checkpoint"


# ----------------------------------------------------------------------------- load

def continue_schedule(scheduler) -> None:
    """Give the next step the lr this run's schedule puts at the restored step.

    The saved optimizer carries the lr the saving run's schedule gave its next step. With the same
    length that is the same number. With a longer run (`max_steps` or `epochs` raised) the schedule's
    horizon is the new total: warmup and cosine are laid over it and the next step takes the new
    schedule's lr at that step, as if the run had been planned that long; the saved value would be the
    old schedule's end (0 with min_lr_ratio 0). Every parameter group, whatever their number."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    lrs = [base_lr * f(scheduler.last_epoch) for f, base_lr in zip(lambdas, scheduler.base_lrs)]  # LambdaLR's own formula
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports; torch keeps it in this attribute


def load(engine, path, *, rank: int, world: int) -> dict:
    """Restore trainable weights, optimizer, scheduler and this rank's RNG; returns the saved zhllama state.

    On the world size that wrote the checkpoint, DeepSpeed loads its own per-rank optimizer files. On
    another, DeepSpeed loads the world-size-free parts (module weights, scheduler, counters) and
    `reshard.load_optimizer` fills this rank's new ZeRO partition from the old files by parameter name."""
    path = Path(path)
    state = read_state(path)
    saved_world = int(state.get("world_size") or world)
    engine.checkpoint_engine.load = safe_torch_load  # DeepSpeed reads every engine/*.pt through this
    load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_module_strict=False,
                                          load_optimizer_states=saved_world == world, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"{path}: DeepSpeed could not load the engine state")
    if saved_world != world:
        reshard.load_optimizer(engine, path / ENGINE_TAG, saved_world)
        if rank == 0:
            log.info("%s was written by %d ranks; its optimizer state is redistributed over %d by parameter name",
                     path, saved_world, world)
    continue_schedule(engine.lr_scheduler)
    rng_file = path / f"rng_rank{rank}.json"
    if rng_file.exists():
        try:
            set_rng_state(json.loads(rng_file.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{rng_file}: unreadable RNG state ({e})") from None
    return state
