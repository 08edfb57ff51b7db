"""The documents' figures are what the commands print (scripts/check_docs.py, run here so CI runs it), and
the check fails on a stale figure, a Python claim pyproject.toml contradicts, or a benchmark without its
command."""

import importlib.util
import shutil

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", REPO / "scripts" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def copy(tmp_path):
    """The documents and pyproject.toml, copied: the tests below plant their faults there."""
    for name in ("README.md", "README_zh.md", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    return tmp_path


def test_every_generated_figure_is_current_and_every_claim_holds(check_docs):
    assert check_docs.check() == []


def test_a_stale_plan_figure_fails_and_write_regenerates_it(check_docs, copy):
    bench = copy / "docs" / "benchmarks.md"
    text = bench.read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("    checkpointing (micro "))
    stale = line[:-len("  fits, accum 1")].rsplit(" ", 1)[0] + " 47.9  fits, accum 1"   # the total it printed once
    assert stale != line
    bench.write_text(text.replace(line, stale), encoding="utf-8")
    readme = copy / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace("1024 x 512 | 2.97% |", "1024 x 512 | 2.95% |"),
                      encoding="utf-8")
    problems = check_docs.check(root=copy)
    assert len(problems) == 2, problems
    assert problems[0].startswith("README.md:") and "'| stage1 |" in problems[0] and "2.95%" in problems[0]
    want_line = text[:text.index(line)].count("\n") + 1
    assert problems[1].startswith(f"docs/benchmarks.md:{want_line}: stale figures") and "47.9" in problems[1]
    assert check_docs.check(write=True, root=copy) == []
    assert bench.read_text(encoding="utf-8") == text and check_docs.check(root=copy) == []


def test_a_python_claim_other_than_pyprojects_floor_fails(check_docs, copy):
    floor = check_docs.python_floor(copy)
    major, minor = floor.split(".")
    project = copy / "pyproject.toml"
    project.write_text(project.read_text(encoding="utf-8").replace(f'">={floor}"', f'">={major}.{int(minor) + 1}"'),
                       encoding="utf-8")
    problems = check_docs.check(root=copy)
    assert problems and all(f"says Python {floor}+ but pyproject.toml requires Python >= {major}.{int(minor) + 1}"
                                in p for p in problems)
    assert {p.split(":")[0] for p in problems} >= {"README.md", "README_zh.md"}


def test_a_benchmark_without_its_command_fails(check_docs, copy):
    bench = copy / "docs" / "benchmarks.md"
    bench.write_text(bench.read_text(encoding="utf-8") + "\n## Something fast\n\nIt ran in 3.2 s.\n\n"
                     "## Something else (`python bench/nowhere.py`)\n\n| a | 1.5x |\n", encoding="utf-8")
    problems = check_docs.check(root=copy)
    assert len(problems) == 2, problems
    assert "section 'Something fast' gives figures but names no command" in problems[0]
    assert "names `python bench/nowhere.py`, but bench/nowhere.py does not exist" in problems[1]
