"""scripts/gpu_check_report.py, the GPU check's table and checks, on a work folder laid out by hand as
scripts/gpu_check.sh leaves it: every check passes on consistent runs, and each fails for its reason."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
STEPS, KILL = 6, 2
RUNS = ["stage1", "stage2", "stage2_resume", "stage2_no_overlap", "sft"]


def _report(work: Path, precision="bf16"):
    argv = [str(REPO / "scripts" / "gpu_check_report.py"), str(work), "--gpu", "NVIDIA H100 80GB HBM3",
            "--vocab", "reference tokenizers", "--precision", precision, "--steps", str(STEPS),
            "--kill-after", str(KILL)]
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = old
    return None


@pytest.fixture
def work(tmp_path):
    w = tmp_path / "gpu_check"
    (w / "logs").mkdir(parents=True)
    loss = {s: 10.0 - 0.1 * s for s in range(1, STEPS + 1)}
    for run in RUNS:
        d = w / run
        (d / "final").mkdir(parents=True)
        steps = range(1, (KILL if run == "stage2_no_overlap" else STEPS) + 1)
        records = [{"step": s, "loss": None if (run == "stage1" and s == STEPS) else loss[s],
                    "tokens_per_s": 1000.0, "mfu": 0.4} for s in steps]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (d / "summary.json").write_text(json.dumps({"gradient_checkpointing": False, "mfu_peak": "datasheet",
                                                    "nonfinite_skipped": 4 if run == "stage1" else 0}))
        save_file({"w": torch.ones(3)}, str(d / "final" / "adapter_model.safetensors"))
        (w / f"mem_{run}.csv").write_text("30000\n40960\n")  # MiB: peak 40 GiB
        (w / f"ckpt_mb_{run}").write_text("5800\n")
    for stage in ("stage1", "stage2", "sft"):
        (w / f"plan_{stage}.json").write_text(json.dumps({"memory": {"without_checkpointing": {"total_gib": 41.9},
                                                                     "with_checkpointing": {"total_gib": 21.6}}}))
    (w / "nan_check.json").write_text(json.dumps({"steps": ["5", "6"], "identical": True, "finite": True}))
    starts = "rotary buffers float32 after deepspeed.initialize: 2 checked\n" * (len(RUNS) + 1)
    (w / "logs" / "pretrain_stage2_node0.log").write_text(
        starts + f"resumed from {w / 'stage2_resume' / 'checkpoints'}/step-2 (step 2 of 6)\n")
    return w


def _checks(w):
    return json.loads((w / "gpu_check.json").read_text())


def test_consistent_runs_pass_and_the_table_is_written(work, capsys):
    assert _report(work) == 0
    table = (work / "gpu_check.md").read_text()
    assert "| stage2 | 6 | 9.900 → 9.400 | 1,000 | 40.0% | off | 40.0 | 41.9 | 5,800 |" in table
    result = _checks(work)
    assert result["failures"] == [] and result["checks"]["resume"]["max_adapter_abs_diff"] == 0.0


def test_a_resume_that_diverges_fails(work):
    path = work / "stage2_resume" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-1]["loss"] *= 1.01
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _report(work) == 1
    assert "stage 2 did not resume exactly" in _checks(work)["failures"]


def test_an_applied_nan_step_fails(work):
    (work / "nan_check.json").write_text(json.dumps({"steps": ["5", "6"], "identical": False, "finite": True}))
    assert _report(work) == 1
    assert "stage 1's NaN step was applied or checkpointed" in _checks(work)["failures"]


@pytest.mark.parametrize("precision, factor, fails", [("bf16", 1.01, False), ("bf16", 1.03, True), ("fp32", 1.001, True)])
def test_overlap_comm_losses_must_agree_within_the_precision(work, precision, factor, fails):
    path = work / "stage2_no_overlap" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["loss"] *= factor
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _report(work, precision) == (1 if fails else 0)


def test_peak_memory_far_over_the_plan_and_a_missing_fp32_check_fail(work):
    (work / "mem_sft.csv").write_text("70000\n")  # 68 GiB against a plan of 41.9
    log = work / "logs" / "pretrain_stage2_node0.log"
    log.write_text(log.read_text().replace("rotary buffers float32 after deepspeed.initialize: 2 checked\n", "", 1))
    assert _report(work) == 1
    failures = _checks(work)["failures"]
    assert any(f.startswith("sft: peak GPU memory 68.4 GiB is over 1.25 x the plan's 41.9") for f in failures)
    assert "fp32 rotary buffers checked in 5 of 6 runs" in failures
