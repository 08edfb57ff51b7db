"""Numbers that must stay what they are (pretrain/precision.py): the fp32 rotary buffers after
deepspeed.initialize, bf16's NaN check set explicitly, and metrics.jsonl that is JSON."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import subprocess_env
from zhllama.loss import CausalLMTokenLoss
from zhllama.pretrain import precision
from zhllama.pretrain.ds_config import build_ds_config, resolve_ds_config
from zhllama.pretrain.engine import Metrics
from zhllama.tiny import tiny_llama_config


def _tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))


def test_a_module_whose_inv_freq_was_cast_fails_the_fp32_check():
    model = CausalLMTokenLoss(_tiny())
    precision.assert_fp32_buffers(model)  # as built: fp32
    model.to(torch.bfloat16)  # what DeepSpeed < 0.19.2 did to the whole module
    with pytest.raises(precision.PrecisionError) as e:
        precision.assert_fp32_buffers(model)
    msg = str(e.value)
    assert msg.startswith("model.model.rotary_emb.inv_freq is bfloat16 after deepspeed.initialize (2 such buffer(s))")
    assert "deepspeed>=0.19.8" in msg and "\n" not in msg


def test_only_the_named_buffers_are_checked():
    model = _tiny().to(torch.bfloat16)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.float()
    model.model.rotary_emb.original_inv_freq = model.model.rotary_emb.original_inv_freq.float()
    precision.assert_fp32_buffers(model)  # bf16 weights are fine; only the rotary buffers must be fp32


@pytest.mark.parametrize("precision_name, want", [("bf16", True), ("fp32", None)])
def test_the_built_ds_config_sets_bf16_nan_safety(precision_name, want):
    for name in ("zero1", "zero2", "zero2_offload"):
        cfg = build_ds_config(resolve_ds_config(name), global_batch=8, micro_batch=2, grad_accum=4, grad_clip=1.0,
                              precision=precision_name)
        assert cfg["bf16"].get("check_grad_overflow") is want


# Real DeepSpeed on the CPU accelerator, bf16: initialize keeps inv_freq fp32, and a NaN gradient step is
# skipped (weights and Adam state unchanged) with the config zhllama builds; with the check off, the same
# NaN reaches the weights (why it is set explicitly, not left to DeepSpeed's default).
_DS_SCRIPT = r"""
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import torch, deepspeed
from transformers import LlamaForCausalLM
from zhllama.loss import CausalLMTokenLoss
from zhllama.pretrain.ds_config import build_ds_config, resolve_ds_config
from zhllama.pretrain.precision import wrong_dtype_buffers
from zhllama.tiny import tiny_llama_config
from zhllama.pretrain.engine import init_distributed
init_distributed()   # gloo on CPU, and DeepSpeed's /dev/shm all-reduce file unlinked once mapped
out = {}
for check in (True, False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))
    model.to(torch.bfloat16)
    rot = model.model.rotary_emb
    rot.inv_freq, rot.original_inv_freq = rot.inv_freq.float(), rot.original_inv_freq.float()  # as loaded
    cfg = build_ds_config(resolve_ds_config("zero1"), global_batch=1, micro_batch=1, grad_accum=1, grad_clip=1.0,
                          precision="bf16")
    cfg["bf16"]["check_grad_overflow"] = check
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=CausalLMTokenLoss(model), optimizer=opt, config=cfg)
    before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    ids = torch.randint(0, 64, (1, 8))
    loss = engine(input_ids=ids, labels=ids)
    engine.backward(loss * float("nan"))
    engine.step()
    after = {n: p.detach().float() for n, p in engine.module.named_parameters()}
    out[str(check)] = {"wrong_buffers": [n for n, _ in wrong_dtype_buffers(engine.module)],
                       "zero_checks": bool(engine.optimizer.check_grad_overflow),
                       "skipped": engine.skipped_steps,
                       "unchanged": all(torch.equal(before[n], after[n]) for n in before),
                       "finite": all(bool(torch.isfinite(t).all()) for t in after.values())}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_deepspeed_bf16_keeps_inv_freq_fp32_and_skips_a_nan_step():
    from zhllama.hosts import free_port
    res = subprocess.run([sys.executable, "-c", _DS_SCRIPT, str(free_port())], env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    on, off = out["True"], out["False"]
    assert on["wrong_buffers"] == [] and off["wrong_buffers"] == []
    assert on["zero_checks"] and on["skipped"] == 1 and on["unchanged"] and on["finite"]
    assert not off["zero_checks"] and off["skipped"] == 0 and not off["finite"]


def test_metrics_write_null_never_infinity_or_nan(tmp_path):
    metrics = Metrics(tmp_path, enabled=True, tensorboard=False, resume_step=0)
    metrics.write({"step": 1, "loss": None, "grad_norm": float("inf"), "mfu": float("nan"), "lr": 1e-4,
                   "nested": {"x": float("-inf"), "ok": 2.5}})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.jsonl")

    record = json.loads(text, parse_constant=refuse)
    assert record == {"step": 1, "loss": None, "grad_norm": None, "mfu": None, "lr": 1e-4,
                      "nested": {"x": None, "ok": 2.5}}


def test_finite_or_none():
    assert precision.finite_or_none(torch.tensor(2.0)) == 2.0
    assert precision.finite_or_none(float("inf")) is None and precision.finite_or_none(math.nan) is None
    assert precision.finite_or_none("x") is None and precision.finite_or_none(None) is None
