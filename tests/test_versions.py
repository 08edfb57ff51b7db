"""Version floors: equal in pyproject.toml and zhllama/versions.py, checked before a run starts, recorded."""

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from zhllama import versions
from zhllama.app.cli import main

REPO = Path(__file__).resolve().parent.parent


def _stand_in(monkeypatch, **fake):
    """importlib.metadata.version answering `fake` for some packages (None: not installed)."""
    real = versions.metadata.version

    def version(name):
        if name in fake:
            if fake[name] is None:
                raise versions.metadata.PackageNotFoundError(name)
            return fake[name]
        return real(name)

    monkeypatch.setattr(versions.metadata, "version", version)


def test_an_old_deepspeed_is_refused_in_one_line_naming_found_and_needed(monkeypatch):
    _stand_in(monkeypatch, deepspeed="0.18.3")
    with pytest.raises(versions.VersionError) as e:
        versions.check_versions()
    msg = str(e.value)
    assert msg.startswith("deepspeed 0.18.3 is installed; zhllama needs deepspeed>=0.19.8: ")
    assert "PR #8066" in msg and "\n" not in msg


@pytest.mark.parametrize("found, refused", [("0.21.0", False), ("0.21.2", False), ("1.0.0", False),
                                            ("0.20.9", True), ("0.13.2", True), (None, True)])
def test_peft_floor_boundaries(monkeypatch, found, refused):
    _stand_in(monkeypatch, peft=found)
    if refused:
        with pytest.raises(versions.VersionError, match=f"peft {found or '[(]not installed[)]'} is installed"):
            versions.check_versions()
    else:
        versions.check_versions()


def test_the_installed_versions_pass():
    versions.check_versions()


def test_zhllama_train_refuses_before_anything_is_written(monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_packed):
    _stand_in(monkeypatch, deepspeed="0.16.9")
    out = tmp_path / "run"
    code = main(["train", "stage=stage2", f"model={tiny_model_dir}", f"data=[{tiny_packed}]", f"out={out}",
                 "global_batch=8", "micro_batch=2", "block_size=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("zhllama train: error: deepspeed 0.16.9 is installed; zhllama needs deepspeed>=0.19.8")
    assert not out.exists()


def test_pyproject_floors_are_the_checked_floors():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in map(Requirement, deps):
        lower = [s.version for s in dep.specifier if s.operator == ">="]
        if lower:
            floors[dep.name] = lower[0]
    assert {name: floors[name] for name in versions.FLOORS} == {name: f for name, (f, _) in versions.FLOORS.items()}
    assert floors["deepspeed"] == "0.19.8" and floors["peft"] == "0.21"


def test_versions_record_names_python_and_the_libraries():
    record = versions.versions_record()
    assert set(record) >= {"python", "torch", "transformers", "peft", "deepspeed", "zhllama"}
    assert record["deepspeed"] == versions.metadata.version("deepspeed")
    line = versions.versions_line(record)
    assert f"deepspeed {record['deepspeed']}" in line and f"python {record['python']}" in line
