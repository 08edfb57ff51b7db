"""`zhllama demo`: the whole pipeline, for real, in its quick mode; and the step bookkeeping.

The slow test runs `zhllama demo --quick` once (a fresh output dir, 2 CPU ranks under the deepspeed
launcher for the three training stages), checks the relations the demo exists to show, then runs it
again and checks that every step is reused. The fast tests drive the step bookkeeping (reuse, --force,
changed settings, an interrupted step, a failing step) with stand-in steps.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
from zhllama.app import demo as demo_mod
from zhllama.app.cli import main

REPO = Path(__file__).resolve().parent.parent


def _demo(out: Path, *extra):
    # From another working directory than the repository: the demo must not depend on it.
    return subprocess.run([sys.executable, "-m", "zhllama.app.cli", "demo", "--quick", "--out", str(out), *extra],
                          cwd=str(out.parent), env=subprocess_env(OMP_NUM_THREADS=None), capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.perf_counter()
    first = _demo(out)
    first_s = time.perf_counter() - t0
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/.done.json")}
    t0 = time.perf_counter()
    second = _demo(out)
    second_s = time.perf_counter() - t0
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    done_after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/.done.json")}
    return {"out": out, "first": first, "second": second, "first_s": first_s, "second_s": second_s,
            "done_before": done_before, "done_after": done_after,
            "summary": json.loads((out / "summary.json").read_text())}


def _rows(summary):
    return {r["stage"]: r for r in summary["rows"]}


@pytest.mark.slow
def test_quick_demo_shows_shorter_chinese_encodings_and_falling_heldout_loss(quick_demo):
    rows = _rows(quick_demo["summary"])
    assert list(rows) == ["base", "vocab-train", "vocab-merge", "resize", "pack", "stage1", "stage2", "sft",
                          "merge", "generate", "eval"]
    # Chinese tokens per character on held-out text: the byte-level English base vs the merged tokenizer.
    assert rows["base"]["zh_tokens_per_char"] > 2.0  # ~3 UTF-8 bytes a character
    assert rows["vocab-merge"]["zh_tokens_per_char"] < 0.5 * rows["base"]["zh_tokens_per_char"]
    # Held-out Chinese, never trained on: bits per character compare across tokenizers ...
    bpc = {s: rows[s]["bits_per_char"] for s in ("base", "resize", "stage1", "stage2", "sft")}
    assert bpc["base"] > bpc["resize"] > bpc["stage1"] > bpc["stage2"], bpc
    assert bpc["sft"] < bpc["resize"], bpc
    # ... and nats per token compare the stages that share the merged tokenizer.
    loss = {s: rows[s]["heldout_loss"] for s in ("resize", "stage1", "stage2", "sft")}
    assert loss["resize"] > loss["stage1"] > loss["stage2"], loss
    # What each stage trains: embeddings only < LoRA(q,k,v,o) + embeddings + lm_head < LoRA on all seven.
    pct = {s: rows[s]["trainable_pct"] for s in ("stage1", "stage2", "sft")}
    assert 0 < pct["stage1"] < pct["stage2"] < pct["sft"] < 100, pct
    figures = quick_demo["summary"]["figures"]
    for stage in ("stage1", "stage2", "sft"):
        assert figures[stage]["world_size"] == 2, figures[stage]  # through the deepspeed launcher
        assert rows[stage]["tokens_per_s"] > 0
        run = Path(figures[stage]["run"])
        assert (run / "final" / "adapter_model.safetensors").is_file()
        run_summary = json.loads((run / "summary.json").read_text())   # what `zhllama train` wrote, and the demo read
        assert run_summary["total_steps"] == figures[stage]["steps"] and run_summary["trainable"] == figures[stage]["trainable"]
        assert (quick_demo["out"] / stage / "logs").is_dir()
    # The merged checkpoint, scored by `zhllama eval`, computes what base + adapters computed in-process.
    assert (Path(figures["merge"]["model"]) / "config.json").is_file()
    assert figures["eval"]["zhllama_eval"]["bits_per_char"] == pytest.approx(bpc["sft"], rel=1e-3)
    assert "generated" in figures["generate"]  # the command ran (a tiny model: no quality asserted)
    stdout = quick_demo["first"].stdout
    assert "zh tokens/char" in stdout and "bits/char" in stdout and "Where everything is:" in stdout
    print(f"\nquick demo: first run {quick_demo['first_s']:.0f} s, second run {quick_demo['second_s']:.1f} s")


@pytest.mark.slow
def test_quick_demo_writes_a_readable_png_of_every_stage(quick_demo):
    png = Path(quick_demo["summary"]["figures"]["eval"]["png"])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[1] > 2 * img.shape[0]  # one panel per stage, side by side
    assert img.std() > 0.05  # not a blank canvas


@pytest.mark.slow
def test_second_run_reuses_every_finished_step(quick_demo):
    out = quick_demo["second"].stdout
    for step in demo_mod.STEPS:
        assert f"] {step}: done earlier, reused" in out, out[:3000]
    assert "nothing to do" in out
    assert quick_demo["done_after"] == quick_demo["done_before"]  # no marker rewritten


# ----------------------------------------------------------------------------------- the bookkeeping

class ToyDemo(demo_mod.Demo):
    """Three stand-in steps that record their calls; `fail` makes a step raise half way."""
    steps = ("a", "b", "c")

    def __init__(self, out, settings, fail=None):
        super().__init__(out, settings)
        self.calls, self.fail = [], fail

    def _step(self, name, d):
        self.calls.append(name)
        (d / "partial").write_text(str(len(list(d.iterdir()))))
        if self.fail == name:
            raise RuntimeError(f"{name} failed")
        return {"value": self.settings[name]["x"]}

    def step_a(self, d):
        """step a"""
        return self._step("a", d)

    def step_b(self, d):
        """step b"""
        return self._step("b", d)

    def step_c(self, d):
        """step c"""
        return self._step("c", d)

    def summarise(self, total_s, reused):
        return {"reused": reused}


def _settings(**x):
    return {s: {"x": x.get(s, 0)} for s in ("a", "b", "c")}


def test_steps_are_reused_forced_and_redone_when_their_settings_change(tmp_path):
    d = ToyDemo(tmp_path, _settings())
    assert d.run_all()["reused"] == [] and d.calls == ["a", "b", "c"]
    d = ToyDemo(tmp_path, _settings())
    assert d.run_all()["reused"] == ["a", "b", "c"] and d.calls == []
    d = ToyDemo(tmp_path, _settings())
    d.run_all(force="b")
    assert d.calls == ["b", "c"]  # from the forced step on
    d = ToyDemo(tmp_path, _settings(c=1))
    d.run_all()
    assert d.calls == ["c"]
    d = ToyDemo(tmp_path, _settings(a=1, c=1))
    d.run_all()
    assert d.calls == ["a", "b", "c"]  # a redone step invalidates everything after it
    assert json.loads((tmp_path / "a" / ".done.json").read_text())["figures"]["value"] == 1


def test_an_interrupted_step_resumes_in_its_directory_and_a_failed_one_is_not_marked_done(tmp_path):
    d = ToyDemo(tmp_path, _settings(), fail="b")
    with pytest.raises(RuntimeError):
        d.run_all()
    assert (tmp_path / "a" / ".done.json").is_file() and not (tmp_path / "b" / ".done.json").exists()
    assert (tmp_path / "b" / "partial").read_text() == "1"  # .started.json only
    d = ToyDemo(tmp_path, _settings())
    d.run_all()
    assert d.calls == ["b", "c"]
    assert (tmp_path / "b" / "partial").read_text() == "2"  # kept: .started.json + the partial output
    # The same interruption under other settings: the leftovers are removed, the step starts clean.
    d = ToyDemo(tmp_path, _settings(c=2), fail="c")
    with pytest.raises(RuntimeError):
        d.run_all()
    d = ToyDemo(tmp_path, _settings(c=3))
    d.run_all()
    assert d.calls == ["c"] and (tmp_path / "c" / "partial").read_text() == "1"


def test_demo_help_and_a_bad_base_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["demo", "--out", str(tmp_path / "o"), "--base", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0], err
