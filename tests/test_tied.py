"""Tied embeddings (SmolLM2, LLaMA-3.2): every stage and the merge keep embed_tokens and lm_head one matrix.

Tiny LLaMA-3-shaped models built here (grouped-query attention, rope_theta 500,000, `<|begin_of_text|>`
specials, `tie_word_embeddings: true`, a byte-level BPE tokenizer.json). The rule under test
(pretrain/adapters.py, "tied embeddings"): stage 2 and SFT train the shared matrix via embed_tokens only,
lm_head points at that trainable copy; stage 1 uses PEFT's TrainableTokens, which follows the tie. The
adapters hold one matrix, and `zhllama merge` writes a tied checkpoint (no lm_head tensor) whose logits
are base + adapters.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import adamw_steps

from zhllama.errors import UserError
from zhllama.export.merge import merge_checkpoint
from zhllama.modelio import load_model, load_tokenizer
from zhllama.pretrain.adapters import (WEIGHTS, apply_stage, count_trainable, is_tied, load_adapter,
                                       merge_adapters, save_adapter)
from zhllama.pretrain.presets import STAGES
from zhllama.tiny_bpe import make_byte_level_bpe, make_tiny_llama3

DATA = Path(__file__).resolve().parent.parent / "zhllama" / "data"
ATOL = 1e-4   # fp32 merged vs run-time LoRA (see tests/test_merge.py); a wrong merge differs by >1e-2


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tied")
    lines = (DATA / "en_sample.txt").read_text(encoding="utf-8").splitlines() + \
        (DATA / "zh_sample.txt").read_text(encoding="utf-8").splitlines()
    tok = make_byte_level_bpe(d / "tok", lines, vocab_size=600, style="llama3")
    return make_tiny_llama3(tok, d / "model", hidden_size=32, tie_word_embeddings=True, seed=0)


def _batch(tok, seed=0):
    lines = (DATA / "zh_sample.txt").read_text(encoding="utf-8").splitlines()[seed:seed + 12]
    ids = [tok.encode(t)[:17] for t in lines]
    return torch.tensor([i for i in ids if len(i) == 17][:4])


def _train(model, stage, tok, steps=2, seed=0, **kw):
    model = apply_stage(model, STAGES[stage], **kw)
    x = _batch(tok, seed)
    return adamw_steps(model, x, steps)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


def _keys(adapter_dir):
    with safe_open(str(Path(adapter_dir) / WEIGHTS), framework="pt") as f:
        return set(f.keys())


def test_tiny_model_has_llama3_shapes(tied_dir):
    cfg = json.loads((tied_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert (cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")) == 500000.0
    tok = load_tokenizer(tied_dir)
    assert tok.convert_ids_to_tokens(cfg["bos_token_id"]) == "<|begin_of_text|>"
    assert is_tied(load_model(tied_dir))


@pytest.mark.parametrize("stage", ["stage2", "sft"])
def test_lora_stages_train_one_shared_matrix(tied_dir, stage):
    model = load_model(tied_dir)
    V, H = model.get_input_embeddings().weight.shape
    base_total = sum(p.numel() for p in model.parameters())   # parameters() counts the tied matrix once
    assert base_total == sum(p.numel() for n, p in model.state_dict().items() if n != "lm_head.weight")
    peft_model = apply_stage(model, STAGES[stage])
    base = peft_model.get_base_model()
    emb = base.get_input_embeddings().modules_to_save["default"].weight
    assert base.lm_head.weight is emb and emb.requires_grad
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert not any("lm_head" in n for n in trainable)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    # trainable % on the real structure: one V x H matrix (not two) + LoRA, out of base + LoRA
    assert count_trainable(peft_model) == (V * H + lora, base_total + lora)
    # the loss reaches the one matrix from both ends: its gradient has rows the input never looked up
    x = _batch(load_tokenizer(tied_dir))
    peft_model.train()
    peft_model(input_ids=x, labels=x).loss.backward()
    unseen = sorted(set(range(V)) - set(x.flatten().tolist()))
    assert emb.grad is not None and emb.grad[unseen].abs().sum() > 0


def test_stage1_follows_the_tie(tied_dir):
    model = load_model(tied_dir)
    V, H = model.get_input_embeddings().weight.shape
    base_total = sum(p.numel() for p in model.parameters())
    staged = apply_stage(model, STAGES["stage1"], new_rows_from=V - 100)
    assert count_trainable(staged) == (100 * H, base_total)
    x = torch.tensor([[V - 5, V - 50, 3, 4]])
    with torch.no_grad():
        staged.get_base_model().model.embed_tokens.trainable_tokens_delta["default"].add_(0.5)
        out = staged(input_ids=x, output_hidden_states=True)
    # logits = last hidden state x the updated shared matrix: lm_head sees the trained rows too
    h = out.hidden_states[-1]
    w = load_model(tied_dir).get_input_embeddings().weight.detach().clone()
    w[V - 100:] += 0.5
    assert torch.allclose(out.logits, h @ w.T, atol=1e-5)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tied_dir):
    """stage1 -> stage2 -> sft on the tied model, each trained on the previous ones merged, saved and checked."""
    root = tmp_path_factory.mktemp("tied_chain")
    tok = load_tokenizer(tied_dir)
    dirs = []
    for i, stage in enumerate(("stage1", "stage2", "sft")):
        base = merge_adapters(load_model(tied_dir), dirs)
        assert is_tied(base)
        model = _train(base, stage, tok, seed=i)
        dirs.append(root / stage)
        save_adapter(model, dirs[-1], tokenizer_dir=tied_dir, require_trained=stage != "stage1")
    return dirs


def test_adapters_hold_one_matrix_and_reload(chain, tied_dir):
    s1, s2, sft = chain
    # stage 1: the trained rows; PEFT may also write the tied lm_head's view of them, the same values
    emb_key, head_key = ("base_model.model.model.embed_tokens.trainable_tokens_delta",
                         "base_model.model.lm_head.trainable_tokens_delta")
    assert emb_key in _keys(s1) and _keys(s1) <= {emb_key, head_key}
    if head_key in _keys(s1):
        with safe_open(str(s1 / WEIGHTS), framework="pt") as f:
            assert torch.equal(f.get_tensor(emb_key), f.get_tensor(head_key))
    for d in (s2, sft):
        keys = _keys(d)
        assert "base_model.model.model.embed_tokens.weight" in keys
        assert not any("lm_head" in k for k in keys), sorted(keys)[:5]
        meta = json.loads((d / "zhllama_adapter.json").read_text())
        assert "embed_tokens" in meta["modules"] and "lm_head" not in meta["modules"]
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["modules_to_save"] == ["embed_tokens"]
    # a reloaded adapter is tied again: lm_head reads the adapter's matrix
    base = merge_adapters(load_model(tied_dir), [s1])
    m = load_adapter(base, s2)
    b = m.get_base_model()
    assert b.lm_head.weight is b.get_input_embeddings().modules_to_save["default"].weight


def test_merge_writes_a_tied_checkpoint_equal_to_base_plus_adapters(chain, tied_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    report = merge_checkpoint(tied_dir, chain, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and report["vocab_size"] == cfg["vocab_size"]
    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            names |= set(h.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    tok = load_tokenizer(tied_dir)
    x = _batch(tok, seed=5)
    runtime = load_adapter(merge_adapters(load_model(tied_dir), chain[:2]), chain[2])   # base + s1 + s2, SFT live
    want = _logits(runtime, x)
    got = _logits(merged, x)
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()
    assert (want - _logits(load_model(tied_dir), x)).abs().max() > 1e-2    # the adapters did change something


def test_an_untied_lm_head_adapter_is_refused_on_a_tied_base(tied_dir, tmp_path):
    from zhllama.tiny_bpe import make_tiny_llama3 as make
    untied = make(tied_dir, tmp_path / "untied", hidden_size=32, tie_word_embeddings=False, seed=0)
    tok = load_tokenizer(tied_dir)
    model = _train(load_model(untied), "stage2", tok)
    save_adapter(model, tmp_path / "a", tokenizer_dir=tied_dir)
    assert any("lm_head" in k for k in _keys(tmp_path / "a"))
    with pytest.raises(UserError, match="ties lm_head"):
        load_adapter(load_model(tied_dir), tmp_path / "a")


@pytest.mark.slow
def test_real_stage2_run_on_a_tied_model_keeps_it_tied(tied_dir, tmp_path):
    """`zhllama train stage=stage2` (DeepSpeed ZeRO-2, 1 rank) on the tied model: the engine reports the
    trainable share of the real structure, final/ holds one matrix, and it merges into a tied model."""
    import os
    import subprocess
    import sys

    from zhllama.app.cli import main
    assert main(["data", "pack", "--tokenizer", str(tied_dir), "--input", str(DATA / "zh_sample.txt"),
                 "--block-size", "32", "--out", str(tmp_path / "packed"), "--workers", "1"]) == 0
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "zhllama.app.cli", "train", "stage=stage2", f"model={tied_dir}",
                          f"data=[{tmp_path / 'packed'}]", "init_adapters=[]", "max_steps=2", "global_batch=4",
                          "micro_batch=4", "block_size=32", "lr=0.01", "save_every=100", "eval_every=100",
                          "tensorboard=false", f"out={run}"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads([x for x in res.stdout.splitlines() if x.startswith("{") and "total_steps" in x][-1])
    model = load_model(tied_dir)
    V, H = model.get_input_embeddings().weight.shape
    lora = sum(p.numel() for n, p in apply_stage(load_model(tied_dir), STAGES["stage2"]).named_parameters()
               if ".lora_" in n)
    assert (summary["trainable"], summary["total"]) == (V * H + lora, sum(p.numel() for p in model.parameters()) + lora)
    assert not any("lm_head" in k for k in _keys(run / "final"))
    out = merge_checkpoint(tied_dir, [run / "final"], tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    assert out["vocab_size"] == V
