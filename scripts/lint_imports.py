"""Check the import map: run import-linter on the contracts in pyproject.toml.

    python scripts/lint_imports.py            # exit 0 when every contract is kept, 1 when one is broken
    python scripts/lint_imports.py --src DIR  # check another checkout (tests use a tampered copy)

Why a wrapper and not plain `lint-imports`: the stage folders (vocab/, pretrain/, sft/, export/) sit at
the top of the repository and become zhllama.vocab etc. only through package-dir at install time, so a
graph built from the checkout sees no stages. This lays the checkout out as it is installed (a copy in a
temporary folder, a few hundred KB) and runs import-linter there, with the custom contract types of
scripts/import_contracts.py importable. See docs/architecture.md.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Folder in the checkout -> where it is installed under zhllama/ (pyproject.toml [tool.setuptools] package-dir).
STAGE_DIRS = ("vocab", "pretrain", "sft", "export", "configs", "ds_configs")


def installed_layout(src: Path, dest: Path) -> Path:
    """Copy the importable code of checkout `src` into `dest` laid out as installed; returns dest."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "data")
    shutil.copytree(src / "zhllama", dest / "zhllama", ignore=skip)
    for name in STAGE_DIRS:
        shutil.copytree(src / name, dest / "zhllama" / name, ignore=skip)
    shutil.copy(src / "pyproject.toml", dest / "pyproject.toml")
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to check")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zhllama-lint-") as tmp:
        root = installed_layout(args.src.resolve(), Path(tmp))
        # A fresh interpreter: in this one `zhllama` may already be imported from the checkout, and
        # grimp would then find the package there, without its stages.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(Path(__file__).resolve().parent)])}
        code = ("import sys; from importlinter.cli import lint_imports; "
                "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
        return subprocess.run([sys.executable, "-c", code], cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
