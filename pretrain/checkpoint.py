"""Checkpoints that a crash cannot corrupt, and exact resume.

Layout: `RUN/checkpoints/step-N/` holds the DeepSpeed engine state (`engine/`: module, ZeRO-partitioned
optimizer, LR scheduler), each rank's RNG state and `zhllama_state.json` (step, data position). Every
rank writes into `.tmp-step-N/`; only when all ranks are done is it renamed to `step-N`, so a
`step-N` directory is complete by construction and anything named `.tmp-*` is garbage from a crash.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from zhllama.fsutil import atomic_write_json

ENGINE_TAG = "engine"
STATE_FILE = "zhllama_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save(engine, root, step: int, state: dict, *, rank: int, local_rank: int, barrier, keep_last: int,
         crash_hook=None) -> Path:
    """Save on every rank; returns the final `step-N` path."""
    root = Path(root)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={"zhllama": state}, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if crash_hook is not None:
        crash_hook()
    if local_rank == 0 and tmp.exists():
        # The state file is written last: it marks the directory complete (see complete_checkpoints).
        atomic_write_json(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:  # another node renamed the shared directory first
            pass
    barrier()
    if rank == 0:
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load(engine, path, *, rank: int) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the saved zhllama state."""
    path = Path(path)
    load_path, client = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load the engine state")
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
