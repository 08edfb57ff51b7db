"""One real `zhllama train` run (DeepSpeed on a CPU rank) and what it records: the library versions in
its first lines and summary.json, the gradient-checkpointing choice, metrics.jsonl that is JSON even
with a NaN step (grad norm null, not Infinity), and an MFU that never reads above 100% on CPU."""

import json
import subprocess
import sys

import pytest

from conftest import subprocess_env
from zhllama.versions import versions_record


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, tiny_model_dir, tiny_packed):
    out = tmp_path_factory.mktemp("record") / "run"
    args = ["stage=stage2", f"model={tiny_model_dir}", f"data=[{tiny_packed}]", f"out={out}", "max_steps=3",
            "global_batch=8", "micro_batch=4", "block_size=32", "save_every=100", "tensorboard=false"]
    res = subprocess.run([sys.executable, "-m", "zhllama.app.cli", "train", *args],
                         env=subprocess_env(ZHLLAMA_NAN_STEPS="2"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stderr


@pytest.mark.slow
def test_versions_are_in_the_first_lines_and_the_summary(nan_run):
    out, log = nan_run
    ours = [line for line in log.splitlines() if " zhllama.train: " in line]
    want = versions_record()
    assert ours[0].endswith("versions: " + " | ".join(f"{k} {v}" for k, v in want.items() if v is not None))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == want
    assert summary["gradient_checkpointing"] is False
    assert "gradient checkpointing off: auto, CPU ranks (no device memory to save)" in log


@pytest.mark.slow
def test_a_nan_step_writes_null_and_mfu_stays_at_most_one(nan_run):
    out, _ = nan_run
    text = (out / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None and records[1]["nonfinite_microbatches"] == 2
    assert all(0 < r["mfu"] <= 1.0 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_skipped"] == 2 and summary["mfu_peak"].startswith("measured CPU matmul peak")
