"""Shared fixtures. Tests that need ../shared skip with a message when it is missing."""

import os
import sys
from pathlib import Path

import pytest

from zhllama.hosts import free_port  # noqa: F401  (one home for it; tests import it from here)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ZHLLAMA_SHARED", REPO.parent / "shared"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_path(rel: str) -> Path:
    """A file under ../shared, or skip the test saying which file is missing."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"needs {p} (the shared data is not present here)")
    return p


@pytest.fixture
def llama_sp_model() -> Path:
    return shared_path("data/llama/tokenizer.model")


@pytest.fixture
def zh_news() -> Path:
    return shared_path("data/zh/news_train.txt")


@pytest.fixture
def zh_reviews() -> Path:
    return shared_path("data/zh/reviews_train.txt")


def adamw_steps(model, x, steps: int, lr: float = 1e-2):
    """A few AdamW (0.9, 0.95) steps of `model` on the batch `x`, the trainable parameters only; eval mode after."""
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# ----------------------------------------------------------------------------- subprocesses
# Variables a caller's shell may hold that would change what a launched run does: rank and world
# variables (a run must start its own world), the launcher's knobs, and the engine's test seam.
_LEAKY_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
              "GPUS_PER_NODE", "HOSTFILE", "CUDA_VISIBLE_DEVICES", "CONFIG", "DETACH", "DRY_RUN", "LAUNCHER_ARGS",
              "ZHLLAMA_CRASH", "ZHLLAMA_NAN_STEPS")


def subprocess_env(**extra) -> dict:
    """The environment for a `zhllama`, launcher or script subprocess: CPU ranks (gloo), one OpenMP
    thread per rank, offline, this interpreter first on PATH (the launch scripts call `python`,
    `deepspeed`), nothing of the above leaking in. `extra` is applied last (values made str; None
    removes a variable)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for k in _LEAKY_ENV:
        env.pop(k, None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def run_cli(*args):
    """Run the zhllama CLI in-process; returns (exit code, stdout, stderr) via capsys by the caller."""
    from zhllama.app.cli import main
    return main([str(a) for a in args])


@pytest.fixture
def zhllama_exe() -> str:
    """The installed console script (the same one users run)."""
    exe = Path(sys.executable).parent / "zhllama"
    if not exe.exists():
        pytest.skip("zhllama console script not installed (run scripts/setup.sh)")
    return str(exe)


# ----------------------------------------------------------------------------- tiny model fixtures
# A small LLaMA-style tokenizer trained on the bundled samples (Chinese + English) and a tiny LLaMA
# built from it: shared by the engine, SFT and export tests so they build it once per session.

SAMPLES = REPO / "zhllama" / "data"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from zhllama.modelio import load_tokenizer, save_tokenizer
    from zhllama.tiny import make_tiny_sp

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    text = (SAMPLES / "zh_sample.txt").read_text(encoding="utf-8") + \
        (SAMPLES / "en_sample.txt").read_text(encoding="utf-8")
    make_tiny_sp(out / "tokenizer.model", text=text, vocab_size=3000, seed_lines=1)
    save_tokenizer(load_tokenizer(out / "tokenizer.model"), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from zhllama.tiny import make_tiny_llama

    out = tmp_path_factory.mktemp("tiny_model") / "model"
    make_tiny_llama(tiny_tokenizer_dir / "tokenizer.model", out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The bundled Chinese sample packed into 32-token blocks (5% validation) with the tiny tokenizer."""
    from zhllama.app.cli import main

    out = tmp_path_factory.mktemp("tiny_packed") / "packed"
    assert main(["data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", str(SAMPLES / "zh_sample.txt"),
                 "--block-size", "32", "--out", str(out), "--validation-ratio", "0.05", "--workers", "1"]) == 0
    return out
