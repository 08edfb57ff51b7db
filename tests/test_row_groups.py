"""Per-row learning rates of the vocabulary (pretrain/row_groups.py): the base's own rows and the rows the
merge added as separate optimizer groups.

Fast, in-process:
* the split embedding and head compute what the whole matrix computes, value and gradient;
* every stage, tied and untied, has the groups counted by hand (base rows, new rows, LoRA), the same
  totals as without the split, and the optimizer groups carry lr x their multiple;
* `zhllama plan` counts each group.

Slow, the real engine (DeepSpeed ZeRO-2, one CPU rank), tied and untied, stage 1, stage 2 and SFT:
* `embed_lr_base: 0` leaves the base rows of embed_tokens (and of an untied lm_head) bit-identical;
* with 0.1 they move less than with 1.0; the new rows move in every run;
* `zhllama merge` writes one matrix holding the trained rows, and a tied model stays tied.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import SAMPLES, run_cli, subprocess_env
from zhllama.modelio import BASE_VOCAB_KEY, load_model
from zhllama.pretrain.adapters import apply_stage, count_trainable, merge_adapters
from zhllama.pretrain.presets import STAGES
from zhllama.pretrain.row_groups import RowSplitEmbedding, RowSplitHead, param_groups, trainable_groups

V, B, H, LAYERS, INTER = 300, 250, 32, 2, 64


def base_model(tied=False, seed=0):
    from transformers import LlamaForCausalLM

    from zhllama.tiny import tiny_llama_config
    torch.manual_seed(seed)
    cfg = tiny_llama_config(V, hidden_size=H, num_layers=LAYERS, num_heads=4, intermediate_size=INTER,
                            max_position_embeddings=64)
    cfg.tie_word_embeddings = tied
    model = LlamaForCausalLM(cfg)
    if tied:
        model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------------------------- the modules

def test_split_modules_compute_what_the_whole_matrix_computes():
    torch.manual_seed(0)
    w = torch.randn(V, H)
    ids = torch.tensor([[0, 3, B - 1, B, B + 7, V - 1, 5, B]])
    emb = RowSplitEmbedding(w, B, padding_idx=3)
    head = RowSplitHead(emb.base_rows, emb.new_rows)
    hidden = torch.randn(1, 8, H)
    out = head(emb(ids) + hidden)
    whole = torch.nn.Parameter(w.clone())
    ref = torch.nn.functional.linear(torch.nn.functional.embedding(ids, whole, padding_idx=3) + hidden, whole)
    assert torch.allclose(out, ref, atol=1e-6)
    (out ** 2).sum().backward()
    (ref ** 2).sum().backward()
    grad = torch.cat([emb.base_rows.grad, emb.new_rows.grad])
    assert torch.allclose(grad, whole.grad, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("stage", ["stage1", "stage2", "sft"])
def test_groups_of_every_stage_counted_by_hand(stage, tied):
    plain = apply_stage(base_model(tied), STAGES[stage])
    lora = sum(p.numel() for n, p in plain.named_parameters() if ".lora_" in n)
    heads = 2 if (stage != "stage1" and not tied) else 1   # an untied lm_head trains in stage 2 and SFT
    split = apply_stage(base_model(tied), STAGES[stage], split_rows_at=B)
    want = {"base_rows": heads * B * H, "new_rows": heads * (V - B) * H}
    if lora:
        want = {"lora": lora, **want}
    assert trainable_groups(split) == want
    assert count_trainable(split) == count_trainable(plain)
    frozen = apply_stage(base_model(tied), STAGES[stage], split_rows_at=B, train_base_rows=False)
    assert trainable_groups(frozen) == {k: v for k, v in want.items() if k != "base_rows"}
    assert count_trainable(frozen)[1] == count_trainable(plain)[1]
    groups = param_groups(split, 1e-3, base_scale=0.1, new_scale=2.0)
    assert [(g["name"], g["lr"], sum(p.numel() for p in g["params"])) for g in groups] == \
        [(name, 1e-3 * {"base_rows": 0.1, "new_rows": 2.0}.get(name, 1.0), n) for name, n in want.items()]
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(split(input_ids=x).logits, plain(input_ids=x).logits)


def test_plan_counts_each_group(capsys):
    vocab, base, d = 49953, 32000, 4096
    for stage, lr_base, want in (
            ("stage1", "1", f"(base rows {base * d:,}, new rows {(vocab - base) * d:,})"),
            ("stage2", "0", f"(LoRA 8,388,608, new rows {2 * (vocab - base) * d:,})"),
            ("sft", "0.1", f"(LoRA 19,988,480, base rows {2 * base * d:,}, new rows {2 * (vocab - base) * d:,})")):
        assert run_cli("plan", "--model", "llama-7b", "--vocab-size", vocab, "--stage", stage, "--tokens", "1e9",
                       "--gpus", 8, "--embed-lr-base", lr_base) == 0
        assert want in capsys.readouterr().out


# ------------------------------------------------------------------------------------ the real engine

RUNS = textwrap.dedent("""
    # Every (stage, embed_lr_base) of one model, each a real `Trainer` run (DeepSpeed ZeRO-2, one CPU rank).
    import json, sys
    import zhllama.app.train  # registers the sft stage's data reader, as `zhllama train` does
    from zhllama.pretrain.config import load_config
    from zhllama.pretrain.engine import Trainer
    model, pack, sft, out = sys.argv[1:5]
    for stage in ("stage1", "stage2", "sft"):
        data = [f"data=[{sft}]", "block_size=128"] if stage == "sft" else [f"data=[{pack}]", "block_size=32"]
        for lr in ("0", "0.1", "1"):
            args = [f"stage={stage}", f"model={model}", *data, f"out={out}/{stage}-{lr}", f"embed_lr_base={lr}",
                    "max_steps=3", "global_batch=4", "micro_batch=2", "lr=0.01", "warmup_ratio=0", "save_every=100",
                    "lora_dropout=0", "tensorboard=false"]
            summary = Trainer(load_config(None, args)).run()
            print("RUN", stage, lr, json.dumps(summary["trainable_groups"]), flush=True)
""")


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """A tiny tied (LLaMA-3.2/SmolLM2-like) model whose config records its last 150 rows as the merge's, and
    the Chinese sample packed with its byte-level BPE tokenizer."""
    from zhllama.tiny_bpe import make_byte_level_bpe, make_tiny_llama3

    d = tmp_path_factory.mktemp("tied_rows")
    lines = (SAMPLES / "en_sample.txt").read_text(encoding="utf-8").splitlines() + \
        (SAMPLES / "zh_sample.txt").read_text(encoding="utf-8").splitlines()
    tok = make_byte_level_bpe(d / "tok", lines, vocab_size=600, style="llama3")
    model = make_tiny_llama3(tok, d / "model", hidden_size=32, tie_word_embeddings=True, seed=0)
    config = json.loads((model / "config.json").read_text())
    config[BASE_VOCAB_KEY] = config["vocab_size"] - 150
    (model / "config.json").write_text(json.dumps(config, indent=2))
    assert run_cli("data", "pack", "--tokenizer", model, "--input", SAMPLES / "zh_sample.txt", "--block-size", 32,
                   "--out", d / "packed", "--workers", 1) == 0
    return model, d / "packed"


@pytest.fixture(scope="module", params=["untied", "tied"])
def runs(request, tmp_path_factory, tiny_model_base_vocab, tiny_packed):
    model, pack = (tiny_model_base_vocab, tiny_packed) if request.param == "untied" else \
        request.getfixturevalue("tied_model")
    out = tmp_path_factory.mktemp(f"rows_{request.param}")
    script = out / "runs.py"
    script.write_text(RUNS)
    res = subprocess.run([sys.executable, str(script), str(model), str(pack), str(SAMPLES / "sft_zh.jsonl"), str(out)],
                         env=subprocess_env(), capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    groups = {(line.split()[1], line.split()[2]): json.loads(line.split(" ", 3)[3])
              for line in res.stdout.splitlines() if line.startswith("RUN ")}
    return request.param, Path(model), out, groups


def _matrices(model_dir, adapter=None) -> dict:
    """embed_tokens and lm_head of the base, or of base + adapter merged, as `zhllama merge` folds them."""
    model = load_model(model_dir)
    if adapter is not None:
        model = merge_adapters(model, [adapter])
    return {"embed_tokens": model.get_input_embeddings().weight.detach().clone(),
            "lm_head": model.get_output_embeddings().weight.detach().clone()}


@pytest.mark.slow
def test_base_rows_frozen_or_slower_in_every_stage(runs):
    kind, model_dir, out, groups = runs
    base_vocab = json.loads((model_dir / "config.json").read_text())[BASE_VOCAB_KEY]
    before = _matrices(model_dir)
    for stage in ("stage1", "stage2", "sft"):
        trained = ["embed_tokens"] + (["lm_head"] if stage != "stage1" and kind == "untied" else [])
        assert ("base_rows" in groups[(stage, "0")]) is False and groups[(stage, "0")]["new_rows"] > 0
        assert groups[(stage, "0.1")]["base_rows"] == groups[(stage, "1")]["base_rows"] == \
            base_vocab * before["embed_tokens"].shape[1] * len(trained)
        moved = {}
        for lr in ("0", "0.1", "1"):
            after = _matrices(model_dir, out / f"{stage}-{lr}" / "final")
            for name in trained:
                old, new = before[name][:base_vocab], after[name][:base_vocab]
                moved[lr, name] = float((new - old).norm())
                assert not torch.equal(after[name][base_vocab:], before[name][base_vocab:]), (stage, lr, name)
            if kind == "tied":
                assert torch.equal(after["lm_head"], after["embed_tokens"])
            elif stage == "stage1":
                assert torch.equal(after["lm_head"], before["lm_head"])
        for name in trained:
            assert moved["0", name] == 0.0, (stage, name)   # bit-identical
            assert 0 < moved["0.1", name] < 0.5 * moved["1", name], (stage, name, moved)


@pytest.mark.slow
def test_merge_writes_one_matrix_holding_the_trained_rows(runs, tmp_path):
    from zhllama.export.merge import merge_checkpoint

    kind, model_dir, out, _ = runs
    base_vocab = json.loads((model_dir / "config.json").read_text())[BASE_VOCAB_KEY]
    adapter = out / "stage2-0.1" / "final"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    trained = {k.split(".")[-2]: t for k, t in saved.items() if ".lora_" not in k}   # embed_tokens (lm_head)
    merge_checkpoint(model_dir, [adapter], tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    tensors = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    embed = tensors["model.embed_tokens.weight"]
    assert torch.equal(embed, trained["embed_tokens"])          # the trained rows, base and new, in one matrix
    base = _matrices(model_dir)
    assert not torch.equal(embed[:base_vocab], base["embed_tokens"][:base_vocab])
    if kind == "tied":
        assert config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
        assert set(trained) == {"embed_tokens"}
    else:
        assert torch.equal(tensors["lm_head.weight"], trained["lm_head"])


def test_row_lr_keys_are_checked(tiny_model_dir):
    from zhllama.errors import ConfigError
    from zhllama.pretrain.config import load_config
    from zhllama.pretrain.engine import build_model

    base = ["stage=stage2", f"model={tiny_model_dir}", "data=[d]", "out=o"]
    for override, message in (("embed_lr_base=-1", r"'embed_lr_base' must be a number in \[0\.0, "),
                              ("embed_lr_new=0", r"'embed_lr_new' must be a number in \(0\.0, "),
                              ("embed_lr_base=nan", r"'embed_lr_base' must be a number in \[0\.0, ")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + [override])
    with pytest.raises(ConfigError, match="'new_rows_only' and 'embed_lr_base' disagree"):
        load_config(None, ["stage=stage1", *base[1:], "new_rows_only=true", "embed_lr_base=0.5"])
    assert load_config(None, ["stage=stage1", *base[1:], "new_rows_only=true"]).row_lr_scales() == (0.0, 1.0)
    # a model `zhllama vocab resize` did not make has no recorded base vocab size: refused, naming both
    cfg = load_config(None, base + ["embed_lr_base=0.1"])
    with pytest.raises(ConfigError, match=f"embed_lr_base needs the base vocab size .*{BASE_VOCAB_KEY}"):
        build_model(cfg, cfg.preset(), torch.float32)
