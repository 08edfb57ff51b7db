"""Shared fixtures. Tests that need ../shared skip with a message when it is missing."""

import os
import sys
from pathlib import Path

import pytest

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


def run_cli(*args):
    """Run the zhllama CLI in-process; returns (exit code, stdout, stderr) via capsys by the caller."""
    from zhllama.cli import main
    return main([str(a) for a in args])


@pytest.fixture
def zhllama_exe() -> str:
    """The installed console script (the same one users run)."""
    exe = Path(sys.executable).parent / "zhllama"
    if not exe.exists():
        pytest.skip("zhllama console script not installed (run scripts/setup.sh)")
    return str(exe)
