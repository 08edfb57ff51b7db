"""The engine's defaults and options that every config and README command relies on, each against
figures worked out here, on the tiny model (each a real `zhllama train` process, a world of one):

  epochs      `max_steps` unset (null, the default of every config): the run length, the warmup and the
              cosine horizon come from `epochs` x the blocks of the pack, counted here from the tokens
  lr          the learning rate the engine applied at each step, read back from metrics.jsonl, against
              linear warmup + cosine to `min_lr_ratio` x peak written out here
  tensorboard on by default: the event file holds the same lr and loss per step
  offload     `ds_config=zero2_offload` (DeepSpeed's CPU Adam, the FAQ's fix for 24 GB cards) trains as
              `zero2` does, within float rounding
  fp16        the engine's fp16 path (tests/fp16_on_cpu.py): DeepSpeed's dynamic loss scaling, overflow
              steps skipped, counted and not advancing the schedule
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
from safetensors.torch import load_file

from conftest import SAMPLES, subprocess_env
from zhllama.app.cli import main

TESTS = Path(__file__).resolve().parent
BLOCK, GLOBAL, MICRO = 32, 8, 4
EPOCHS, LR, MIN_LR, WARMUP = 1.5, 0.01, 0.1, 0.25
# The options every run here shares; max_steps and tensorboard are left at their defaults (null, true).
COMMON = ["stage=stage2", "init_adapters=[]", f"global_batch={GLOBAL}", f"micro_batch={MICRO}", f"block_size={BLOCK}",
          f"lr={LR}", f"min_lr_ratio={MIN_LR}", "lora_dropout=0.0", "save_every=1000", "eval_every=0"]


def _train(out: Path, *overrides, script=None, **env) -> subprocess.CompletedProcess:
    """`zhllama train` in a subprocess (or `script`, which ends in the same CLI)."""
    entry = [str(script)] if script else ["-m", "zhllama.app.cli"]
    res = subprocess.run([sys.executable, *entry, "train", *map(str, overrides), f"out={out}"],
                         env=subprocess_env(**env), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _lr(k: int, total: int, warmup: int) -> float:
    """The lr of the (k+1)-th applied step, written out from docs/training.md: linear warmup over `warmup`
    steps, then cosine from LR down to MIN_LR x LR at the end of the run."""
    if k < warmup:
        return LR * (k + 1) / warmup
    progress = (k - warmup) / (total - warmup)
    return LR * (MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer_dir):
    """(pack, blocks): the first 40 documents of the bundled Chinese sample packed into blocks of 32 with no
    validation split, and the number of blocks counted here: every document is BOS + its tokens + EOS,
    concatenated and cut into blocks, the last partial block dropped."""
    docs = (SAMPLES / "zh_sample.txt").read_text(encoding="utf-8").splitlines()[:40]
    assert all(d.strip() == d != "" for d in docs)
    text = tmp_path_factory.mktemp("defaults_data") / "zh40.txt"
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    packed = text.parent / "packed"
    assert main(["data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", text, "--block-size", BLOCK,
                 "--out", packed, "--validation-ratio", "0", "--workers", "1"]) == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    tokens = sum(len(ids) + 2 for ids in sp.encode(docs))
    return packed, tokens // BLOCK


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, tiny_model_dir, corpus):
    """`epochs=1.5`, max_steps unset, 25% warmup, min_lr_ratio 0.1, tensorboard at its default."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    res = _train(run, *COMMON, f"model={tiny_model_dir}", f"data=[{corpus[0]}]", f"epochs={EPOCHS}",
                 f"warmup_ratio={WARMUP}")
    return run, res


@pytest.fixture(scope="module")
def offload_run(tmp_path_factory, tiny_model_dir, corpus):
    run = tmp_path_factory.mktemp("offload") / "run"
    res = _train(run, *COMMON, f"model={tiny_model_dir}", f"data=[{corpus[0]}]", f"epochs={EPOCHS}",
                 f"warmup_ratio={WARMUP}", "ds_config=zero2_offload")
    return run, res


@pytest.mark.slow
def test_epochs_set_the_step_count_warmup_and_final_lr(zero2_run, corpus):
    run, res = zero2_run
    blocks = corpus[1]
    total = math.ceil(EPOCHS * blocks / GLOBAL)        # 1.5 passes over the blocks, 8 sequences a step
    warmup = round(total * WARMUP)
    assert total > 2 * warmup > 2                      # a warmup and a cosine to check, whatever the pack holds
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, total + 1))
    assert json.loads((run / "summary.json").read_text())["total_steps"] == total
    assert f"| {total} steps |" in res.stderr
    lrs = [r["lr"] for r in records]
    assert lrs == pytest.approx([_lr(k, total, warmup) for k in range(total)], rel=1e-9)
    # by hand: the first step at 1/warmup of the peak, the peak at the end of the warmup, and the last step one
    # cosine step above the floor of 0.1 x peak
    assert lrs[0] == pytest.approx(LR / warmup, rel=1e-12) and lrs[warmup - 1] == pytest.approx(LR, rel=1e-12)
    last = (total - 1 - warmup) / (total - warmup)
    assert lrs[-1] == pytest.approx(LR * (0.1 + 0.9 * (1 + math.cos(math.pi * last)) / 2), rel=1e-12)
    assert all(r["loss"] is not None for r in records) and records[-1]["loss"] < records[0]["loss"]


@pytest.mark.slow
def test_tensorboard_is_on_by_default_with_every_steps_scalars(zero2_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = zero2_run
    records = _metrics(run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("lr", "loss", "grad_norm", "tokens_per_s"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["step"] for r in records], key
    assert [s.value for s in events.Scalars("lr")] == pytest.approx([r["lr"] for r in records], rel=1e-6)
    assert [s.value for s in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)


@pytest.mark.slow
def test_zero2_offload_trains_like_zero2(zero2_run, offload_run):
    """DeepSpeed's CPU Adam (its own SIMD AdamW, the same formula) on the offloaded optimizer states against
    torch's AdamW: the same run up to float rounding. Each weight moves up to ~lr = 0.01 a step. An element
    whose gradient is near Adam's eps (1e-8), a rarely seen token's embedding, takes an update that hangs on
    the gradient's last bits, so a few such elements may part by less than one step (7 of 198,656 by up to
    5e-3 when this was written); every other element stays within 1e-4, ~1% of one step. A wrong beta, lr
    or clipping moves nearly every element by whole updates. (The first run on a machine compiles
    DeepSpeed's cpu_adam op, once.)"""
    (ref, _), (run, res) = zero2_run, offload_run
    assert "ds config zero2_offload.json" in res.stderr
    a, b = _metrics(ref), _metrics(run)
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    wa = load_file(str(ref / "final" / "adapter_model.safetensors"))
    wb = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert float(diff.max()) < LR                              # never a whole step apart
    assert int((diff > 1e-4).sum()) <= 1e-4 * diff.numel()    # and all but a handful within ~1% of one


@pytest.mark.slow
def test_fp16_dynamic_loss_scaling_skips_and_counts_overflow_steps(tmp_path, tiny_model_dir, corpus):
    """Steps 2 and 3 are poisoned (a NaN loss, the engine's test seam): ds_configs/zero2.json's dynamic
    scaler starts at 2^16 and has a hysteresis of 2, so the first overflow only uses up the hysteresis and
    the second halves the scale; a window of 1000 steps means no growth here. Each skipped step counts its
    2 micro-batches, and DeepSpeed does not advance the lr schedule on a skipped step."""
    run = tmp_path / "run"
    res = _train(run, *COMMON, f"model={tiny_model_dir}", f"data=[{corpus[0]}]", "max_steps=6", "warmup_ratio=0",
                 "precision=fp16", "tensorboard=false", script=TESTS / "fp16_on_cpu.py", ZHLLAMA_NAN_STEPS="2,3")
    assert "precision fp16" in res.stderr
    records = _metrics(run)
    assert [r["loss_scale"] for r in records] == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 32768.0]
    assert [r["nonfinite_microbatches"] for r in records] == [0, 2, 2, 0, 0, 0]
    assert [r["loss"] is None for r in records] == [False, True, True, False, False, False]
    assert json.loads((run / "summary.json").read_text())["nonfinite_skipped"] == 4
    applied = [0, 1, 1, 1, 2, 3]    # schedule steps taken before each step: none during steps 2 and 3
    assert [r["lr"] for r in records] == pytest.approx([_lr(k, 6, 0) for k in applied], rel=1e-9)
    weights = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())
