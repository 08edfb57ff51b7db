"""Resume logic without a training run: what a checkpoint records and checks, and how state moves to
another world size (the runs themselves are in tests/test_engine.py).

* a pack rebuilt from other text at the same path, or an edited SFT file, is refused on resume naming
  the file and both hashes; the same text packed again is not; --allow-data-change lets it through;
* a checkpoint of 2 ranks is not refused on 1 rank (the check happens before the model is loaded);
* the optimizer files of N ranks are read back by parameter name across partition boundaries;
* a longer run's schedule: the lr of the next step comes from the new schedule, never the old one's 0;
* global rank 0 chooses the checkpoint for every rank, and a failure on one rank reaches every rank
  (2 gloo processes).
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from conftest import SAMPLES, free_port, subprocess_env
from zhllama.app.cli import main
from zhllama.errors import UserError
from zhllama.pretrain import checkpoint, engine as engine_mod, reshard
from zhllama.pretrain.config import RunConfig, load_config
from zhllama.schedule import lr_lambda
import zhllama.sft.stage_data  # noqa: F401  (registers the sft data reader, as `zhllama train` does)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pack(tokenizer_dir, text_file, out):
    assert main(["data", "pack", "--tokenizer", str(tokenizer_dir), "--input", str(text_file), "--block-size", "32",
                 "--out", str(out), "--workers", "1"]) == 0


@pytest.fixture
def zh_lines():
    return (SAMPLES / "zh_sample.txt").read_text(encoding="utf-8").splitlines()


def _checkpoint_of(run_dir: Path, cfg, step=2, world=1, **state) -> Path:
    """A checkpoint directory holding only its state file, as `cfg` on `world` ranks would write it."""
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    full = checkpoint.run_state(cfg, step, world, checkpoint.model_fingerprint(cfg.model),
                                checkpoint.data_fingerprint(cfg))
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({**full, **state}))
    return ckpt


def test_a_pack_rebuilt_from_other_text_at_the_same_path_is_refused_naming_the_file(
        tmp_path, tiny_tokenizer_dir, tiny_model_dir, zh_lines):
    corpus, packed = tmp_path / "corpus.txt", tmp_path / "packed"
    corpus.write_text("\n".join(zh_lines[:150]) + "\n", encoding="utf-8")
    _pack(tiny_tokenizer_dir, corpus, packed)
    old_sha = _sha(corpus)
    args = ["stage=stage2", f"model={tiny_model_dir}", f"data=[{packed}]", f"out={tmp_path / 'run'}", "global_batch=8"]
    cfg = load_config(None, args)
    ckpt = _checkpoint_of(tmp_path / "run", cfg)

    _pack(tiny_tokenizer_dir, corpus, packed)  # the same text packed again: the same blocks, no refusal
    checkpoint.check_data(ckpt, checkpoint.data_fingerprint(cfg))

    corpus.write_text("\n".join(zh_lines[150:]) + "\n", encoding="utf-8")
    _pack(tiny_tokenizer_dir, corpus, packed)
    new_sha = _sha(corpus)
    with pytest.raises(UserError) as e:
        checkpoint.check_data(ckpt, checkpoint.data_fingerprint(cfg))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{ckpt}: the training data changed since this checkpoint")
    assert f"sha256 of {corpus.resolve()}: {old_sha[:12]} -> {new_sha[:12]}" in msg, msg
    assert "--allow-data-change" in msg


def test_changed_data_is_refused_before_the_model_is_loaded_and_allowed_on_request(
        tmp_path, tiny_tokenizer_dir, tiny_model_dir, zh_lines, monkeypatch):
    """Through Trainer.run: a changed pack stops the run before build_model; --allow-data-change (and
    --allow-config-change) go on to load the model; so does a checkpoint written by 2 ranks on 1."""
    corpus, packed = tmp_path / "corpus.txt", tmp_path / "packed"
    corpus.write_text("\n".join(zh_lines[:150]) + "\n", encoding="utf-8")
    _pack(tiny_tokenizer_dir, corpus, packed)
    args = ["stage=stage2", f"model={tiny_model_dir}", f"data=[{packed}]", f"out={tmp_path / 'run'}", "global_batch=8"]
    cfg = load_config(None, args)
    ckpt = _checkpoint_of(tmp_path / "run", cfg, world=2)

    class ModelLoaded(Exception):
        pass

    def no_model(*a, **k):
        raise ModelLoaded

    monkeypatch.setattr(engine_mod, "build_model", no_model)
    monkeypatch.setattr(engine_mod, "init_distributed", lambda: (0, 1, 0))
    with pytest.raises(ModelLoaded):  # 2 ranks -> 1: not refused
        engine_mod.Trainer(cfg).run()

    corpus.write_text("\n".join(zh_lines[150:]) + "\n", encoding="utf-8")
    _pack(tiny_tokenizer_dir, corpus, packed)
    with pytest.raises(UserError, match="the training data changed since this checkpoint"):
        engine_mod.Trainer(cfg).run()
    with pytest.raises(ModelLoaded):
        engine_mod.Trainer(cfg, allow_data_change=True).run()
    with pytest.raises(ModelLoaded):
        engine_mod.Trainer(cfg, allow_config_change=True).run()
    assert json.loads((ckpt / checkpoint.STATE_FILE).read_text())["step"] == 2


def test_an_edited_sft_file_is_refused_naming_it(tmp_path):
    data = tmp_path / "sft.jsonl"
    record = {"instruction": "把这句话翻译成英文", "input": "你好", "output": "Hello"}
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = load_config(None, ["stage=sft", f"model={tmp_path}", f"data=[{data}:2]", f"out={tmp_path / 'run'}"])
    saved = checkpoint.data_fingerprint(cfg)
    assert saved == {f"{data}:2": {"sha256 of": {str(data): _sha(data)}}}
    old = _sha(data)
    data.write_text(json.dumps({**record, "output": "Hi"}, ensure_ascii=False) + "\n", encoding="utf-8")
    changes = checkpoint.fingerprint_changes(saved, checkpoint.data_fingerprint(cfg))
    assert changes == [f"{data}:2 sha256 of {data}: {old[:12]} -> {_sha(data)[:12]}"]


# ----------------------------------------------------------------------------- the schedule of a longer run

def test_a_longer_run_takes_the_next_lr_from_the_new_schedule():
    """4 steps of a 4-step schedule end at lr 0 (what the saved optimizer holds); the state loaded into a
    10-step schedule gives step 5 the new schedule's lr at index 4: warmup round(10 x 0.05) -> 1 step, then
    cosine over 9: 0.01 x 0.5 x (1 + cos(3 pi / 9)) = 0.0075."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.01)
    old = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(4, 0.05, 0.0))
    for _ in range(4):
        opt.step()
        old.step()
    assert opt.param_groups[0]["lr"] == 0.0
    saved_opt, saved_sched = opt.state_dict(), old.state_dict()

    p2 = torch.nn.Parameter(torch.zeros(2))
    opt2 = torch.optim.AdamW([p2], lr=0.01)
    new = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda(10, 0.05, 0.0))
    opt2.load_state_dict(saved_opt)
    new.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["lr"] == 0.0  # what a resume used before: a step at lr 0
    checkpoint.continue_schedule(new)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0075, rel=1e-12)
    assert new.get_last_lr() == [opt2.param_groups[0]["lr"]]
    opt2.step()
    new.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(4 * math.pi / 9)), rel=1e-12)


# ----------------------------------------------------------------------------- optimizer files by parameter name

def _write_shards(d: Path):
    """Two ranks' ZeRO-2 optimizer files of one group holding a (6,) and a (2, 3) parameter: flat
    [a0..a5 b0..b5], rank 0 owns elements 0-6 (a, b0), rank 1 owns 7-11 (b1..b5) plus 2 of padding."""
    from deepspeed.utils.tensor_fragment import fragment_address

    flat = torch.arange(12, dtype=torch.float32)
    layout = {0: {"a": fragment_address(numel=6, start=0), "b": fragment_address(numel=1, start=6)},
              1: {"b": fragment_address(numel=5, start=0)}}
    for rank, (lo, hi) in enumerate(((0, 7), (7, 12))):
        part = flat[lo:hi]
        padded = torch.cat([part, torch.zeros(7 - len(part))])
        opt = {"param_slice_mappings": [layout[rank]], "single_partition_of_fp32_groups": [part.clone()],
               "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": padded * 10,
                                                      "exp_avg_sq": padded * 100}},
                                        "param_groups": [{"lr": 0.0, "params": [0]}]}}
        torch.save({"optimizer_state_dict": opt}, d / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def test_saved_shards_give_back_each_parameter_across_partition_boundaries(tmp_path):
    _write_shards(tmp_path)
    shards = reshard.SavedShards(tmp_path, saved_world=2)
    assert shards.numel("a") == 6 and shards.numel("b") == 6
    assert shards.values("b", reshard.FP32, 0, 6).tolist() == [6, 7, 8, 9, 10, 11]
    assert shards.values("b", "exp_avg", 0, 3).tolist() == [60, 70, 80]  # b0 from rank 0, b1 b2 from rank 1
    assert shards.values("a", "exp_avg_sq", 4, 2).tolist() == [400, 500]
    assert {k: float(v) for k, v in shards.scalar_state("b").items()} == {"step": 3.0}
    assert shards.partitioned_keys == ["exp_avg", "exp_avg_sq"]
    with pytest.raises(UserError, match="needs elements 4..8"):
        shards.values("b", reshard.FP32, 4, 4)
    with pytest.raises(UserError, match=r"needs the optimizer files of ranks 0\.\.2; found \[0, 1\]"):
        reshard.SavedShards(tmp_path, saved_world=3)


def test_a_planted_pickle_in_an_optimizer_file_is_refused_when_resharding(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _write_shards(tmp_path)
    torch.save({"optimizer_state_dict": Payload()}, tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(UserError, match="refusing to load a checkpoint file"):
        reshard.SavedShards(tmp_path, saved_world=2)
    assert not marker.exists()


class _PickledByGetattr:
    """What Python 3.11.0-3.11.4 (Debian 12's 3.11.2) write for an enum member: `getattr(cls, name)`."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return (getattr, (self.cls, self.name))


def test_an_enum_member_pickled_by_getattr_loads_and_nothing_else_does(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from zhllama.pretrain.safe_load import safe_torch_load
    torch.save({"zero_stage": _PickledByGetattr(ZeroStageEnum, "gradients")}, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt")["zero_stage"] is ZeroStageEnum.gradients
    # the name allows a member lookup on DeepSpeed's enums only: not another attribute, not another class
    for i, (cls, name) in enumerate([(ZeroStageEnum, "__class__"), (ZeroStageEnum, "_member_map_"), (subprocess.Popen, "__init__"),
                                     (torch.Tensor, "add_")]):
        torch.save({"x": _PickledByGetattr(cls, name)}, tmp_path / f"bad{i}.pt")
        with pytest.raises(UserError, match="refusing to load a checkpoint file"):
            safe_torch_load(tmp_path / f"bad{i}.pt")


# ----------------------------------------------------------------------------- a failed write on one rank

class _CkptEngine:
    """DeepSpeed's checkpoint engine as the engine uses it: `save(state_dict, path)`; rank 1's disk is full."""

    def __init__(self, rank):
        self.rank = rank

    def save(self, state_dict, path):
        if self.rank == 1:
            raise OSError(28, "No space left on device")
        Path(path).write_bytes(b"x" * 10)


class _Engine:
    def __init__(self, rank, weight):
        self.rank, self.checkpoint_engine = rank, _CkptEngine(rank)
        self.module = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.module.weight.fill_(weight)

    def save_checkpoint(self, path, tag, client_state, save_latest, exclude_frozen_parameters):
        (Path(path) / tag).mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({}, str(Path(path) / tag / f"zero_pp_rank_{self.rank}_optim_states.pt"))


def _save_on_two_threads(root, step, weights):
    """checkpoint.save on 2 threads standing for 2 ranks, with an `agree` like the engine's first_message."""
    barrier, said, results = threading.Barrier(2), [None, None], [None, None]

    def agree_for(rank):
        def agree(message):
            said[rank] = message
            barrier.wait()
            first = next((m for m in said if m), None)
            barrier.wait()
            return first
        return agree

    def rank_main(rank):
        try:
            results[rank] = checkpoint.save(_Engine(rank, weights[rank]), root, step, {"step": step}, rank=rank,
                                            barrier=barrier.wait, keep_last=2, agree=agree_for(rank))
        except UserError as e:
            results[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return results


def test_a_write_failing_on_one_rank_stops_every_rank_naming_the_file(tmp_path):
    good = tmp_path / "step-2"
    good.mkdir()
    (good / checkpoint.STATE_FILE).write_text('{"step": 2}')
    results = _save_on_two_threads(tmp_path, 4, weights=(1.0, 1.0))
    assert all(isinstance(r, UserError) for r in results), results
    shard = tmp_path / ".tmp-step-4" / "engine" / "zero_pp_rank_1_optim_states.pt"
    assert str(results[0]) == str(results[1])
    assert str(results[0]).startswith(f"{shard}: No space left on device (a full disk, a quota or a file-size limit")
    assert f"the last complete checkpoint {good} is intact" in str(results[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]  # the half-written one removed


def test_weights_not_finite_on_one_rank_stop_every_rank_before_anything_is_written(tmp_path):
    results = _save_on_two_threads(tmp_path, 4, weights=(1.0, float("inf")))
    assert all(isinstance(r, checkpoint.NonFiniteWeights) for r in results), results
    assert str(results[0]) == ("the trainable weights are not finite (weight on rank 1); checkpoint step-4 was not "
                               "written, and there is no earlier checkpoint")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 2 gloo ranks

_TWO_RANKS = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    from zhllama.errors import UserError
    from zhllama.pretrain import checkpoint, engine

    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    cpu = torch.device("cpu")
    out = {}
    # Each rank lists its own view of the run directory: rank 1 sees a newer checkpoint rank 0 does not.
    root = Path(sys.argv[1]) / f"view{rank}"
    chosen = checkpoint.choose_resume(root, rank=rank, broadcast=lambda s: engine.broadcast_from_rank0(s, cpu))
    out["chosen"] = chosen.name
    out["alone"] = checkpoint.latest_checkpoint(root).name
    # Rank 1 cannot see what rank 0 chose: it waits, then stops with one line.
    root = Path(sys.argv[1]) / f"lagging{rank}"
    try:
        checkpoint.choose_resume(root, rank=rank, broadcast=lambda s: engine.broadcast_from_rank0(s, cpu), wait_s=1)
        out["lagging"] = "ok"
    except UserError as e:
        out["lagging"] = str(e)
    out["none"] = engine.first_message(None, cpu)
    out["one"] = engine.first_message("disk full on rank 1" if rank == 1 else None, cpu)
    out["both"] = engine.first_message(f"rank {rank} says 中文", cpu)
    print(json.dumps(out, ensure_ascii=False), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads must stop before the interpreter exits
''')


@pytest.mark.slow
def test_global_rank_zero_chooses_the_checkpoint_and_messages_reach_every_rank(tmp_path):
    for rank, steps in ((0, (2, 4)), (1, (2, 4, 6))):
        for step in steps:
            (tmp_path / f"view{rank}" / f"step-{step}").mkdir(parents=True)
            (tmp_path / f"view{rank}" / f"step-{step}" / checkpoint.STATE_FILE).write_text('{"step": %d}' % step)
    (tmp_path / "lagging0" / "step-4").mkdir(parents=True)
    (tmp_path / "lagging0" / "step-4" / checkpoint.STATE_FILE).write_text('{"step": 4}')
    (tmp_path / "lagging1").mkdir()
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["alone"] for o in outs] == ["step-4", "step-6"]  # what each rank would have picked by itself
    assert [o["chosen"] for o in outs] == ["step-4", "step-4"]
    assert outs[0]["lagging"] == "ok"
    assert outs[1]["lagging"] == (f"{tmp_path / 'lagging1' / 'step-4'}: global rank 0 resumes from this checkpoint, "
                                  "but rank 1 cannot see it after 1 s; the run directory must be on storage every "
                                  "node shares")
    assert [o["none"] for o in outs] == [None, None]
    assert [o["one"] for o in outs] == ["disk full on rank 1"] * 2
    assert [o["both"] for o in outs] == ["rank 0 says 中文"] * 2


def test_ds_config_left_to_the_stage_default_resumes_a_run_that_named_it():
    """`zhllama train` without a config file leaves ds_config null (the stage's default, zero2); the
    launchers pass configs/stage2.yaml, which names zero2. Both are the same run; zero1 is another."""
    named, default = RunConfig(stage="stage2", ds_config="zero2"), RunConfig(stage="stage2", ds_config=None)
    assert checkpoint.resume_settings(named) == checkpoint.resume_settings(default)
    assert checkpoint.resume_settings(default)["ds_config"] == "zero2"
    assert checkpoint.resume_settings(RunConfig(stage="stage2", ds_config="zero1"))["ds_config"] == "zero1"
