"""Where the benches find `../shared` (or $ZHLLAMA_SHARED), and a clean exit when a file is missing."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ZHLLAMA_SHARED", REPO.parent / "shared"))


def need(rel: str) -> Path:
    """The file `rel` under the shared data, or exit naming it."""
    p = SHARED / rel
    if not p.exists():
        sys.exit(f"needs {p} (the shared data is not present here)")
    return p
