"""Model FLOPs per token and MFU (pretrain/flops.py), worked by hand on a tiny LLaMA.

Tiny config: vocab 32, d 8, 2 layers, 2 heads of 4 (k, v full width), MLP 16, sequence 4.
  per layer: q, o 2 x 8 x 8 = 128; k, v 2 x 8 x 8 = 128; MLP 3 x 8 x 16 = 384  -> 640
  N = 2 x 640 + lm_head 8 x 32 = 1536;  attention 12 x L x d x s = 12 x 2 x 8 x 4 = 768
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from zhllama.pretrain import flops
from zhllama.pretrain.adapters import apply_stage
from zhllama.pretrain.engine import _progress_line
from zhllama.pretrain.presets import STAGES
from zhllama.tiny import tiny_llama_config

N, ATTN, SEQ = 1536, 768, 4


def _tiny():
    return tiny_llama_config(32, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16)


def test_full_training_is_6n_plus_attention():
    assert flops.matmul_params(_tiny()) == N
    assert flops.flops_per_token(_tiny(), SEQ) == 6 * N + ATTN == 9984


def test_stage1_frozen_layers_cost_4n_not_6n():
    """Stage 1 trains only the embedding lookup: forward 2N, backward to the activations 2N, no weight
    gradient of any matmul: 4 x 1536 + 768 = 6912 (the old formula said 9984, 44% too much)."""
    model = apply_stage(LlamaForCausalLM(_tiny()), STAGES["stage1"])
    t, a = flops.trainable_matmul_params(model), flops.adapter_matmul_params(model)
    assert (t, a) == (0, 0)
    assert flops.flops_per_token(_tiny(), SEQ, t, a) == 6912


def test_stage2_counts_lora_and_lm_head_weight_gradients():
    """Stage 2: LoRA r=8 on q, k, v, o: A 8x8 + B 8x8 = 128 per projection, x 4 x 2 layers = 1024 (A);
    trained matmuls T = lm_head 256 + LoRA 1024 = 1280. 4 x (1536 + 1024) + 2 x 1280 + 768 = 13568."""
    assert STAGES["stage2"].lora_r == 8 and set(STAGES["stage2"].lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    model = apply_stage(LlamaForCausalLM(_tiny()), STAGES["stage2"])
    t, a = flops.trainable_matmul_params(model), flops.adapter_matmul_params(model)
    assert (t, a) == (1280, 1024)
    assert flops.flops_per_token(_tiny(), SEQ, t, a) == 13568


def test_mfu_on_cpu_never_reads_above_100_percent():
    """The measured CPU peak is a lower bound: a step faster than it raises it. Peak 100 FLOP/s x 2 ranks;
    10 FLOPs a token. 30 tokens in 1 s = 300 FLOP/s > 200: MFU 1.0 and the peak becomes 300; then 15
    tokens in 1 s = 150 / 300 = 0.5."""
    meter = flops.MFUMeter(10.0, 100.0, world=2, measured=True)
    assert meter(10, 1.0) == pytest.approx(0.5)
    assert meter(30, 1.0) == pytest.approx(1.0)
    assert meter(15, 1.0) == pytest.approx(0.5)


def test_a_datasheet_peak_is_not_raised():
    meter = flops.MFUMeter(10.0, 100.0, world=1, measured=False)
    assert meter(5, 1.0) == pytest.approx(0.5)
    assert meter(20, 1.0) == pytest.approx(2.0)


def test_an_unknown_gpu_has_no_peak_and_no_mfu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery X9")
    peak, basis = flops.peak_flops(torch.device("cuda", 0))
    assert peak is None and "unknown GPU NVIDIA Mystery X9" in basis
    meter = flops.MFUMeter(10.0, peak, world=8, measured=False)
    assert meter(1000, 1.0) is None
    record = {"step": 3, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1000.0, "mfu": None, "step_time_s": 1.0}
    assert "MFU unknown" in _progress_line(record, 10)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.peak_flops(torch.device("cuda", 0)) == (989e12, "datasheet peak of NVIDIA H100 80GB HBM3")


def test_cpu_peak_is_measured_and_labelled():
    peak, basis = flops.peak_flops(torch.device("cpu"))
    assert peak > 0 and basis.startswith("measured CPU matmul peak")
