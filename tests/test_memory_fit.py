"""`gradient_checkpointing: auto` decides from `zhllama plan`'s figures, and the ZeRO-1/ZeRO-2 figures."""

import json

import pytest
import torch

from conftest import run_cli
from zhllama.pretrain import memory_fit
from zhllama.pretrain.config import load_config
from zhllama.pretrain.ds_config import resolve_ds_config, stage_ds_config
from zhllama.pretrain.plan import plan


def _run_config(tiny_model_dir, tiny_packed, *extra):
    return load_config(None, ["stage=stage2", f"model={tiny_model_dir}", f"data=[{tiny_packed}]", "out=unused",
                              "global_batch=8", "micro_batch=4", "block_size=32", *extra])


@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory):
    """A LLaMA-7B config.json with the merged vocabulary (the planner builds it on the meta device)."""
    from zhllama.tiny import llama_config
    d = tmp_path_factory.mktemp("llama7b")
    llama_config("llama-7b", 49953).to_json_file(str(d / "config.json"))
    return d


@pytest.mark.parametrize("margin_gib, want_on", [(+0.5, False), (-0.5, True)])
def test_auto_turns_checkpointing_on_exactly_when_the_plan_does_not_fit(capsys, monkeypatch, llama7b_dir, margin_gib,
                                                                       want_on):
    """Stage 2 of 7B, 16 GPUs, micro batch 8: the figures come from `zhllama plan --json` (the user's view);
    a stand-in GPU of (figure without checkpointing / 0.9) +- 0.5 GiB must turn it off / on. The run
    config is read as on a machine where 7B fits (load_config refuses a run whose weights do not fit this
    one's free memory: pretrain/budget.py)."""
    monkeypatch.setattr("zhllama.pretrain.budget.available_memory", lambda: 1 << 40)
    assert run_cli("plan", "--model", llama7b_dir, "--stage", "stage2", "--tokens", "1e6", "--gpus", 16,
                   "--micro-batch", 8, "--json") == 0
    figures = json.loads(capsys.readouterr().out)["memory"]
    without, with_ = figures["without_checkpointing"]["total_gib"], figures["with_checkpointing"]["total_gib"]
    assert with_ < without - 15  # activations: 22 GiB without checkpointing, 2 with
    gpu_gib = without / 0.9 + margin_gib  # the plan's rule: fits when at most 90% of the GPU
    cfg = load_config(None, ["stage=stage2", f"model={llama7b_dir}", "data=[unused]", "out=unused", "micro_batch=8"])
    assert cfg.gradient_checkpointing == "auto"  # the default
    on, why = memory_fit.decide_gradient_checkpointing(
        cfg.gradient_checkpointing, cfg=cfg, preset=cfg.preset(), world=16, device=torch.device("cuda", 0),
        ds_path=resolve_ds_config(stage_ds_config(cfg.stage, cfg.ds_config)), gpu_gib=gpu_gib)
    assert on is want_on
    assert f"plan {without:.1f} GiB per GPU without it, {with_:.1f} GiB with it" in why
    assert f"90% of this GPU's {gpu_gib:.1f} GiB is {0.9 * gpu_gib:.1f} GiB" in why
    assert why.startswith("auto, does not fit without it" if want_on else "auto, fits without it")


def test_auto_is_off_on_cpu_and_an_explicit_setting_wins(tiny_model_dir, tiny_packed):
    cfg = _run_config(tiny_model_dir, tiny_packed)
    kw = dict(cfg=cfg, preset=cfg.preset(), world=1, ds_path=resolve_ds_config("zero1"))
    assert memory_fit.decide_gradient_checkpointing("auto", device=torch.device("cpu"), **kw) == \
        (False, "auto, CPU ranks (no device memory to save)")
    assert memory_fit.decide_gradient_checkpointing(True, device=torch.device("cpu"), **kw) == (True, "set in the config")
    assert memory_fit.decide_gradient_checkpointing(False, device=torch.device("cuda", 0), gpu_gib=1.0, **kw) == \
        (False, "set in the config")


@pytest.mark.parametrize("value, want", [("auto", "auto"), ("true", True), ("off", False), (True, True)])
def test_the_config_key_takes_true_false_or_auto(tiny_model_dir, tiny_packed, value, want):
    cfg = _run_config(tiny_model_dir, tiny_packed, f"gradient_checkpointing={value}")
    assert cfg.gradient_checkpointing == want


def test_a_bad_value_names_the_key(tiny_model_dir, tiny_packed):
    from zhllama.errors import ConfigError
    with pytest.raises(ConfigError, match="key 'gradient_checkpointing' must be true, false or auto, got 'sometimes'"):
        _run_config(tiny_model_dir, tiny_packed, "gradient_checkpointing=sometimes")


def test_zero1_and_zero2_traffic_and_memory_worked_by_hand():
    """LLaMA-7B stage 2, 49,953 rows: T = 417,603,584 trainable. 16 GPUs, micro 8: accumulation
    1024 / (8 x 16) = 8. One ring pass of the bf16 gradients sends 2 T x 15/16 = 783,006,720 bytes per
    GPU. ZeRO-2: 8 reduce-scatters + 1 all-gather = 9 x that = 7,047,060,480 bytes; ZeRO-1: 2 x that =
    1,566,013,440; ZeRO-1 keeps 2 T - 2 T / 16 = 783,006,720 bytes more gradient memory per GPU."""
    z1 = plan(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=16, micro_batch=8,
              ds_config="zero1")
    z2 = plan(model="llama-7b", vocab_size=49953, stage="stage2", tokens=1e9, gpus=16, micro_batch=8)
    assert z1["trainable_params"] == 417_603_584 and z1["zero_stage"] == 1 and z2["zero_stage"] == 2
    c = z1["memory"]["without_checkpointing"]["communication"]
    assert c == {"grad_accumulation": 8, "zero2_bytes": 7_047_060_480, "zero1_bytes": 1_566_013_440,
                 "zero1_extra_memory_bytes": 783_006_720}
    g1 = z1["memory"]["without_checkpointing"]["gib"]["gradients"]
    g2 = z2["memory"]["without_checkpointing"]["gib"]["gradients"]
    assert (g1 - g2) * 2 ** 30 == pytest.approx(783_006_720)
    assert z1["memory"]["without_checkpointing"]["total_gib"] - z2["memory"]["without_checkpointing"]["total_gib"] \
        == pytest.approx(783_006_720 / 2 ** 30)


def test_every_stage_defaults_to_zero2_and_zero1_is_shipped():
    assert [stage_ds_config(s) for s in ("stage1", "stage2", "sft", "full")] == ["zero2", "zero2", "zero2", "zero2"]
    assert stage_ds_config("stage2", "zero2_offload") == "zero2_offload"
    assert json.loads(resolve_ds_config("zero1").read_text())["zero_optimization"]["stage"] == 1
