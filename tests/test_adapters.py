"""The PEFT setup of each stage, the adapter files, and the errors for bad adapters (docs/training.md: Stages, Run directory)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from zhllama.errors import ConfigError, UserError
from zhllama.pretrain.adapters import (META, WEIGHTS, apply_stage, count_trainable, load_adapter, merge_adapters,
                                       save_adapter)
from zhllama.pretrain.presets import STAGES

VOCAB, BASE_VOCAB, HIDDEN, LAYERS, INTER = 300, 250, 32, 2, 64


def tiny_config(vocab=VOCAB, hidden=HIDDEN, inter=INTER):
    from zhllama.tiny import tiny_llama_config
    return tiny_llama_config(vocab, hidden_size=hidden, num_layers=LAYERS, num_heads=4, intermediate_size=inter,
                             max_position_embeddings=64)


def base_model(vocab=VOCAB, hidden=HIDDEN, inter=INTER, seed=0):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab, hidden, inter)).eval()


def train_steps(model, steps=3, lr=1e-2, seed=1):
    """A few real AdamW steps with the stage's betas and weight decay."""
    preset = STAGES[model.zhllama_stage]
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=preset.betas, weight_decay=preset.weight_decay)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, 16), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, preset.grad_clip)
        opt.step()
        opt.zero_grad()
    return model.eval()


def logits(model):
    x = torch.arange(0, VOCAB, 7).reshape(1, -1)[:, :40]
    with torch.no_grad():
        return model(input_ids=x).logits


# --------------------------------------------------------------------------------------- 7B on the meta device

@pytest.fixture(scope="module")
def llama7b_config():
    from zhllama.tiny import llama_config
    return llama_config("llama-7b")  # vocab 32000, resized below as `zhllama vocab resize` does


@pytest.mark.parametrize("stage, pct", [("stage1", 2.97), ("stage2", 6.06), ("sft", 6.22)])
def test_trainable_percentages_of_llama7b_with_merged_vocab(llama7b_config, stage, pct):
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(llama7b_config)
    model.resize_token_embeddings(49953, mean_resizing=False)
    trainable, total = count_trainable(apply_stage(model, STAGES[stage]))
    assert abs(100.0 * trainable / total - pct) <= 0.01, (trainable, total)


# ------------------------------------------------------------------------------------------- stage structure

def test_stage2_and_sft_train_exactly_lora_embeddings_and_lm_head():
    for stage, targets in (("stage2", 4), ("sft", 7)):
        model = apply_stage(base_model(), STAGES[stage])
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        lora = [n for n in names if ".lora_" in n]
        assert len(lora) == 2 * targets * LAYERS
        assert sorted(n for n in names if n not in lora) == [
            "base_model.model.lm_head.modules_to_save.default.weight",
            "base_model.model.model.embed_tokens.modules_to_save.default.weight"]
        r = STAGES[stage].lora_r
        lora_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        per_layer = 4 * r * 2 * HIDDEN + (3 * r * (HIDDEN + INTER) if targets == 7 else 0)
        assert lora_params == LAYERS * per_layer
        trainable, total = count_trainable(model)
        assert trainable == lora_params + 2 * VOCAB * HIDDEN
        assert total == sum(p.numel() for p in base_model().parameters()) + lora_params


def test_stage1_trains_embedding_rows_only():
    model = apply_stage(base_model(), STAGES["stage1"])
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad] == [
        ("base_model.model.model.embed_tokens.trainable_tokens_delta.default", (VOCAB, HIDDEN))]
    new_rows = apply_stage(base_model(), STAGES["stage1"], new_rows_from=BASE_VOCAB)
    assert count_trainable(new_rows) == ((VOCAB - BASE_VOCAB) * HIDDEN, count_trainable(model)[1])


def test_stage_options_are_checked():
    with pytest.raises(ConfigError, match="stage1 option"):
        apply_stage(base_model(), STAGES["stage2"], new_rows_from=BASE_VOCAB)
    with pytest.raises(ConfigError, match="new_rows_from"):
        apply_stage(base_model(), STAGES["stage1"], new_rows_from=VOCAB)
    with pytest.raises(UserError, match="merge"):
        apply_stage(apply_stage(base_model(), STAGES["stage2"]), STAGES["sft"])


def test_new_rows_only_keeps_old_rows_bit_identical_after_adamw_steps(tmp_path):
    base = base_model()
    before = base.model.embed_tokens.weight.detach().clone()
    model = train_steps(apply_stage(base, STAGES["stage1"], new_rows_from=BASE_VOCAB), steps=4)
    effective = model.base_model.model.model.embed_tokens.get_merged_weights(["default"])
    assert torch.equal(effective[:BASE_VOCAB], before[:BASE_VOCAB])
    assert not torch.equal(effective[BASE_VOCAB:], before[BASE_VOCAB:])
    save_adapter(model, tmp_path / "a")
    merged = merge_adapters(base_model(), [tmp_path / "a"])
    w = merged.model.embed_tokens.weight
    assert torch.equal(w[:BASE_VOCAB], before[:BASE_VOCAB])
    assert torch.equal(w[BASE_VOCAB:], effective[BASE_VOCAB:].detach())
    assert torch.equal(merged.lm_head.weight, base_model().lm_head.weight)


DS_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    sys.path.insert(0, sys.argv[2])
    from test_adapters import base_model, BASE_VOCAB, VOCAB
    from zhllama.pretrain.adapters import apply_stage
    from zhllama.pretrain.presets import STAGES
    base = base_model(); before = base.model.embed_tokens.weight.detach().clone()
    model = apply_stage(base, STAGES["stage1"], new_rows_from=BASE_VOCAB)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params, config=cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, VOCAB, (2, 16), generator=g)
        engine.backward(engine(input_ids=x, labels=x).loss); engine.step()
    w = engine.module.base_model.model.model.embed_tokens.get_merged_weights(["default"])
    print("OLD_IDENTICAL", torch.equal(w[:BASE_VOCAB], before[:BASE_VOCAB]))
    print("NEW_CHANGED", not torch.equal(w[BASE_VOCAB:], before[BASE_VOCAB:]))
""")


@pytest.mark.slow
def test_new_rows_only_under_deepspeed_zero2(tmp_path):
    """The same invariant through DeepSpeed's ZeRO-2 optimizer wrapper (one CPU rank, own process)."""
    script = tmp_path / "ds_stage1.py"
    script.write_text(DS_SCRIPT)
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    port = str(29500 + os.getpid() % 1000)
    out = subprocess.run([sys.executable, str(script), port, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OLD_IDENTICAL True" in out.stdout and "NEW_CHANGED True" in out.stdout, out.stdout


# ----------------------------------------------------------------------------------------- save / load

@pytest.fixture
def tokenizer_dir(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    (d / "not_a_tokenizer.bin").write_bytes(b"x")
    return d


@pytest.mark.parametrize("stage", ["stage1", "stage2", "sft"])
def test_adapter_round_trip(tmp_path, tokenizer_dir, stage):
    model = train_steps(apply_stage(base_model(), STAGES[stage]))
    out = tmp_path / "final"
    meta = save_adapter(model, out, tokenizer_dir=tokenizer_dir, run_config={"stage": stage, "lr": 1e-4},
                        base_model="models/llama-7b-zh", require_trained=True)
    names = sorted(p.name for p in out.iterdir())
    assert {"adapter_config.json", WEIGHTS, META, "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert "not_a_tokenizer.bin" not in names and not [n for n in os.listdir(tmp_path) if n.startswith(".final")]
    on_disk = json.loads((out / META).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["stage"] == stage and on_disk["vocab_size"] == VOCAB and on_disk["run_config"]["lr"] == 1e-4
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/llama-7b-zh"
    from zhllama.fsutil import sha256_file
    for name, rec in on_disk["files"].items():
        assert rec == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    if stage == "stage1":
        assert on_disk["modules"]["trainable_tokens"]["shape"] == [VOCAB, HIDDEN]
    else:
        assert on_disk["modules"]["embed_tokens"]["shape"] == on_disk["modules"]["lm_head"]["shape"] == [VOCAB, HIDDEN]
        n_targets = len(STAGES[stage].lora_targets)
        assert on_disk["modules"]["lora"]["tensors"] == 2 * n_targets * LAYERS

    loaded = load_adapter(base_model(), out)
    assert loaded.zhllama_stage == stage
    assert torch.equal(logits(loaded), logits(model))
    assert not torch.allclose(logits(base_model()), logits(model))  # training changed something
    merged = merge_adapters(base_model(), [out])
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)


def test_stage_chain_stage1_then_stage2(tmp_path):
    """stage2 starts from base + stage1 merged; its adapter loads onto that same merged base."""
    s1 = train_steps(apply_stage(base_model(), STAGES["stage1"], new_rows_from=BASE_VOCAB))
    save_adapter(s1, tmp_path / "s1")
    s2 = train_steps(apply_stage(merge_adapters(base_model(), [tmp_path / "s1"]), STAGES["stage2"]), seed=2)
    save_adapter(s2, tmp_path / "s2")
    again = load_adapter(merge_adapters(base_model(), [tmp_path / "s1"]), tmp_path / "s2")
    assert torch.equal(logits(again), logits(s2))


def test_save_refuses_an_empty_adapter(tmp_path, monkeypatch):
    """The anchors shipped 443-byte adapters: PEFT wrote an empty state dict and nobody checked."""
    import peft.peft_model
    model = apply_stage(base_model(), STAGES["stage2"])
    monkeypatch.setattr(peft.peft_model, "get_peft_model_state_dict", lambda *a, **k: {})
    with pytest.raises(RuntimeError, match="expected tensor"):
        save_adapter(model, tmp_path / "final")
    assert not (tmp_path / "final").exists()


def test_save_refuses_wrong_tensors(tmp_path, monkeypatch):
    import peft.peft_model
    from peft import get_peft_model_state_dict as real
    model = apply_stage(base_model(), STAGES["sft"])

    def drop_one_layer(*a, **k):
        return {key: v for key, v in real(*a, **k).items() if "layers.1.mlp.down_proj" not in key}

    def zero_embeddings(*a, **k):
        return {key: (torch.zeros_like(v) if "embed_tokens" in key else v) for key, v in real(*a, **k).items()}

    def stale(*a, **k):
        return {key: (v + 1 if "lm_head" in key else v) for key, v in real(*a, **k).items()}

    for fake, msg in ((drop_one_layer, "missing"), (zero_embeddings, "differs|all zeros"), (stale, "differs")):
        monkeypatch.setattr(peft.peft_model, "get_peft_model_state_dict", fake)
        with pytest.raises(RuntimeError, match=msg):
            save_adapter(model, tmp_path / "final")
        assert not (tmp_path / "final").exists()


def test_require_trained_rejects_an_untrained_lora(tmp_path):
    model = apply_stage(base_model(), STAGES["stage2"])  # LoRA B is zero until the first step
    with pytest.raises(RuntimeError, match="lora_B.*all zeros"):
        save_adapter(model, tmp_path / "a", require_trained=True)
    save_adapter(model, tmp_path / "b")  # a step-0 adapter is legitimate otherwise
    with pytest.raises(UserError, match="output exists"):
        save_adapter(model, tmp_path / "b")
    save_adapter(model, tmp_path / "b", overwrite=True)


def test_save_needs_a_staged_model_and_a_real_tokenizer(tmp_path):
    with pytest.raises(UserError, match="apply_stage"):
        save_adapter(base_model(), tmp_path / "a")
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        save_adapter(apply_stage(base_model(), STAGES["stage2"]), tmp_path / "a", tokenizer_dir=tmp_path / "empty_tok")


# ------------------------------------------------------------------------------------------ load errors

@pytest.fixture(scope="module")
def saved_stage2(tmp_path_factory):
    out = tmp_path_factory.mktemp("s2") / "final"
    save_adapter(train_steps(apply_stage(base_model(), STAGES["stage2"])), out)
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_load_errors_for_missing_and_empty_files(tmp_path, saved_stage2):
    with pytest.raises(UserError, match="adapter directory not found"):
        load_adapter(base_model(), tmp_path / "nope")
    d = _copy(saved_stage2, tmp_path / "no_config")
    (d / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        load_adapter(base_model(), d)
    d = _copy(saved_stage2, tmp_path / "no_weights")
    (d / WEIGHTS).unlink()
    with pytest.raises(UserError, match=f"{WEIGHTS}: adapter weights are missing"):
        load_adapter(base_model(), d)
    d = _copy(saved_stage2, tmp_path / "empty")
    (d / WEIGHTS).write_bytes(b"")
    with pytest.raises(UserError, match=r"empty file \(0 bytes\)"):
        load_adapter(base_model(), d)
    from safetensors.torch import save_file
    d = _copy(saved_stage2, tmp_path / "no_tensors")
    (d / META).unlink()
    save_file({}, str(d / WEIGHTS))
    with pytest.raises(UserError, match="holds no tensors"):
        load_adapter(base_model(), d)


def test_load_errors_for_truncated_files(tmp_path, saved_stage2):
    d = _copy(saved_stage2, tmp_path / "cut")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{WEIGHTS}: truncated or replaced: {len(data) // 2:,} bytes"):
        load_adapter(base_model(), d)
    (d / META).unlink()  # without our metadata the safetensors header still gives it away
    with pytest.raises(UserError, match="unreadable or truncated safetensors"):
        load_adapter(base_model(), d)
    d = _copy(saved_stage2, tmp_path / "flipped")
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (d / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_adapter(base_model(), d)


def test_load_error_for_an_adapter_of_another_base(tmp_path, saved_stage2):
    with pytest.raises(UserError) as e:
        load_adapter(base_model(vocab=BASE_VOCAB), saved_stage2)  # not resized to the merged vocab
    msg = str(e.value)
    assert WEIGHTS in msg and f"({VOCAB}, {HIDDEN})" in msg and f"({BASE_VOCAB}, {HIDDEN})" in msg
    with pytest.raises(UserError, match=rf"lm_head.weight has shape \({VOCAB}, {HIDDEN}\) .* is \({VOCAB}, 48\)"):
        load_adapter(base_model(hidden=48), saved_stage2)
    save_adapter(apply_stage(base_model(), STAGES["sft"]), tmp_path / "sft")
    with pytest.raises(UserError, match=rf"down_proj.lora_A.weight has shape \(8, {INTER}\) but "
                                        rf"model.layers.0.mlp.down_proj of the base model is \({HIDDEN}, 80\)"):
        load_adapter(base_model(inter=80), tmp_path / "sft")


def test_load_error_for_stage1_rows_beyond_the_base_vocab(tmp_path):
    save_adapter(train_steps(apply_stage(base_model(), STAGES["stage1"], new_rows_from=BASE_VOCAB)), tmp_path / "a")
    with pytest.raises(UserError, match=f"rows {BASE_VOCAB}..{VOCAB - 1}.*is \\(280, {HIDDEN}\\)"):
        load_adapter(base_model(vocab=280), tmp_path / "a")
