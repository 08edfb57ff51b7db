"""Stage presets (docs/training.md, Stage presets) and the gradient-accumulation rule."""

import dataclasses

import pytest

from zhllama.errors import ConfigError
from zhllama.pretrain.presets import STAGES, get_stage, grad_accumulation


def test_presets_follow_the_design_table():
    s1, s2, sft = STAGES["stage1"], STAGES["stage2"], STAGES["sft"]
    assert not s1.uses_lora and s1.trains_embeddings and not s1.trains_lm_head
    assert (s1.lr, s1.global_batch, s1.block_size) == (2e-4, 1024, 512)
    assert (s2.lora_r, s2.lora_alpha, s2.lora_dropout) == (8, 32, 0.05)
    assert set(s2.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert s2.modules_to_save == ("embed_tokens", "lm_head")
    assert (s2.lr, s2.global_batch, s2.block_size) == (1e-4, 1024, 512)
    assert set(sft.lora_targets) == set(s2.lora_targets) | {"gate_proj", "up_proj", "down_proj"}
    assert (sft.lr, sft.global_batch, sft.block_size) == (1e-4, 512, 512)
    for p in STAGES.values():
        assert (p.warmup_ratio, p.schedule, p.betas, p.weight_decay, p.grad_clip) == (
            0.05, "cosine", (0.9, 0.95), 0.0, 1.0)


def test_presets_are_frozen_and_overrides_are_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        STAGES["stage2"].lr = 1.0
    assert STAGES["stage2"].with_overrides(lora_r=16).lora_r == 16
    assert STAGES["stage2"].lora_r == 8
    with pytest.raises(ConfigError, match="lora_rank"):
        STAGES["stage2"].with_overrides(lora_rank=16)
    with pytest.raises(ConfigError, match="stage1, stage2, sft"):
        get_stage("stage3")


@pytest.mark.parametrize("global_batch, micro, world, want", [
    (1024, 8, 16, 8), (1024, 64, 16, 1), (512, 4, 8, 16), (1024, 1, 1, 1024)])
def test_grad_accumulation(global_batch, micro, world, want):
    assert grad_accumulation(global_batch, micro, world) == want
    assert micro * world * want == global_batch


def test_impossible_batch_is_an_error_naming_the_numbers_and_valid_choices():
    with pytest.raises(ConfigError) as e:
        grad_accumulation(1024, 3, 16)
    msg = str(e.value)
    assert "1024" in msg and "micro_batch 3" in msg and "world_size 16" in msg
    assert "1, 2, 4, 8, 16, 32, 64" in msg  # the divisors of 1024 / 16
    with pytest.raises(ConfigError, match="world size"):
        grad_accumulation(1024, 1, 3)
    for bad in ((0, 1, 1), (1024, 0, 8), (1024, 8, -1), (1024, 2.0, 8)):
        with pytest.raises(ConfigError, match="positive integer"):
            grad_accumulation(*bad)
