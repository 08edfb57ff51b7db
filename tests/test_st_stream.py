"""The core homes of the I/O jobs two stages share: the safetensors shard writer (vocab resize and merge),
the dtype table, and the one rule for finding a SentencePiece tokenizer.model."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from zhllama import dtypes
from zhllama.bpe import is_bpe_json_base
from zhllama.errors import InputError
from zhllama.spm import find_sp_model, sp_model_path
from zhllama.st_stream import Reader, ShardWriter, plan_shards


def test_planned_shards_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
               "b.weight": torch.randn(16, 4, generator=g),
               "c.ids": torch.arange(5, dtype=torch.int64)}
    plan = plan_shards([(n, tuple(t.shape), dtypes.st_code(t.dtype)) for n, t in tensors.items()], 200)
    assert [[n for n, _, _ in shard] for shard in plan] == [["a.weight"], ["b.weight"], ["c.ids"]]
    writer = ShardWriter(tmp_path, plan)
    for n, t in tensors.items():
        writer.write(n, t)
    names = writer.finish()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 8 * 4 * 2 + 16 * 4 * 4 + 5 * 8
    for n, t in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][n]), framework="pt") as f:   # what HF reads
            assert torch.equal(f.get_tensor(n), t)
        with Reader(tmp_path / index["weight_map"][n]) as r:
            assert torch.equal(r.get(n), t) and r.dtype(n) == dtypes.st_code(t.dtype)


def test_writer_refuses_what_was_not_planned(tmp_path):
    writer = ShardWriter(tmp_path, plan_shards([("x", (2,), "F32")], 1 << 20))
    with pytest.raises(RuntimeError, match="planned x"):
        writer.write("x", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="0 of 1 planned"):
        writer.finish()


def test_dtype_names_agree():
    assert dtypes.SHORT_NAMES == ("bf16", "fp16", "fp32")
    for short, (name, code) in dtypes.FLOATS.items():
        assert dtypes.torch_dtype(short) is dtypes.torch_dtype(name) is getattr(torch, name)
        assert dtypes.st_code(short) == dtypes.st_code(getattr(torch, name)) == code
        assert dtypes.short_name(code) == short
        assert torch.empty(0, dtype=getattr(torch, name)).element_size() == dtypes.SAFETENSORS[code][1]
    assert dtypes.short_name("I64") == "fp32"
    with pytest.raises(ValueError):
        dtypes.st_code(torch.complex64)


def test_one_rule_finds_the_sentencepiece_model(tmp_path, tiny_tokenizer_dir):
    sp = tiny_tokenizer_dir / "tokenizer.model"
    assert sp_model_path(tiny_tokenizer_dir) == sp and sp_model_path(sp) == sp
    lone = tmp_path / "trained"       # `zhllama vocab train` output: one zh_sp.model
    lone.mkdir()
    shutil.copy(sp, lone / "zh_sp.model")
    assert sp_model_path(lone) == lone / "zh_sp.model"
    json_only = tmp_path / "bpe"
    json_only.mkdir()
    (json_only / "tokenizer.json").write_text("{}")
    assert find_sp_model(json_only) is None and is_bpe_json_base(json_only)
    with pytest.raises(InputError, match=r"bpe: no tokenizer.model in this directory; it has a tokenizer.json"):
        sp_model_path(json_only)
    with pytest.raises(InputError, match=r"missing: no such tokenizer \(no such file or directory\)"):
        sp_model_path(tmp_path / "missing")
