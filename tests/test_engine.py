"""The training engine, for real: DeepSpeed ZeRO-2 on CPU ranks (gloo), tiny LLaMA, packed data.

Runs (module-scoped, each a real `zhllama train` process):
  two_rank   2 ranks through launch/pretrain_stage2.sh (the `deepspeed` launcher), LoRA dropout 0
  one_rank   the same config in a plain process (a world of one)
  baseline   1 rank with LoRA dropout 0.05 (RNG matters), uninterrupted
  crashes    the baseline config SIGKILLed after a step / inside a checkpoint write, then restarted
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, subprocess_env
from zhllama.app.cli import main

REPO = Path(__file__).resolve().parent.parent
STEPS = 8
COMMON = [f"max_steps={STEPS}", "global_batch=8", "micro_batch=2", "block_size=32", "lr=0.01",
          "save_every=2", "keep_last=2", "eval_every=4", "eval_batches=2", "tensorboard=false"]


def _train(args, **env):
    cmd = [sys.executable, "-m", "zhllama.app.cli", "train", *map(str, args)]
    return subprocess.run(cmd, env=subprocess_env(**env), capture_output=True, text=True, timeout=600)


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def _metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def base_args(tiny_model_dir, tiny_packed):
    return ["stage=stage2", f"model={tiny_model_dir}", f"data=[{tiny_packed}]", "init_adapters=[]", *COMMON]


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory, base_args):
    run = tmp_path_factory.mktemp("two_rank") / "run"
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "pretrain_stage2.sh"), *base_args, "lora_dropout=0.0", f"out={run}"],
        env=subprocess_env(GPUS_PER_NODE=2, MASTER_PORT=free_port(), LOG_DIR=run.parent / "logs"),
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, base_args):
    run = tmp_path_factory.mktemp("one_rank") / "run"
    res = _train([*base_args, "lora_dropout=0.0", f"out={run}"])
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, base_args):
    run = tmp_path_factory.mktemp("baseline") / "run"
    res = _train([*base_args, f"out={run}"])
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.mark.slow
def test_two_rank_zero2_run_trains_checkpoints_and_writes_final(two_rank, tiny_model_dir):
    records = _metrics(two_rank)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 0.1, [r["loss"] for r in records]
    assert all(r["grad_norm"] is not None and r["tokens_per_s"] > 0 for r in records)
    assert "val_loss" in records[3] and "val_loss" in records[-1]
    ckpts = sorted(p.name for p in (two_rank / "checkpoints").iterdir())
    assert ckpts == [f"step-{STEPS - 2}", f"step-{STEPS}"]  # keep_last=2, no .tmp leftovers
    shards = sorted(p.name for p in (two_rank / "checkpoints" / f"step-{STEPS}" / "engine").iterdir())
    assert any("zero_pp_rank_1" in s for s in shards), shards  # ZeRO-partitioned optimizer of rank 1
    assert (two_rank / "config.yaml").is_file()
    log = (two_rank.parent / "logs" / "pretrain_stage2_node0.log").read_text()
    assert "step 8/8" in log

    # final/ reloads onto the base model and changes its output.
    from zhllama.modelio import load_model
    from zhllama.pretrain.adapters import load_adapter
    base = load_model(tiny_model_dir)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    before = base(ids).logits
    tuned = load_adapter(load_model(tiny_model_dir), two_rank / "final")
    after = tuned(ids).logits
    assert after.shape == before.shape and not torch.allclose(before, after)


@pytest.mark.slow
def test_one_rank_and_two_ranks_give_the_same_weights(two_rank, one_rank):
    """Same global batch, fp32: the same update on 1 and 2 ranks.

    Tolerance: the gradient allreduce sums in another order, and Adam divides by sqrt(v), so float
    rounding grows over steps. After 8 steps at lr 0.01 (each weight moves up to ~0.01 a step) we allow
    1e-4 absolute, i.e. ~1% of a single step's update; a wrong batch split or loss scaling (e.g. a
    missing 1/world or a per-micro-batch mean) moves weights by whole updates."""
    a, b = _final_weights(one_rank), _final_weights(two_rank)
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    la = [r["loss"] for r in _metrics(one_rank)]
    lb = [r["loss"] for r in _metrics(two_rank)]
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["after-step:5", "in-checkpoint:4"])
def test_sigkill_then_resume_ends_with_the_same_weights(crash, tmp_path, base_args, baseline):
    run = tmp_path / "run"
    args = [*base_args, f"out={run}"]
    killed = _train(args, ZHLLAMA_CRASH=crash)
    assert killed.returncode == -9, killed.stderr[-2000:]
    complete = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    expected_resume = "step-4" if crash.startswith("after-step") else "step-2"
    assert complete[-1] == expected_resume
    if crash.startswith("in-checkpoint"):
        assert (run / "checkpoints" / ".tmp-step-4").exists()  # the half-written one, never used

    resumed = _train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / expected_resume}" in resumed.stderr
    a, b = _final_weights(baseline), _final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in _metrics(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(baseline)]


def test_config_errors_before_any_compute(tmp_path, tiny_model_dir, tiny_packed, capsys):
    base = ["stage=stage2", f"model={tiny_model_dir}", f"data=[{tiny_packed}]", f"out={tmp_path / 'r'}"]
    assert main(["train", *base, "learning_rate=1e-4"]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
    assert main(["train", *base, "global_batch=10", "micro_batch=4"]) == 2
    err = capsys.readouterr().err
    assert "global_batch 10 is not divisible by micro_batch 4" in err
    assert main(["train", *base, "precision=fp64"]) == 2
    assert "precision" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_mismatched_shards_and_vocab_are_refused(tmp_path, tiny_model_dir, tiny_packed, tiny_tokenizer_dir):
    from zhllama.errors import UserError
    from zhllama.pretrain.shards import PackedBlocks
    from zhllama.tiny import make_tiny_llama, make_tiny_sp

    other_tok = make_tiny_sp(tmp_path / "other" / "tokenizer.model", vocab_size=400)
    with pytest.raises(UserError, match="packed with tokenizer"):
        PackedBlocks(tiny_packed, "train", expect_tokenizer=other_tok)
    with pytest.raises(UserError, match="blocks of 32 tokens"):
        PackedBlocks(tiny_packed, "train", expect_tokenizer=tiny_tokenizer_dir, expect_block_size=512)
    # A model whose vocab does not match the tokenizer: the run stops with both sizes named.
    small = make_tiny_llama(other_tok, tmp_path / "small_model")
    res = _train(["stage=stage2", f"model={small}", f"tokenizer={tiny_tokenizer_dir}", f"data=[{tiny_packed}]",
                  f"out={tmp_path / 'r'}", *COMMON])
    assert res.returncode == 2
    assert "vocab" in res.stderr and str(tiny_tokenizer_dir) in res.stderr


@pytest.mark.slow
def test_gradient_checkpointing_with_frozen_base_and_lora_gives_the_same_losses(tmp_path, base_args, one_rank):
    run = tmp_path / "gc"
    res = _train([*base_args, "lora_dropout=0.0", "gradient_checkpointing=true", f"out={run}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["loss"] for r in _metrics(run)] == pytest.approx([r["loss"] for r in _metrics(one_rank)], rel=1e-5)


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_and_a_streak_stops_the_run(tmp_path, base_args):
    # One NaN step (injected on rank 0 only): skipped, counted, the run goes on and ends finite.
    run = tmp_path / "nan"
    res = _train([*base_args, f"out={run}", "max_steps=4"], ZHLLAMA_NAN_STEPS="2")
    assert res.returncode == 0, res.stderr[-3000:]
    records = _metrics(run)
    assert records[1]["loss"] is None and records[1]["nonfinite_microbatches"] == 4  # 8 / micro 2
    assert all(r["loss"] is not None and r["nonfinite_microbatches"] == 0 for i, r in enumerate(records) if i != 1)
    assert all(torch.isfinite(t).all() for t in _final_weights(run).values())
    # Two in a row with max_nonfinite_steps=2: a clear stop, no final/, the last checkpoint intact.
    run = tmp_path / "nan_streak"
    res = _train([*base_args, f"out={run}", "max_steps=6", "max_nonfinite_steps=2"], ZHLLAMA_NAN_STEPS="3,4")
    assert res.returncode == 2
    assert "non-finite in 2 steps in a row" in res.stderr
    assert not (run / "final").exists()
    assert (run / "checkpoints" / "step-2" / "zhllama_state.json").is_file()


@pytest.mark.slow
def test_stage1_new_rows_only_on_a_resized_model_keeps_old_rows(tmp_path, tiny_model_dir, tiny_tokenizer_dir):
    """resize records where the added rows start; stage1 with new_rows_only trains only those rows."""
    from zhllama.modelio import load_model
    from zhllama.pretrain.adapters import merge_adapters
    from zhllama.tiny import extend_sp_model
    from zhllama.vocab.resize import resize_checkpoint

    import collections

    import sentencepiece as spm
    base_sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    ids = base_sp.encode((REPO / "zhllama" / "data" / "zh_sample.txt").read_text(encoding="utf-8"))
    # New pieces the text really produces: frequent adjacent Chinese pairs the base has no piece for.
    pairs = collections.Counter(base_sp.id_to_piece(a) + base_sp.id_to_piece(b) for a, b in zip(ids, ids[1:]))
    new = [p for p, _ in pairs.most_common(300) if base_sp.piece_to_id(p) == base_sp.unk_id()
           and all("\u4e00" <= ch <= "\u9fff" for ch in p)][:4]
    assert len(new) == 4
    ext = extend_sp_model(tiny_tokenizer_dir / "tokenizer.model", new, tmp_path / "ext" / "tokenizer.model")
    resized = tmp_path / "resized"
    resize_checkpoint(tiny_model_dir, ext, resized)
    base_rows = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert json.loads((resized / "config.json").read_text())["zhllama_base_vocab_size"] == base_rows
    packed = tmp_path / "packed"
    assert main(["data", "pack", "--tokenizer", resized, "--input", REPO / "zhllama" / "data" / "zh_sample.txt",
                 "--block-size", "32", "--out", packed, "--workers", "1"]) == 0
    from zhllama.pretrain.shards import PackedBlocks
    blocks = PackedBlocks(packed, "train")
    assert sum(int((blocks[i] >= base_rows).sum()) for i in range(len(blocks))) > 0  # new ids are trained on
    run = tmp_path / "run"
    res = _train(["stage=stage1", f"model={resized}", f"data=[{packed}]", "init_adapters=[]", "new_rows_only=true",
                  f"out={run}", *COMMON, "max_steps=4"])
    assert res.returncode == 0, res.stderr[-3000:]
    before = load_model(resized).get_input_embeddings().weight.detach().clone()
    after = merge_adapters(load_model(resized), [run / "final"]).get_input_embeddings().weight.detach()
    assert torch.equal(after[:base_rows], before[:base_rows])
    assert not torch.equal(after[base_rows:], before[base_rows:])


@pytest.mark.slow
def test_checkpoint_holds_trainable_weights_and_optimizer_state_only(baseline, tiny_model_dir):
    """No frozen parameter is saved: a checkpoint is trainable x (4 bytes fp32 weight + 12 bytes fp32
    master weight and Adam m, v), far below the model, and its size is logged."""
    from zhllama.pretrain.checkpoint import dir_bytes
    state = json.loads((baseline / "checkpoints" / f"step-{STEPS}" / "zhllama_state.json").read_text())
    assert state["world_size"] == 1 and state["settings"]["lr"] == 0.01 and state["model_fingerprint"]
    trainable = sum(t.numel() for t in _final_weights(baseline).values())  # the adapter holds the trained tensors
    engine_bytes = dir_bytes(baseline / "checkpoints" / f"step-{STEPS}" / "engine")
    assert abs(engine_bytes / (16 * trainable) - 1) < 0.05, (engine_bytes, trainable)
    model_bytes = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    with_copies = model_bytes + 4 * trainable  # what DeepSpeed saved before: the model and PEFT's trained copies
    assert engine_bytes < 16 * trainable + 0.05 * with_copies


@pytest.mark.slow
def test_planted_pickles_never_run_on_resume(tmp_path, base_args, baseline):
    """A pickle that would create a marker file, planted in every file a resume reads (and where the
    RNG state used to be pickled): nothing runs, and the resume stops with one line naming the file."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = run / "checkpoints" / f"step-{STEPS}"
    planted = sorted((ckpt / "engine").glob("*.pt")) + [ckpt / "rng_rank0.pt"]
    for f in planted:
        torch.save({"module": Payload()}, f)
    res = _train([*base_args, f"out={run}", f"max_steps={STEPS + 1}"])
    assert not marker.exists()
    assert res.returncode == 2, res.stderr[-3000:]
    err_lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(err_lines) == 1 and "refusing to load" in err_lines[0] and ".pt" in err_lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
