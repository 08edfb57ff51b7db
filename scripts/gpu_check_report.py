"""The table and the checks of scripts/gpu_check.sh, from what its runs left in the work folder.

Writes WORK/gpu_check.md and WORK/gpu_check.json, prints the table, and exits 1 when a check fails:
every run ends with an adapter and finite losses (the NaN step apart); peak GPU memory within 1.25 x
the plan; the SIGKILLed stage 2 resumes and ends like the uninterrupted one; stage 1's NaN step is
skipped and never checkpointed (the checkpoints before and after it hold the same finite weights);
stage 2 with overlap_comm off has the same losses within the precision's rounding; every run checked
its rotary buffers are float32 after deepspeed.initialize.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

RUNS = [("stage1", "stage1"), ("stage2", "stage2"), ("stage2_resume", "stage2"), ("stage2_no_overlap", "stage2"),
        ("sft", "sft")]
# Relative loss tolerance between two runs that should compute the same thing.
RESUME_TOL = 1e-3
OVERLAP_TOL = {"bf16": 2e-2, "fp32": 1e-5}


def _read(path: Path, default=None):
    return path.read_text() if path.is_file() else default


def metrics(work: Path, run: str) -> list:
    text = _read(work / run / "metrics.jsonl", "")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def number(path: Path):
    text = _read(path)
    return float(text.split()[0]) if text and text.split() else None


def peak_gib(work: Path, run: str):
    text = _read(work / f"mem_{run}.csv", "")
    values = [int(v) for v in text.split() if v.isdigit()]
    return max(values) / 1024 if values else None


def plan_gib(work: Path, stage: str, checkpointing: bool):
    text = _read(work / f"plan_{stage}.json")
    if not text:
        return None
    key = "with_checkpointing" if checkpointing else "without_checkpointing"
    return json.loads(text)["memory"][key]["total_gib"]


def rel_diff(a: dict, b: dict) -> float:
    common = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    return max((abs(a[s] - b[s]) / abs(b[s]) for s in common), default=math.inf)


def fmt(x, spec, missing="n/a"):
    return missing if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("work", type=Path)
    ap.add_argument("--gpu", required=True)
    ap.add_argument("--vocab", required=True)
    ap.add_argument("--precision", required=True)
    ap.add_argument("--install-seconds", type=int, default=0)
    ap.add_argument("--seconds", type=int, default=0)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--kill-after", type=int, required=True)
    args = ap.parse_args(argv)
    work, bad, rows = args.work, [], []

    for run, stage in RUNS:
        m = metrics(work, run)
        summary = json.loads(_read(work / run / "summary.json", "{}"))
        if not m or not (work / run / "final" / "adapter_model.safetensors").is_file():
            bad.append(f"{run}: no metrics or no final adapter")
            rows.append({"run": run, "failed": True})
            continue
        tail = m[len(m) // 2:]  # steady state: the second half
        mfus = [r["mfu"] for r in tail if r.get("mfu") is not None]
        ckpt = summary.get("gradient_checkpointing")
        row = {"run": run, "stage": stage, "steps": m[-1]["step"], "loss_first": m[0]["loss"],
               "loss_last": next((r["loss"] for r in reversed(m) if r["loss"] is not None), None),
               "tokens_per_s": sum(r["tokens_per_s"] for r in tail) / len(tail),
               "mfu": sum(mfus) / len(mfus) if mfus else None, "mfu_peak": summary.get("mfu_peak"),
               "gradient_checkpointing": ckpt, "peak_gib": peak_gib(work, run),
               "plan_gib": plan_gib(work, stage, bool(ckpt)), "checkpoint_mb": number(work / f"ckpt_mb_{run}"),
               "seconds": number(work / f"seconds_{run}"), "versions": summary.get("versions")}
        rows.append(row)
        nan_steps = {args.steps} if run == "stage1" else set()
        if any(r["loss"] is None for r in m if r["step"] not in nan_steps):
            bad.append(f"{run}: a non-finite loss")
        if row["peak_gib"] and row["plan_gib"] and row["peak_gib"] > 1.25 * row["plan_gib"]:
            bad.append(f"{run}: peak GPU memory {row['peak_gib']:.1f} GiB is over 1.25 x the plan's {row['plan_gib']:.1f}")

    checks = {}
    losses = {run: {r["step"]: r["loss"] for r in metrics(work, run)} for run, _ in RUNS}
    # resume: the resumed run's records overwrite the killed run's
    a, b = losses["stage2"], losses["stage2_resume"]
    log2 = _read(work / "logs" / "pretrain_stage2_node0.log", "")
    resumed = f"resumed from {work / 'stage2_resume' / 'checkpoints'}" in log2
    adapter_diff = None
    fa, fb = (work / r / "final" / "adapter_model.safetensors" for r in ("stage2", "stage2_resume"))
    if fa.is_file() and fb.is_file():
        wa, wb = load_file(str(fa)), load_file(str(fb))
        adapter_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    checks["resume"] = {"resumed_from_checkpoint": resumed, "same_steps": sorted(a) == sorted(b) and bool(a),
                        "max_rel_loss_diff": rel_diff(b, a), "max_adapter_abs_diff": adapter_diff}
    if not (resumed and checks["resume"]["same_steps"] and checks["resume"]["max_rel_loss_diff"] <= RESUME_TOL):
        bad.append("stage 2 did not resume exactly")
    # the NaN step of stage 1
    nan = json.loads(_read(work / "nan_check.json", "{}"))
    s1 = [r for r in metrics(work, "stage1") if r["step"] == args.steps]
    s1_summary = json.loads(_read(work / "stage1" / "summary.json", "{}"))
    checks["nan_step"] = {"step": args.steps, "loss_null": bool(s1) and s1[0]["loss"] is None,
                          "skipped_counted": s1_summary.get("nonfinite_skipped", 0) > 0,
                          "checkpoints_compared": nan.get("steps"), "checkpoint_weights_identical": nan.get("identical"),
                          "checkpoint_weights_finite": nan.get("finite")}
    if not all(checks["nan_step"][k] for k in ("loss_null", "skipped_counted", "checkpoint_weights_identical",
                                               "checkpoint_weights_finite")):
        bad.append("stage 1's NaN step was applied or checkpointed")
    # overlap_comm on and off
    first = {s: v for s, v in losses["stage2"].items() if s <= args.kill_after}
    diff = rel_diff(losses["stage2_no_overlap"], first)
    checks["overlap_comm"] = {"steps": args.kill_after, "max_rel_loss_diff": diff,
                              "tolerance": OVERLAP_TOL[args.precision]}
    if not diff <= OVERLAP_TOL[args.precision]:
        bad.append(f"overlap_comm on and off disagree: {diff:.2e} > {OVERLAP_TOL[args.precision]:g}")
    # fp32 rotary buffers: the engine asserts and logs it on every start (6: one killed)
    logs = "".join(p.read_text() for p in (work / "logs").glob("*.log")) if (work / "logs").is_dir() else ""
    starts = logs.count("rotary buffers float32 after deepspeed.initialize")
    checks["fp32_rotary_buffers"] = {"runs_checked": starts, "runs": len(RUNS) + 1}
    if starts < len(RUNS) + 1:
        bad.append(f"fp32 rotary buffers checked in {starts} of {len(RUNS) + 1} runs")

    disk = subprocess.run(["du", "-sm", str(work)], capture_output=True, text=True).stdout.split()
    result = {"gpu": args.gpu, "precision": args.precision, "vocabulary": args.vocab,
              "install_seconds": args.install_seconds, "seconds": args.seconds,
              "work_dir_mb_at_end": float(disk[0]) if disk else None, "runs": rows, "checks": checks, "failures": bad}

    lines = [f"# gpu_check: {args.gpu}", "",
             f"{args.precision}, {args.vocab}; {args.seconds} s in all ({args.install_seconds} s installing)", "",
             "| run | steps | loss first → last | tokens/s | MFU | ckpt | peak GiB | plan GiB | checkpoint MB | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['run']} | failed | | | | | | | | |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['run']} | {r['steps']} | {fmt(r['loss_first'], '.3f')} → {fmt(r['loss_last'], '.3f')} | "
                     f"{r['tokens_per_s']:,.0f} | {mfu} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{fmt(r['peak_gib'], '.1f')} | {fmt(r['plan_gib'], '.1f')} | {fmt(r['checkpoint_mb'], ',.0f')} | "
                     f"{fmt(r['seconds'], '.0f')} |")
    c = checks
    lines += ["",
              f"* resume after SIGKILL: resumed {c['resume']['resumed_from_checkpoint']}, same steps "
              f"{c['resume']['same_steps']}, max relative loss difference {c['resume']['max_rel_loss_diff']:.2e}, "
              f"max adapter difference {fmt(c['resume']['max_adapter_abs_diff'], '.2e')} (0 = bit-exact)",
              f"* NaN step {c['nan_step']['step']} of stage 1: loss null {c['nan_step']['loss_null']}, counted "
              f"{c['nan_step']['skipped_counted']}, checkpoints {c['nan_step']['checkpoints_compared']} identical "
              f"{c['nan_step']['checkpoint_weights_identical']} and finite {c['nan_step']['checkpoint_weights_finite']}",
              f"* overlap_comm off vs on, {c['overlap_comm']['steps']} steps: max relative loss difference "
              f"{c['overlap_comm']['max_rel_loss_diff']:.2e} (tolerance {c['overlap_comm']['tolerance']:g})",
              f"* rotary buffers float32 after deepspeed.initialize: checked in {c['fp32_rotary_buffers']['runs_checked']} "
              f"of {c['fp32_rotary_buffers']['runs']} starts",
              f"* work folder at the end: {fmt(result['work_dir_mb_at_end'], ',.0f')} MB",
              f"* MFU peak: {next((r['mfu_peak'] for r in rows if r.get('mfu_peak')), 'n/a')}",
              f"* versions: {next((r['versions'] for r in rows if r.get('versions')), 'n/a')}"]
    lines += [f"* FAILED: {b}" for b in bad]
    table = "\n".join(lines) + "\n"
    (work / "gpu_check.md").write_text(table)
    (work / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
