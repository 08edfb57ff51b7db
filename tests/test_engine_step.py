"""The engine's step, loss and checkpoint logic, without a DeepSpeed run (fast).

* every collective of a training step gets a tensor on the engine's device, and the step reads the
  host at most twice (a fake "meta" engine device: any other host read raises);
* `precision: auto` picks bf16 only on GPUs that compute it natively;
* the chunked token loss equals the plain cross-entropy, value and gradient;
* packed SFT examples do not see each other through the engine's loss module;
* only global rank 0 finalises a checkpoint, even when every node has a local rank 0;
* a resume with a changed config is refused before any model is loaded.
"""

import json
import math
import os
import signal
import threading
from types import SimpleNamespace

import pytest
import torch

from zhllama.errors import UserError
from zhllama.loss import CausalLMTokenLoss, token_loss_sum
from zhllama.pretrain import checkpoint, engine as engine_mod
from zhllama.pretrain.config import load_config
from zhllama.pretrain import hooks as hooks_mod
from zhllama.pretrain.hooks import CRASH_ENV, NAN_STEPS_ENV, NAN_WEIGHTS_ENV, TrainHooks, hooks_from_env


# ----------------------------------------------------------------------------- collectives and host syncs

class _ToyLM(torch.nn.Module):
    """Embedding + head with the two methods CausalLMTokenLoss uses."""

    def __init__(self, vocab=40, d=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.config = SimpleNamespace(vocab_size=vocab)

    def get_decoder(self):
        return lambda input_ids, **kw: SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def get_output_embeddings(self):
        return self.head


class _FakeEngine:
    """The DeepSpeed engine's calling surface: forward, backward, step."""

    def __init__(self, module):
        self.module = module
        self.steps = 0

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        self.steps += 1

    def train(self):
        pass

    def eval(self):
        pass


def test_collectives_get_device_tensors_and_host_reads_are_bounded(monkeypatch):
    device = torch.device("meta")  # a device whose tensors cannot be read by the host: any sync raises
    seen, host_reads = [], []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: seen.append(t.device))
    monkeypatch.setattr(engine_mod.Trainer, "_to_host",
                        staticmethod(lambda t: host_reads.append(t.device) or [1.0] * t.numel()))
    t = engine_mod.Trainer.__new__(engine_mod.Trainer)
    t.cfg = SimpleNamespace(micro_batch=2)
    t.preset = SimpleNamespace(global_batch=8)
    t.rank, t.world, t.device = 0, 2, device
    t.hooks = TrainHooks()
    t.engine = _FakeEngine(CausalLMTokenLoss(_ToyLM()).to(device))
    blocks = [torch.randint(0, 40, (16,)) for _ in range(32)]
    t.data = SimpleNamespace(train=blocks, collate=engine_mod._collate_blocks, validation=blocks)
    order = SimpleNamespace(index=lambda p: p % len(blocks))
    for step in range(3):
        t._train_step(step, order, grad_accum=2)
    assert t.engine.steps == 6
    assert seen and all(d == device for d in seen), seen  # never a CPU tensor into the collective
    assert len(seen) == 2 * 3 and len(host_reads) == 2 * 3  # once before, once after each step
    t.cfg.eval_batches = 2
    seen.clear()
    t.evaluate()
    assert seen == [device]


# ----------------------------------------------------------------------------- test hooks

def _cpu_trainer(hooks=None):
    t = engine_mod.Trainer.__new__(engine_mod.Trainer)
    t.cfg = SimpleNamespace(micro_batch=2)
    t.preset = SimpleNamespace(global_batch=4)
    t.rank, t.world, t.device = 0, 1, torch.device("cpu")
    t.hooks = hooks or TrainHooks()
    t.engine = _FakeEngine(CausalLMTokenLoss(_ToyLM()))
    blocks = [torch.randint(0, 40, (16,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    t.data = SimpleNamespace(train=blocks, collate=engine_mod._collate_blocks)
    return t, SimpleNamespace(index=lambda p: p % len(blocks))


def test_poison_hook_makes_the_chosen_steps_nonfinite_and_the_loop_reads_no_environment(monkeypatch):
    monkeypatch.setenv(NAN_STEPS_ENV, "1,2")  # read only by hooks_from_env, at process start
    t, order = _cpu_trainer()
    assert [t._train_step(step, order, grad_accum=2)[2] for step in range(2)] == [0, 0]
    t, order = _cpu_trainer(TrainHooks(poison_loss=lambda step, rank: step == 2))
    results = [t._train_step(step, order, grad_accum=2) for step in range(3)]
    assert [nonfinite for _, _, nonfinite in results] == [0, 2, 0]  # both micro-batches of step 2
    assert math.isnan(results[1][0]) and math.isfinite(results[2][0])


def test_hooks_from_env_is_the_one_test_seam(monkeypatch):
    assert hooks_from_env({}) == TrainHooks()
    assert hooks_from_env({CRASH_ENV: "sometime:3", NAN_STEPS_ENV: "x"}) == TrainHooks()  # unparsed: no hook
    hooks = hooks_from_env({NAN_STEPS_ENV: "3,4"})
    assert [s for s in range(1, 6) if hooks.poisons(s, rank=0)] == [3, 4]
    assert not hooks.poisons(3, rank=1)  # rank 0 only
    hooks = hooks_from_env({NAN_WEIGHTS_ENV: "8"})
    assert [s for s in range(1, 10) if hooks.poisons_weights(s, rank=0)] == [8] and not hooks.poisons_weights(8, 1)
    assert hooks_from_env({NAN_WEIGHTS_ENV: "8,9"}) == TrainHooks()  # one step, or no hook
    killed = []
    monkeypatch.setattr(hooks_mod.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    for spec, point in (("after-step:5", "after_step"), ("in-checkpoint:4", "in_checkpoint")):
        hooks = hooks_from_env({CRASH_ENV: spec})
        assert getattr(hooks, {"after_step": "in_checkpoint", "in_checkpoint": "after_step"}[point]) is None
        step = int(spec.split(":")[1])
        for s, rank in ((step - 1, 0), (step, 1), (step + 1, 0)):
            getattr(hooks, f"call_{point}")(s, rank)
        assert killed == []
        getattr(hooks, f"call_{point}")(step, 0)
        assert killed == [(os.getpid(), signal.SIGKILL)]
        killed.clear()


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("capability, want", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_uses_bf16_only_where_it_is_native(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # V100 "supports" it, emulated
    assert engine_mod.choose_precision("auto", torch.device("cuda", 0)) == want
    assert engine_mod.choose_precision("auto", torch.device("cpu")) == "fp32"


# ----------------------------------------------------------------------------- the token loss

def test_chunked_loss_equals_plain_cross_entropy_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100
    want = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(want, (hidden, head.weight))
    for chunk in (1, 7, 30, 1000):
        got = token_loss_sum(head, hidden, labels, 50, chunk=chunk)
        ch, cw = torch.autograd.grad(got, (hidden, head.weight))
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ch, gh)
        torch.testing.assert_close(cw, gw)


def test_packed_examples_are_isolated_in_the_engine_loss_module(tiny_model_dir):
    """Two examples packed in one row (position_ids restart, no attention mask, as sft/dataset.py packs):
    the second one's logits and loss equal those of the example run alone."""
    from zhllama.modelio import load_model
    from zhllama.sft.dataset import collate

    model = load_model(tiny_model_dir).eval()
    model.config.use_cache = True  # what a loaded checkpoint says: the loss module must not use a cache
    lm = CausalLMTokenLoss(model)
    a, b = list(range(5, 17)), list(range(100, 109))
    la, lb = [-100] * 3 + a[3:], [-100] * 2 + b[2:]
    packed = collate([{"input_ids": a + b, "labels": la + lb, "position_ids": list(range(12)) + list(range(9))}], 0)
    alone = [collate([{"input_ids": x, "labels": y}], 0) for x, y in ((a, la), (b, lb))]
    with torch.no_grad():
        hidden = lm.hidden_states(packed["input_ids"], position_ids=packed["position_ids"])
        head = model.get_output_embeddings()
        ref = head(lm.hidden_states(alone[1]["input_ids"], attention_mask=alone[1]["attention_mask"]))
        torch.testing.assert_close(head(hidden)[0, 12:], ref[0], atol=1e-5, rtol=0)
        loss_packed = lm(**packed)
        loss_alone = sum(lm(**x) for x in alone)
    assert float(loss_packed) == pytest.approx(float(loss_alone), rel=1e-5)


# ----------------------------------------------------------------------------- checkpoints

class _SavingEngine:
    def __init__(self, rank):
        self.rank = rank

    def save_checkpoint(self, path, tag, client_state, save_latest, exclude_frozen_parameters):
        assert exclude_frozen_parameters
        (checkpoint.Path(path) / tag).mkdir(parents=True, exist_ok=True)
        (checkpoint.Path(path) / tag / f"shard{self.rank}.pt").write_bytes(b"x" * 10)


def test_only_global_rank_zero_finalises_a_checkpoint(tmp_path, monkeypatch):
    """Two nodes on one shared out dir: each has a local rank 0 (global ranks 0 and 1). Only global
    rank 0 writes the state file and renames; the other waits at the barrier."""
    world = 2
    bar = threading.Barrier(world)
    finalisers, errors = [], []
    real_replace = checkpoint.os.replace

    def replace(src, dst):
        if checkpoint.Path(dst).name.startswith("step-") or checkpoint.Path(dst).name == checkpoint.STATE_FILE:
            finalisers.append(threading.current_thread().name)
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)

    def rank_main(rank):
        try:
            for step in (2, 4, 6):
                checkpoint.save(_SavingEngine(rank), tmp_path, step, {"step": step}, rank=rank,
                                barrier=bar.wait, keep_last=2)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
            bar.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank{r}") for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    # The state file and the directory rename (both through os.replace) are rank 0's alone.
    assert finalisers == ["rank0"] * 6, finalisers
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-4", "step-6"]
    for step in (4, 6):
        d = tmp_path / f"step-{step}"
        assert json.loads((d / checkpoint.STATE_FILE).read_text()) == {"step": step}
        assert sorted(p.name for p in (d / "engine").iterdir()) == ["shard0.pt", "shard1.pt"]
        assert sorted(p.name for p in d.glob("rng_rank*.json")) == ["rng_rank0.json", "rng_rank1.json"]


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np
    state = json.loads(json.dumps(checkpoint.rng_state()))
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


@pytest.fixture
def resumable(tmp_path, tiny_model_dir):
    """A config and a checkpoint directory written by it on 1 rank."""
    args = ["stage=stage2", f"model={tiny_model_dir}", f"data=[{tmp_path}]", f"out={tmp_path / 'run'}",
            "global_batch=8", "lr=0.01"]
    cfg = load_config(None, args)
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    fp = checkpoint.model_fingerprint(tiny_model_dir)
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps(checkpoint.run_state(cfg, 2, 1, fp)))
    return args, ckpt, fp


def test_resume_with_changed_settings_is_refused_naming_them(resumable):
    args, ckpt, fp = resumable
    same = load_config(None, args + ["max_steps=50"])  # a longer run is fine
    assert checkpoint.check_resume(ckpt, same, 1, fp)["step"] == 2
    changed = load_config(None, args + ["lr=0.02", "global_batch=16"])
    with pytest.raises(UserError) as e:
        checkpoint.check_resume(ckpt, changed, 1, fp)
    msg = str(e.value)
    assert "lr: 0.01 -> 0.02" in msg and "global_batch: 8 -> 16" in msg and "--allow-config-change" in msg
    assert "\n" not in msg
    assert checkpoint.check_resume(ckpt, changed, 1, fp, allow_config_change=True)["step"] == 2
    with pytest.raises(UserError, match="weights in .* changed"):
        checkpoint.check_resume(ckpt, same, 1, "another-fingerprint")


def test_resume_refusals_come_before_the_model_is_loaded(resumable, monkeypatch):
    """Through Trainer.run: a changed lr stops the run before build_model (so does changed data:
    tests/test_resume.py; another world size is no refusal)."""
    args, ckpt, _ = resumable

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the resume check")

    monkeypatch.setattr(engine_mod, "build_model", no_model)
    monkeypatch.setattr(engine_mod, "init_distributed", lambda: (0, 1, 0))
    with pytest.raises(UserError, match="lr: 0.01 -> 0.02"):
        engine_mod.Trainer(load_config(None, args + ["lr=0.02"])).run()
