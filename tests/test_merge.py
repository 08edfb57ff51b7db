"""zhllama merge (docs/publish.md, What the tests prove): merged weights = base + adapters, a checkpoint
that stands alone, and clear refusals of bad input with nothing half-written.

Adapters: one real stage-2 run (`zhllama train`, 1 rank, module-scoped) and, for speed, SFT / stage-1 /
grown-vocabulary adapters trained in-process with the engine's own `apply_stage` + `save_adapter`.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import grow_tiny, subprocess_env, train_adapter

from zhllama.app.cli import main
from zhllama.errors import UserError
from zhllama.export.merge import MANIFEST, REPORT, check_manifest, merge_checkpoint
from zhllama.modelio import load_model, load_tokenizer
from zhllama.pretrain.adapters import load_adapter, merge_adapters

REPO = Path(__file__).resolve().parent.parent
ZH = "北京是中国的首都，经济持续稳定发展。我们学习自然语言处理。"
EN = "The quick brown fox jumps over the lazy dog. A language model predicts the next token."
# fp32 tolerance for merged vs run-time logits: the run-time LoRA computes x·Wᵀ + s·(x·Aᵀ)·Bᵀ, the merged
# model x·(W + s·B·A)ᵀ; the same sums in another order differ by float32 rounding (~1e-6 relative to
# logits of size ~1), far below the effect of any adapter tensor merged wrongly or not at all (>1e-2 here).
ATOL = 1e-4


def _ids(tok, text):
    return torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _weights(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _no_leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def stage2(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """final/ of a real 1-rank stage-2 run."""
    root = tmp_path_factory.mktemp("merge_runs")
    assert main(["data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", REPO / "zhllama" / "data" / "zh_sample.txt",
                 "--block-size", "32", "--out", root / "packed", "--workers", "1"]) == 0
    run = root / "stage2"
    res = subprocess.run([sys.executable, "-m", "zhllama.app.cli", "train", "stage=stage2", f"model={tiny_model_dir}",
                          f"data=[{root / 'packed'}]", "init_adapters=[]", "max_steps=3", "global_batch=8",
                          "micro_batch=4", "block_size=32", "lr=0.01", "save_every=100", "eval_every=100",
                          "tensorboard=false", f"out={run}"], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return run / "final"


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir, stage2):
    """An SFT adapter trained on base + stage2 merged (as `init_adapters` does)."""
    out = tmp_path_factory.mktemp("merge_sft") / "final"
    base = merge_adapters(load_model(tiny_model_dir), [stage2])
    return train_adapter(base, "sft", out, tiny_tokenizer_dir, seed=3,
                          run_config={"stage": "sft", "init_adapters": [str(stage2)], "data": ["sft_zh.jsonl"],
                                      "lr": 1e-2, "template": "alpaca"})


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir, stage2, sft):
    out = tmp_path_factory.mktemp("merged") / "model"
    # A small shard size so the tiny model is written as several shards + an index, as a 7B is.
    merge_checkpoint(tiny_model_dir, [stage2, sft], out, max_shard_size="300KB")
    return out


# ----------------------------------------------------------------------------------------------- equality

def test_merged_weights_equal_merge_adapters_and_logits_equal_runtime(merged, tiny_model_dir, tiny_tokenizer_dir,
                                                                     stage2, sft):
    reference = merge_adapters(load_model(tiny_model_dir), [stage2, sft])
    ref, got = reference.state_dict(), _weights(merged)
    assert set(ref) == set(got)
    for k in ref:   # the same float32 operations as PEFT's merge_and_unload: bit for bit
        assert torch.equal(ref[k], got[k]), k
    base = load_model(tiny_model_dir)
    assert not torch.equal(base.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           got["model.layers.0.self_attn.q_proj.weight"])

    # Stage 2 then SFT merged == stage 2 merged and the SFT adapter applied at run time (unmerged LoRA).
    runtime = load_adapter(merge_adapters(load_model(tiny_model_dir), [stage2]), sft)
    model = load_model(merged)
    tok = load_tokenizer(merged)
    for text in (ZH, EN):
        ids = _ids(tok, text)
        a, b = _logits(model, ids), _logits(runtime, ids)
        assert (a - _logits(base, ids)).abs().max() > 1e-2     # the adapters changed the output
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_stage2_alone_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model_dir, stage2):
    out = tmp_path / "m"
    assert main(["merge", "--base", tiny_model_dir, "--adapter", stage2, "--out", out]) == 0
    runtime = load_adapter(load_model(tiny_model_dir), stage2)
    model, tok = load_model(out), load_tokenizer(out)
    for text in (ZH, EN):
        torch.testing.assert_close(_logits(model, _ids(tok, text)), _logits(runtime, _ids(tok, text)), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------- output

def test_merged_dir_stands_alone(merged, tiny_tokenizer_dir):
    """AutoModelForCausalLM / AutoTokenizer from the dir alone, generation, vocab sizes, files, card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(merged), local_files_only=True)
    ids = tok(ZH, return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id == model.config.bos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    rows = model.get_input_embeddings().weight.shape[0]
    assert model.config.vocab_size == rows == model.get_output_embeddings().weight.shape[0] >= len(tok)
    assert len(tok) == len(load_tokenizer(tiny_tokenizer_dir)) and model.dtype == torch.float32
    torch.testing.assert_close(_logits(model, ids), _logits(load_model(merged), ids), rtol=0, atol=0)

    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md", MANIFEST, REPORT,
            "tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= names
    assert len(list(merged.glob("model-*-of-*.safetensors"))) > 1
    assert check_manifest(merged) == []
    listed = {line.split("  ", 1)[1] for line in (merged / MANIFEST).read_text().splitlines()}
    assert listed == names - {MANIFEST}
    card = (merged / "README.md").read_text()
    for must in ("stage2", "sft", "LoRA on", "lr=0.01", "lr=0.01", "Licence", "Tokens per character", "sha256"):
        assert must in card, must
    report = json.loads((merged / REPORT).read_text())
    assert [a["stage"] for a in report["adapters"]] == ["stage2", "sft"]
    assert report["peak_rss_bytes"] > 0


def test_manifest_detects_a_changed_file(tmp_path, merged):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("silu", "gelu"))
    assert check_manifest(copy) == ["config.json"]


def test_dtype_option_and_bf16_output(tmp_path, tiny_model_dir, stage2):
    out = tmp_path / "bf16"
    merge_checkpoint(tiny_model_dir, [stage2], out, dtype="bf16")
    w = _weights(out)
    assert {t.dtype for t in w.values()} == {torch.bfloat16}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    ref = merge_adapters(load_model(tiny_model_dir), [stage2]).state_dict()
    for k in ("model.layers.1.self_attn.v_proj.weight", "lm_head.weight"):   # fp32 merge, one rounding to bf16
        assert torch.equal(w[k], ref[k].to(torch.bfloat16)), k


# ----------------------------------------------------------------------------------------------- vocabulary

@pytest.fixture(scope="module")
def grown(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """A tokenizer extended with new pieces, the tiny model resized to it, and adapters trained on that."""
    root = tmp_path_factory.mktemp("grown")
    big, resized = grow_tiny(root, tiny_model_dir, tiny_tokenizer_dir)
    n_base = len(load_tokenizer(tiny_tokenizer_dir))
    s1 = train_adapter(load_model(resized), "stage1", root / "s1", big, new_rows_from=n_base,
                        run_config={"stage": "stage1"})
    s2 = train_adapter(merge_adapters(load_model(resized), [s1]), "stage2", root / "s2", big, seed=5,
                        run_config={"stage": "stage2", "init_adapters": [str(s1)]})
    return {"tok": big, "resized": resized, "s1": s1, "s2": s2, "rows": len(load_tokenizer(big)), "base_rows": n_base}


def test_stage1_then_stage2_on_a_resized_base(tmp_path, grown):
    out = tmp_path / "m"
    merge_checkpoint(grown["resized"], [grown["s1"], grown["s2"]], out)
    ref = merge_adapters(load_model(grown["resized"]), [grown["s1"], grown["s2"]]).state_dict()
    got = _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert got["model.embed_tokens.weight"].shape[0] == grown["rows"] > grown["base_rows"]


def test_adapter_with_a_larger_vocabulary_grows_the_base(tmp_path, tiny_model_dir, grown):
    """The original (un-resized) base + an adapter whose embed_tokens/lm_head have the merged vocabulary."""
    out = tmp_path / "m"
    report = merge_checkpoint(tiny_model_dir, [grown["s2"]], out)
    assert report["vocab_size"] == grown["rows"] and report["tokenizer_size"] == grown["rows"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == grown["rows"]
    runtime = load_adapter(load_model(grown["resized"]), grown["s2"])   # any resize: the adapter defines all rows
    model, tok = load_model(out), load_tokenizer(out)
    assert len(tok) == grown["rows"]
    for text in (ZH + "人工智能和机器学习", EN):
        ids = _ids(tok, text)
        torch.testing.assert_close(_logits(model, ids), _logits(runtime, ids), rtol=0, atol=ATOL)


def test_stage1_adapter_needs_a_resized_base(tmp_path, tiny_model_dir, grown):
    with pytest.raises(UserError, match=r"stage-1 adapter .* trains rows up to .* has 3000 rows.*vocab resize"):
        merge_checkpoint(tiny_model_dir, [grown["s1"]], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_tokenizer_that_does_not_match_the_adapter_rows_is_refused(tmp_path, stage2, tiny_model_dir, grown):
    """The anchors' 49953/49954 mistake: an adapter shipped with a tokenizer of another size."""
    bad = tmp_path / "adapter"
    shutil.copytree(stage2, bad)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(grown["tok"] / name, bad / name)
    with pytest.raises(UserError, match=rf"tokenizer {bad} has {grown['rows']} tokens but the adapter .* has 3000 "
                                        "embedding rows"):
        merge_checkpoint(tiny_model_dir, [bad], tmp_path / "m")


# ----------------------------------------------------------------------------------------------- bad input

def test_adapter_of_another_base_is_refused(tmp_path, tiny_tokenizer_dir, stage2):
    from zhllama.tiny import make_tiny_llama
    other = make_tiny_llama(tiny_tokenizer_dir / "tokenizer.model", tmp_path / "other", hidden_size=32, num_heads=2,
                            intermediate_size=88)
    with pytest.raises(UserError, match=r"adapter_model.safetensors: LoRA A \(8, 64\) and B \(64, 8\) \(r=8\) do not "
                                        r"fit model.layers.0.self_attn.k_proj.weight of shape \(32, 32\) in .*other; "
                                        r"the adapter was trained on another base model \(.*tiny_model.*\)"):
        merge_checkpoint(other, [stage2], tmp_path / "m")


@pytest.mark.parametrize("damage, message", [
    ("missing", r"adapter_model.safetensors: adapter weights are missing"),
    ("empty", r"adapter_model.safetensors: empty file \(0 bytes\)"),
    ("truncated", r"adapter_model.safetensors: truncated or replaced"),
    ("truncated_no_meta", r"adapter_model.safetensors: unreadable or truncated safetensors"),
    ("no_config", r"adapter_config.json is missing"),
])
def test_broken_adapter_files_get_one_line_errors_and_nothing_is_written(tmp_path, capsys, tiny_model_dir, stage2,
                                                                         damage, message):
    bad = tmp_path / "adapter"
    shutil.copytree(stage2, bad)
    w = bad / "adapter_model.safetensors"
    if damage == "missing":
        w.unlink()
    elif damage == "empty":
        w.write_bytes(b"")
    elif damage.startswith("truncated"):
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        if damage == "truncated_no_meta":
            (bad / "zhllama_adapter.json").unlink()
    else:
        (bad / "adapter_config.json").unlink()
    code = main(["merge", "--base", tiny_model_dir, "--adapter", stage2, "--adapter", bad, "--out", tmp_path / "m"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "m").exists() and _no_leftovers(tmp_path, "m") == []


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys, tiny_model_dir, stage2):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", "--base", tiny_model_dir, "--adapter", stage2, "--out", out]) == 2
    assert "output exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").is_file()
    assert main(["merge", "--base", tiny_model_dir, "--adapter", stage2, "--out", out, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _no_leftovers(tmp_path, "m") == []


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, tiny_model_dir, stage2):
    import zhllama.export.merge as m

    def broken(*a, **k):
        raise RuntimeError("simulated failure after the shards were written")
    monkeypatch.setattr(m, "verify_output", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        merge_checkpoint(tiny_model_dir, [stage2], tmp_path / "m")
    assert not (tmp_path / "m").exists() and _no_leftovers(tmp_path, "m") == []


def test_merge_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--adapter" in out and "shard by shard" in out and "--max-shard-size" in out
