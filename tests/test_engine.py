"""The training engine, for real: DeepSpeed ZeRO-2 on CPU ranks (gloo), tiny LLaMA, packed data.

Runs (module-scoped, each a real `zhllama train` process):
  two_rank   2 ranks through launch/pretrain_stage2.sh (the `deepspeed` launcher), LoRA dropout 0
  one_rank   the same config in a plain process (a world of one)
  baseline   1 rank with LoRA dropout 0.05 (RNG matters), uninterrupted
  crashes    the baseline config SIGKILLed after a step / inside a checkpoint write, then restarted
  resumes    copies of these runs cut back to an earlier checkpoint and resumed on another world size, with
             a longer max_steps, under a file-size limit, or with weights made NaN
  stage1     stage 1 (TrainableTokens) on 1 rank, and the same run resumed 1 -> 2 -> 1 ranks
"""

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, subprocess_env
from runs import assert_same_run, cut_back, final_weights, metrics, resume_on_one_rank, train, train_two_ranks
from zhllama.app.cli import main

REPO = Path(__file__).resolve().parent.parent
STEPS = 8
COMMON = [f"max_steps={STEPS}", "global_batch=8", "micro_batch=2", "block_size=32", "lr=0.01",
          "save_every=2", "keep_last=2", "eval_every=4", "eval_batches=2", "tensorboard=false"]


def _train(args, **env):
    return train(args, timeout=600, **env)


def _train_two_ranks(args, run: Path):
    return train_two_ranks(args, run, timeout=600)


def _module_weights(ckpt: Path) -> dict:
    from zhllama.pretrain.safe_load import safe_torch_load
    return safe_torch_load(ckpt / "engine" / "mp_rank_00_model_states.pt", map_location="cpu")["module"]


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


def test_a_cpu_run_on_two_ranks_leaves_nothing_in_dev_shm(two_rank):
    """DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank and never unlinks it; the engine unlinks
    each once every rank has mapped them, so a run (ended or killed) leaves none of its files behind."""
    log = (two_rank.parent / "logs" / "pretrain_stage2_node0.log").read_text()
    assert "all-reduce files in /dev/shm unlinked" in log
    port = re.search(r"--master_port[ =](\d+)", log).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


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
    records = metrics(two_rank)
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
    a, b = final_weights(one_rank), final_weights(two_rank)
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    la = [r["loss"] for r in metrics(one_rank)]
    lb = [r["loss"] for r in metrics(two_rank)]
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
    a, b = final_weights(baseline), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(baseline)]


@pytest.mark.slow
def test_resume_two_ranks_to_one_equals_the_uninterrupted_runs(tmp_path, base_args, two_rank, one_rank):
    """A 2-rank checkpoint resumed on 1 rank: the ZeRO-2 optimizer state of 2 partitions becomes 1, by name."""
    run = cut_back(two_rank, tmp_path / "run", 6)
    res = resume_on_one_rank([*base_args, "lora_dropout=0.0", f"out={run}"], timeout=600)
    assert f"resumed from {run / 'checkpoints' / 'step-6'}" in res.stderr
    assert_same_run(run, two_rank)
    assert_same_run(run, one_rank)


@pytest.mark.slow
def test_resume_one_rank_to_two_equals_the_uninterrupted_runs(tmp_path, base_args, two_rank, one_rank):
    run = cut_back(one_rank, tmp_path / "run", 6)
    res = _train_two_ranks([*base_args, "lora_dropout=0.0", f"out={run}"], run)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (run.parent / "logs" / "pretrain_stage2_node0.log").read_text()
    assert "written by 1 ranks; its optimizer state is redistributed over 2" in log
    assert_same_run(run, one_rank)
    assert_same_run(run, two_rank)


@pytest.fixture(scope="module")
def stage1_args(tiny_model_dir, tiny_packed):
    return ["stage=stage1", f"model={tiny_model_dir}", f"data=[{tiny_packed}]", "init_adapters=[]", *COMMON,
            "keep_last=4"]


@pytest.mark.slow
def test_stage1_resumed_one_to_two_to_one_ranks_equals_the_uninterrupted_run(tmp_path_factory, stage1_args):
    """Stage 1 trains one TrainableTokens matrix, which ZeRO-2 cuts across the 2 ranks' partitions: steps 1-4
    on 1 rank, 5-6 on 2 ranks, 7-8 on 1 rank against 1-8 on 1 rank."""
    root = tmp_path_factory.mktemp("stage1")
    reference = root / "reference"
    res = _train([*stage1_args, f"out={reference}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(final_weights(reference)) == 1  # the one trainable_tokens_delta

    run = cut_back(reference, root / "one_two", 4)
    res = _train_two_ranks([*stage1_args, f"out={run}"], run)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step-6" / "zhllama_state.json").read_text())
    assert state["world_size"] == 2
    assert_same_run(run, reference)

    run = cut_back(run, root / "one_two_one", 6)
    resume_on_one_rank([*stage1_args, f"out={run}"], timeout=600)
    assert_same_run(run, reference)


@pytest.mark.slow
def test_a_longer_max_steps_continues_the_schedule_without_a_step_at_lr_0(tmp_path, base_args, baseline):
    """8 steps done (the schedule ended at lr 0), resumed with max_steps=10: the schedule is laid over 10
    steps and step 9 takes its lr at step index 8. Warmup round(10 x 0.05) = 0 -> 1 step, so cosine over
    9 steps: lr(i) = 0.01 x 0.5 x (1 + cos(pi (i - 1) / 9))."""
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    assert metrics(baseline)[-1]["step"] == 8
    res = _train([*base_args, f"out={run}", "max_steps=10", "save_every=1", "keep_last=3"])
    assert res.returncode == 0, res.stderr[-3000:]
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[8]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(7 * math.pi / 9)), rel=1e-12)  # 1.1698e-3
    assert records[9]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(8 * math.pi / 9)), rel=1e-12)  # 3.0154e-4
    assert records[8]["lr"] == pytest.approx(1.16978e-3, rel=1e-5)
    # The lr was applied, not only logged: step 9 moved every trainable tensor.
    before, after = _module_weights(run / "checkpoints" / "step-8"), _module_weights(run / "checkpoints" / "step-9")
    assert before.keys() == after.keys() and len(before) > 0
    assert all(not torch.equal(before[k], after[k]) for k in before), [k for k in before if torch.equal(before[k], after[k])]


def _limit_file_size(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_the_rerun_resumes(tmp_path, base_args, baseline):
    """A file-size limit (RLIMIT_FSIZE, as a full disk) between the model-states file and the optimizer shard
    of checkpoint 8: one line naming the shard, step-6 untouched, nothing half-written left; the rerun
    resumes from step-6 and ends exactly as the uninterrupted run."""
    run = cut_back(baseline, tmp_path / "run", 6)
    engine_files = {p.name: p.stat().st_size for p in (run / "checkpoints" / "step-6" / "engine").iterdir()}
    shard, model_states = "zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"
    limit = (engine_files[shard] + engine_files[model_states]) // 2
    assert engine_files[model_states] < limit < engine_files[shard], engine_files
    before = {p.relative_to(run): p.read_bytes() for p in (run / "checkpoints" / "step-6").rglob("*") if p.is_file()}

    cmd = [sys.executable, "-m", "zhllama.app.cli", "train", *base_args, f"out={run}"]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600,
                         preexec_fn=_limit_file_size(limit))
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert str(run / "checkpoints" / ".tmp-step-8" / "engine" / shard) in errors[0]
    assert f"the last complete checkpoint {run / 'checkpoints' / 'step-6'} is intact" in errors[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-6"]
    after = {p.relative_to(run): p.read_bytes() for p in (run / "checkpoints" / "step-6").rglob("*") if p.is_file()}
    assert after == before

    res = _train([*base_args, f"out={run}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-6'}" in res.stderr
    a, b = final_weights(baseline), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(baseline)]


@pytest.mark.slow
def test_no_checkpoint_is_written_from_nonfinite_weights(tmp_path, base_args, baseline):
    """Weights made NaN after step 8 (ZHLLAMA_NAN_WEIGHTS, as after a NaN update DeepSpeed let through): the
    run stops before checkpoint 8 is written, saying so, and step-6 stays the one to resume from."""
    run = cut_back(baseline, tmp_path / "run", 6)
    res = _train([*base_args, f"out={run}"], ZHLLAMA_NAN_WEIGHTS="8")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "stopped at step 8: the trainable weights are not finite (" in errors[0] and "on rank 0)" in errors[0]
    assert f"the last complete checkpoint {run / 'checkpoints' / 'step-6'} is kept" in errors[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-6"]
    assert not (run / "final").exists()


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
    assert [r["loss"] for r in metrics(run)] == pytest.approx([r["loss"] for r in metrics(one_rank)], rel=1e-5)


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_and_a_streak_stops_the_run(tmp_path, base_args):
    # One NaN step (injected on rank 0 only): skipped, counted, the run goes on and ends finite.
    run = tmp_path / "nan"
    res = _train([*base_args, f"out={run}", "max_steps=4"], ZHLLAMA_NAN_STEPS="2")
    assert res.returncode == 0, res.stderr[-3000:]
    records = metrics(run)
    assert records[1]["loss"] is None and records[1]["nonfinite_microbatches"] == 4  # 8 / micro 2
    assert all(r["loss"] is not None and r["nonfinite_microbatches"] == 0 for i, r in enumerate(records) if i != 1)
    assert all(torch.isfinite(t).all() for t in final_weights(run).values())
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
    trainable = sum(t.numel() for t in final_weights(baseline).values())  # the adapter holds the trained tensors
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
