"""Helpers for tests that run `zhllama train` in real processes and compare run directories.

`train` runs one process (a world of one), `train_two_ranks` two CPU ranks through the real launcher;
`metrics` and `final_weights` read what a run wrote; `cut_back` copies a run as it was right after one of
its checkpoints, so a resume can be tried on another world size without training the first part again;
`assert_same_run` compares a resumed run with an uninterrupted one.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import free_port, subprocess_env

REPO = Path(__file__).resolve().parent.parent


def train(args, timeout: int = 900, **env):
    """`zhllama train ARGS` in a plain process (a world of one)."""
    cmd = [sys.executable, "-m", "zhllama.app.cli", "train", *map(str, args)]
    return subprocess.run(cmd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)


def train_two_ranks(args, run: Path, launcher: str = "pretrain_stage2.sh", timeout: int = 900):
    """`zhllama train ARGS` on 2 CPU ranks through launch/LAUNCHER (the `deepspeed` launcher); its logs go
    to run.parent/logs."""
    return subprocess.run(["bash", str(REPO / "launch" / launcher), *map(str, args)],
                          env=subprocess_env(GPUS_PER_NODE=2, MASTER_PORT=free_port(), LOG_DIR=run.parent / "logs"),
                          capture_output=True, text=True, timeout=timeout)


def resume_on_one_rank(args, saved_world: int = 2, timeout: int = 900, **env):
    """`train` on a world of one, resuming a checkpoint written by `saved_world` ranks: it must succeed and
    say that it redistributed the optimizer state."""
    res = train(args, timeout=timeout, **env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"written by {saved_world} ranks; its optimizer state is redistributed over 1" in res.stderr
    return res


def final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def cut_back(run: Path, dst: Path, step: int) -> Path:
    """A copy of `run` as it was right after checkpoint `step`: later checkpoints, final/ and summary.json
    removed (metrics.jsonl records after `step` are dropped by the resume itself)."""
    shutil.copytree(run, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.name.startswith("step-") and int(p.name[5:]) > step:
            shutil.rmtree(p)
    shutil.rmtree(dst / "final")
    (dst / "summary.json").unlink(missing_ok=True)
    assert (dst / "checkpoints" / f"step-{step}" / "zhllama_state.json").is_file()
    return dst


def assert_same_run(run: Path, reference: Path, rel: float = 1e-5):
    """Every logged loss within `rel` of the reference's, and every adapter tensor within `rel` of it
    relative to its norm: |a - b| <= rel |b| (Frobenius). A lost or misplaced optimizer moment moves the
    tensors by ~1e-2 relative (a whole Adam step); summation order across ranks by ~1e-6."""
    assert [r["step"] for r in metrics(run)] == [r["step"] for r in metrics(reference)]
    assert [r["loss"] for r in metrics(run)] == pytest.approx([r["loss"] for r in metrics(reference)], rel=rel)
    a, b = final_weights(run), final_weights(reference)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert float((a[k] - b[k]).norm()) <= rel * float(b[k].norm()), (k, float((a[k] - b[k]).norm()))
