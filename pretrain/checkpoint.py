"""Checkpoints that a crash cannot corrupt, that hold only what training changes, and exact resume.

Layout: `RUN/checkpoints/step-N/` holds the DeepSpeed engine state (`engine/`: the trainable weights,
the ZeRO-partitioned fp32 master weights and Adam moments, the LR scheduler), each rank's RNG state
(`rng_rank{r}.json`) and `zhllama_state.json` (step, data position, world size, the settings a resume
must not change, the base model's fingerprint). Frozen parameters are never saved: the base weights
come from the run's `model` directory, whose fingerprint is recorded and checked on resume. At 7B in
stage 2 that is ~0.4B trainable parameters x (2 bytes bf16 + 12 bytes fp32 master and Adam moments)
~ 6 GB per checkpoint, not the 33 GB of the whole model plus ZeRO's frozen fragments.

Every rank writes into `.tmp-step-N/`; after a barrier, global rank 0 alone writes the state file and
renames the directory to `step-N` (the other ranks wait at the next barrier), so a `step-N` directory
is complete by construction, two nodes on shared storage never race, and `.tmp-*` is crash garbage.

Nothing on the resume path unpickles code: the RNG state and our state are JSON, and DeepSpeed's
`engine/*.pt` files are read with `torch.load(weights_only=True)` and an allowlist of DeepSpeed's own
plain classes. A file holding anything else is refused with one line.
"""

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from zhllama.errors import UserError
from zhllama.fsutil import fsync_dir, atomic_write_json
from zhllama.log import get_logger

from .presets import OVERRIDE_KEYS

log = get_logger("zhllama.train")

ENGINE_TAG = "engine"
STATE_FILE = "zhllama_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings whose change would silently alter the run on resume (the schedule, the data order, what is
# trained, the base). max_steps and epochs may change: they only say how long the run goes on.
RESUME_KEYS = ("stage", "model", "tokenizer", "init_adapters", "data", "template", "field_map", "pack_examples",
               "new_rows_only", "seed", "min_lr_ratio", *OVERRIDE_KEYS, "precision", "ds_config",
               "rope_scaling", "context_length")


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


def resume_settings(cfg) -> dict:
    """The run's resolved values of RESUME_KEYS (preset values filled in)."""
    preset = cfg.preset()
    out = {}
    for key in RESUME_KEYS:
        value = getattr(preset, key) if hasattr(preset, key) else getattr(cfg, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def run_state(cfg, step: int, world: int, fingerprint: Optional[str] = None) -> dict:
    """The JSON state of a checkpoint."""
    return {"step": step, "positions_consumed": step * cfg.preset().global_batch, "seed": cfg.seed,
            "stage": cfg.stage, "world_size": world, "settings": resume_settings(cfg),
            "model_fingerprint": fingerprint}


def check_resume(path, cfg, world: int, fingerprint: Optional[str] = None, allow_config_change: bool = False) -> dict:
    """Refuse, before any model is loaded, a resume that would not continue the same run."""
    state = read_state(path)
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != world:
        raise UserError(f"{path}: this checkpoint was written by {saved_world} ranks and this run has {world}; "
                        f"DeepSpeed's ZeRO-2 optimizer partitions need the same world size. Run on {saved_world} "
                        f"ranks, or start a new run (another out=, or resume=false)")
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


def read_state(path) -> dict:
    f = Path(path) / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: unreadable checkpoint state ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{f}: not a zhllama checkpoint state (no integer 'step')")
    return state


# ----------------------------------------------------------------------------- save / load

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


def dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def save(engine, root, step: int, state: dict, *, rank: int, barrier, keep_last: int, crash_hook=None) -> Path:
    """Save on every rank; global rank 0 alone finalises. Returns the final `step-N` path."""
    root = Path(root)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={"zhllama": state}, save_latest=False,
                           exclude_frozen_parameters=True)
    atomic_write_json(tmp / f"rng_rank{rank}.json", rng_state())
    barrier()
    if crash_hook is not None:
        crash_hook()
    if rank == 0:
        # The state file is written last: it marks the directory complete (see complete_checkpoints).
        atomic_write_json(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        log.info("checkpoint %s: %.1f MB (trainable weights + optimizer state)", final, dir_bytes(final) / 1e6)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's own plain classes that its checkpoint files hold (besides tensors and containers)."""
    found = []
    for module, names in (("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


def safe_torch_load(path, map_location=None):
    """torch.load without code execution: weights_only=True, DeepSpeed's plain classes allowed."""
    allowed = _deepspeed_safe_globals()
    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; 2.4 has only the global list
    if scoped is None and hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(allowed)
    try:
        with scoped(allowed) if scoped is not None else contextlib.nullcontext():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refusing to load a checkpoint file that holds more than tensors and plain "
                        f"data ({reason[:200]})") from None


def load(engine, path, *, rank: int) -> dict:
    """Restore trainable weights, optimizer, scheduler and this rank's RNG; returns the saved zhllama state."""
    path = Path(path)
    state = read_state(path)
    engine.checkpoint_engine.load = safe_torch_load  # DeepSpeed reads every engine/*.pt through this
    load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"{path}: DeepSpeed could not load the engine state")
    rng_file = path / f"rng_rank{rank}.json"
    if rng_file.exists():
        try:
            set_rng_state(json.loads(rng_file.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{rng_file}: unreadable RNG state ({e})") from None
    return state
