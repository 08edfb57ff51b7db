"""`zhllama plan`: trainable %, the LLaMA paper's GPU-hours, ZeRO-2 memory, the activation formula."""

import json

import pytest
import torch

from conftest import run_cli
from zhllama.pretrain import flops
from zhllama.pretrain.plan import activation_bytes, activation_profile, plan, recompute_flops_per_token

# LLaMA paper (Touvron et al. 2023): Table 15 GPU-hours on A100-80GB, §2.4 throughput of the 65B run.
LLAMA_7B_GPU_HOURS, LLAMA_7B_TOKENS = 82_432, 1.0e12
LLAMA_65B_GPU_HOURS, LLAMA_65B_TOKENS = 1_022_362, 1.4e12
LLAMA_65B_TOKENS_PER_S = 380
LLAMA_7B_TOKENS_PER_S = 3_300  # ~3,300 tokens/s/GPU for 7B
LLAMA_SEQ, LLAMA_GLOBAL = 2048, 2048  # 4M-token batches of 2048


def implied_mfu(model, tokens_per_s):
    from zhllama.tiny import llama_config
    return tokens_per_s * flops.flops_per_token(llama_config(model), LLAMA_SEQ) / flops.gpu_peak_flops("a100-80g")


def llama_plan(model, tokens, mfu):
    return plan(model=model, stage="full", tokens=tokens, gpus=2048, gpu="a100-80g", mfu=mfu, reserve=0.0,
                seq_len=LLAMA_SEQ, global_batch=LLAMA_GLOBAL)


@pytest.mark.parametrize("stage, pct", [("stage1", "2.97%"), ("stage2", "6.06%"), ("sft", "6.22%")])
def test_cli_prints_the_trainable_percentage_of_llama7b(capsys, stage, pct):
    code = run_cli("plan", "--model", "llama-7b", "--vocab-size", 49953, "--stage", stage, "--tokens", "20e9",
                   "--gpus", 16, "--gpu", "a100-80g")
    out = capsys.readouterr().out
    assert code == 0
    assert f"= {pct}" in out and "GPU-hours" in out and "checkpointing" in out


def test_cli_json(capsys):
    assert run_cli("plan", "--model", "llama-7b", "--vocab-size", 49953, "--stage", "stage2", "--tokens", "20e9",
                   "--gpus", 16, "--gpu", "a100-80g", "--mfu", 0.4, "--reserve", 0.3, "--json") == 0
    p = json.loads(capsys.readouterr().out)
    assert abs(p["trainable_pct"] - 6.06) <= 0.01 and p["vocab_size"] == 49953
    assert p["gpu_hours_with_reserve"] == pytest.approx(1.3 * p["gpu_hours"])
    # 7B at 49,953 rows, s = 512, by hand: N_mm = 32 (4·4096² + 3·4096·11008) + 4096·49953 = 6,680,612,864;
    # LoRA r=8 on q,k,v,o: A = 32 · 4 · (4096·8 + 8·4096) = 8,388,608, trained with lm_head (4096·49953):
    # T_mm = 212,996,096. Model FLOPs 4 (N_mm + A) + 2 T_mm + 12·32·4096·512 = 27,987,304,448 a token
    # (frozen weights: forward and backward to the activations; trained ones also their gradient);
    # 20e9 of them at 0.4 x 312 TFLOP/s = 1,245.87 GPU-hours
    assert p["model_flops_per_token"] == 27_987_304_448
    assert p["gpu_hours"] == pytest.approx(1245.8736, rel=1e-6)
    assert p["days"] == pytest.approx(p["gpu_hours_with_reserve"] / 16 / 24)
    assert p["steps"] == -(-int(20e9) // (1024 * 512))


def test_flops_per_token_of_llama7b_and_65b_by_hand():
    """6 N_mm + 12 L d s with N_mm = L (4 d² + 3 d i) + d V (q, k, v, o; gate, up, down; lm_head), at s = 2048."""
    from zhllama.tiny import llama_config
    n7 = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4096 * 32000
    assert n7 == 6_607_077_376
    assert flops.matmul_params(llama_config("llama-7b")) == n7
    assert flops.flops_per_token(llama_config("llama-7b"), LLAMA_SEQ) == 6 * n7 + 12 * 32 * 4096 * 2048 == 42_863_689_728
    n65 = 80 * (4 * 8192 ** 2 + 3 * 8192 * 22016) + 8192 * 32000
    assert flops.flops_per_token(llama_config("llama-65b"), LLAMA_SEQ) == 6 * n65 + 12 * 80 * 8192 * 2048 \
        == 406_239_313_920


def test_llama7b_gpu_hours_at_the_mfu_its_throughput_implies():
    """The implied MFU from the hand FLOPs above (3,300 x 42.86 GFLOP / 312 TFLOP/s = 45.34%); the GPU-hours
    at a stated MFU of 0.45 by hand: 1e12 x 42,863,689,728 / (0.45 x 312e12) / 3600 = 84,804.7 (paper 82,432)."""
    assert implied_mfu("llama-7b", LLAMA_7B_TOKENS_PER_S) == pytest.approx(0.453366, abs=1e-6)
    hours = llama_plan("llama-7b", LLAMA_7B_TOKENS, 0.45)["gpu_hours"]
    assert hours == pytest.approx(84_804.70, rel=1e-6)
    assert abs(hours / LLAMA_7B_GPU_HOURS - 1) <= 0.15, hours


def test_llama7b_gpu_hours_from_the_65b_runs_mfu():
    """Not circular: the 65B run's stated 380 tokens/s/GPU, carried to 7B through the FLOPs formula."""
    mfu = implied_mfu("llama-65b", LLAMA_65B_TOKENS_PER_S)
    assert mfu == pytest.approx(380 * 406_239_313_920 / 312e12, rel=1e-12)  # 49.48%, from the hand FLOPs above
    hours = llama_plan("llama-7b", LLAMA_7B_TOKENS, mfu)["gpu_hours"]
    assert abs(hours / LLAMA_7B_GPU_HOURS - 1) <= 0.15, hours
    hours65 = llama_plan("llama-65b", LLAMA_65B_TOKENS, implied_mfu("llama-7b", LLAMA_7B_TOKENS_PER_S))["gpu_hours"]
    assert abs(hours65 / LLAMA_65B_GPU_HOURS - 1) <= 0.15, hours65


def test_zero2_memory_terms():
    a = plan(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=8, micro_batch=4)
    b = plan(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=16, micro_batch=4)
    full = plan(model="llama-7b", vocab_size=49953, stage="full", tokens=1e9, gpus=16, micro_batch=4)
    ma, mb, mf = (p["memory"]["with_checkpointing"]["gib"] for p in (a, b, full))
    assert ma["weights"] == mb["weights"]  # replicated under ZeRO-2
    assert ma["optimizer"] == pytest.approx(2 * mb["optimizer"])  # partitioned
    assert mb["optimizer"] == pytest.approx(16 * b["trainable_params"] / 16 / 2 ** 30)
    # PEFT keeps frozen copies of embed_tokens and lm_head: stage2 holds more weights than full training
    assert mb["weights"] > mf["weights"] == pytest.approx(2 * full["total_params"] / 2 ** 30, rel=1e-4)
    assert mf["optimizer"] > 10 * mb["optimizer"]
    for p in (a, b, full):
        assert p["memory"]["with_checkpointing"]["gib"]["activations"] < \
            p["memory"]["without_checkpointing"]["gib"]["activations"]


def test_micro_batch_choice_and_errors(capsys):
    p = plan(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=16, gpu="a100-40g")
    # Without checkpointing: with it, the chunked loss lets even the largest valid micro batch (64) fit.
    m = p["memory"]["without_checkpointing"]
    assert m["fits"] and m["total_gib"] <= 0.9 * 40
    assert 1024 % (m["micro_batch"] * 16) == 0 and m["grad_accumulation"] * m["micro_batch"] * 16 == 1024
    bigger = plan(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=16, gpu="a100-40g",
                  micro_batch=2 * m["micro_batch"])
    assert not bigger["memory"]["without_checkpointing"]["fits"]
    code = run_cli("plan", "--model", "llama-7b", "--stage", "stage2", "--tokens", "1e9", "--gpus", 16,
                   "--micro-batch", 3)
    err = capsys.readouterr().err
    assert code == 2 and "micro_batch 3 x world_size 16" in err and "1, 2, 4, 8, 16, 32, 64" in err
    assert run_cli("plan", "--tokens", "1e9", "--gpus", 8, "--gpu", "tpu-v9") == 2
    assert "unknown GPU 'tpu-v9'" in capsys.readouterr().err
    assert run_cli("plan", "--model", "no/such/config.json", "--tokens", "1e9", "--gpus", 8) == 2
    assert "no/such/config.json" in capsys.readouterr().err


def test_executed_flops_are_model_flops_plus_the_recomputed_layers():
    from zhllama.tiny import llama_config
    cfg = llama_config("llama-7b")
    p = plan(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=16, micro_batch=8)
    executed = p["executed_flops_per_token"]
    assert executed["without_checkpointing"] == p["model_flops_per_token"]
    # checkpointing recomputes the 32 layers' forward: 2 x 6.48e9 layer matmul parameters + 4 L d s
    layers_mm = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert executed["with_checkpointing"] - executed["without_checkpointing"] == pytest.approx(
        2 * layers_mm + 4 * 32 * 4096 * 512) == recompute_flops_per_token(cfg, 512, True)


def test_plan_from_an_hf_config_matches_a_real_model(tmp_path):
    """The meta-device count equals the count on a real, materialised model with the same stage."""
    from transformers import LlamaForCausalLM

    from zhllama.pretrain.adapters import apply_stage, count_trainable
    from zhllama.pretrain.presets import STAGES
    from zhllama.tiny import tiny_llama_config
    cfg = tiny_llama_config(256, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    cfg.to_json_file(str(tmp_path / "config.json"))
    p = plan(model=str(tmp_path), vocab_size=300, stage="sft", tokens=1e6, gpus=1, gpu="4090")
    real = LlamaForCausalLM(cfg)
    real.resize_token_embeddings(300, mean_resizing=False)
    assert (p["trainable_params"], p["total_params"]) == count_trainable(apply_stage(real, STAGES["sft"]))
    assert p["vocab_size"] == 300 and plan(model="tiny", stage="stage1", tokens=1e6, gpus=1)["trainable_params"] > 0


@pytest.mark.parametrize("stage", ["full", "stage1", "stage2", "sft"])
def test_activation_formula_against_what_autograd_saves(stage):
    """`activation_bytes(...)['saved']` within 15% of the bytes autograd really keeps for the backward."""
    from transformers import LlamaForCausalLM

    from zhllama.pretrain.adapters import apply_stage
    from zhllama.pretrain.presets import STAGES
    from zhllama.tiny import tiny_llama_config
    cfg = tiny_llama_config(1000, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=352)
    torch.manual_seed(0)
    for checkpointing in (False, True):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        if stage == "full":
            model.requires_grad_(True)
        else:
            model = apply_stage(model, STAGES[stage]).to(torch.bfloat16)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        saved = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in weights:
                saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
            return t

        x = torch.randint(0, 1000, (2, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, labels=x)
        want = activation_bytes(cfg, x.numel(), checkpointing, activation_profile(model, stage == "full"))["saved"]
        got = sum(saved.values())
        assert abs(want / got - 1) <= 0.15, (stage, checkpointing, got, want)


@pytest.mark.parametrize("seq", [200, 2048])  # one chunk; several chunks recomputed in the backward
def test_loss_memory_term_matches_the_engine_loss_measured_peak(seq):
    """The plan's loss term (`loss_bytes`) within 15% of the peak the engine's token loss really takes
    at the merged 7B vocabulary (49,953), measured by bench/loss_memory.py in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "loss_memory.py"
    res = subprocess.run([sys.executable, str(bench), "--loss-only", "--hidden", "64", "--seq", str(seq)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout[:res.stdout.rindex("}") + 1])
    assert abs(out["ratio_predicted_over_measured"] - 1) <= 0.15, out
    # and the whole micro batch's logits are never held: the peak is far below 14 bytes x V x tokens
    if seq == 2048:
        assert out["measured_bytes"] < 0.3 * 14 * 49953 * seq


def test_long_context_7b_activations_hand_worked(capsys):
    """stage2 of 7B (h 4096, i 11008, 32 layers, LoRA r 8 with dropout on q,k,v,o) at 16,384 tokens with
    gradient checkpointing, worked out by hand:
      saved    16384 x (32 layers x 2h + head 6h) = 16384 x (262,144 + 24,576)             = 4,697,620,480
      a layer's backward: its recomputed activations 16h + 6i = 65,536 + 66,048 = 131,584, LoRA
               4 x (3 x 4096 + 2 x 8) = 49,216, and the MLP's gradients 8i = 88,064: 268,864 x 16384
                                                                                          = 4,405,067,776
      which is more than the loss (17.5 x 49,953 x 335 = 292,849,462): peak              = 9,102,688,256"""
    p = plan(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=16, micro_batch=1,
             seq_len=16384, global_batch=32)
    assert p["memory"]["with_checkpointing"]["gib"]["activations"] * 2 ** 30 == pytest.approx(9_102_688_256)
    # time per sequence: 16384 tokens x model FLOPs / (MFU x 312 TFLOP/s)
    assert p["seconds_per_sequence"] == pytest.approx(16384 * p["model_flops_per_token"] / (0.4 * 312e12))
    assert p["seconds_per_step"] == pytest.approx(2 * p["seconds_per_sequence"])     # 32 sequences on 16 GPUs
    assert p["long_context"]["needs_sequence_parallelism"] is False
    assert run_cli("plan", "--model", "llama-7b", "--vocab-size", 49953, "--tokens", "1e9", "--gpus", 16,
                   "--block-size", 131072, "--global-batch", 16, "--micro-batch", 1) == 0
    out = capsys.readouterr().out
    assert "tokens of 131072" in out and "131,072 needs sequence parallelism" in out


def test_longest_sequence_agrees_with_the_memory_table():
    """The bisection's longest sequence for one GPU fits by the plan's own table, and 1,024 more do not."""
    kw = dict(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=16, micro_batch=1, global_batch=16)
    longest = plan(seq_len=16384, **kw)["long_context"]["longest_sequence_one_gpu"]
    assert 65536 < longest < 131072
    assert plan(seq_len=longest, **kw)["memory"]["with_checkpointing"]["fits"]
    assert not plan(seq_len=longest + 1024, **kw)["memory"]["with_checkpointing"]["fits"]
