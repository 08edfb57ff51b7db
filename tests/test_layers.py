"""The import map holds (docs/architecture.md): import-linter's contracts in pyproject.toml are kept,
and each kind of wrong arrow breaks one of them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = ROOT / "scripts" / "lint_imports.py"
STAGES_AND_DATA = ("vocab", "pretrain", "sft", "export", "configs", "ds_configs")

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


def lint(src=ROOT):
    res = subprocess.run([sys.executable, str(LINT), "--src", str(src)], capture_output=True, text=True,
                         timeout=120)
    return res.returncode, res.stdout + res.stderr


def test_contracts_kept():
    code, out = lint()
    assert code == 0, out
    assert "3 kept, 0 broken" in out, out


def test_core_contract_lists_every_core_module():
    """A new module in zhllama/ is core, so the 'core' contract must name it (or it escapes the check)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(c for c in config["contracts"] if c["id"] == "core")
    on_disk = {f"zhllama.{p.stem}" for p in (ROOT / "zhllama").glob("*.py") if p.stem != "__init__"}
    on_disk |= {f"zhllama.{p.parent.name}" for p in (ROOT / "zhllama").glob("*/__init__.py")} - {"zhllama.app"}
    assert set(core["source_modules"]) == on_disk


@pytest.mark.parametrize("path, line, broken", [
    # a stage imports another stage's private name (an allowed arrow, export above vocab)
    ("export/merge.py", "from zhllama.vocab.resize import _find_sp", "imports private _find_sp"),
    # a stage imports a stage it must not (vocab uses neither pretrain nor sft)
    ("vocab/train.py", "from zhllama.pretrain.shards import read_manifest", "zhllama.vocab.train -> zhllama.pretrain.shards"),
    # the core imports a stage
    ("zhllama/log.py", "import zhllama.sft.records", "zhllama.log -> zhllama.sft.records"),
    # a stage imports the application
    ("sft/records.py", "from zhllama.app.cli import COMMANDS", "zhllama.sft.records -> zhllama.app.cli"),
])
def test_wrong_arrow_breaks_a_contract(tmp_path, path, line, broken):
    for name in ("zhllama", *STAGES_AND_DATA):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / path
    target.write_text(target.read_text() + f"\n{line}\n")
    code, out = lint(tmp_path)
    assert code == 1, out
    assert "BROKEN" in out and broken in out, out


def test_sft_data_reaches_the_engine_through_the_registry():
    """pretrain never imports sft: without zhllama/app/train.py's import there is no sft reader, and
    the engine says so; `zhllama train` (zhllama.app.train) registers it."""
    code = ("from zhllama.errors import ConfigError\n"
            "from zhllama.pretrain import engine, stage_data\n"
            "import sys\n"
            "assert 'zhllama.sft.dataset' not in sys.modules\n"
            "try:\n    stage_data.registered('sft', required=True)\nexcept ConfigError as e:\n    print('ERR', e)\n"
            "assert stage_data.registered('stage2') is None\n"
            "import zhllama.app.train\n"
            "print('OK', stage_data.registered('sft', required=True).build.__module__)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR stage sft: no data reader registered" in res.stdout, res.stdout
    assert "OK zhllama.sft.stage_data" in res.stdout, res.stdout
