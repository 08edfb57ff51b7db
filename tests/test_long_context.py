"""Context extension through the real commands (issue 23): a stage run with `rope_scaling`, its adapter,
`zhllama merge`, and the merged checkpoint reloaded by transformers 5 and 4.

The base is a tiny LLaMA whose context is 32 tokens; the runs train on 64-token blocks. Expected
configs are written out by hand; the trained model with its adapter is rebuilt with plain transformers
and PEFT (not zhllama's loaders), so the comparison does not go through the code under test.
"""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, subprocess_env
from test_deploy_files import _tf4_python, convert_and_read
from zhllama.app.cli import main
from zhllama.export.merge import REPORT, merge_checkpoint
from zhllama.pretrain.rope import Rope, with_rope
from zhllama.tiny import make_tiny_llama

BASE_CTX = 32
BLOCK = 64


@pytest.fixture(scope="module")
def short_base(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("long_base") / "model"
    return make_tiny_llama(tiny_tokenizer_dir / "tokenizer.model", out, max_position_embeddings=BASE_CTX, seed=3)


@pytest.fixture(scope="module")
def llama3_base(tmp_path_factory, tiny_tokenizer_dir):
    """A LLaMA-3.1-style base: llama3 scaling, factor 2 over 16 tokens, 32 in all (written as 4.x writes it)."""
    out = tmp_path_factory.mktemp("llama3_base") / "model"
    make_tiny_llama(tiny_tokenizer_dir / "tokenizer.model", out, max_position_embeddings=BASE_CTX, seed=4)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def packed64(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("long_packed") / "packed"
    assert main(["data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", REPO / "zhllama" / "data" / "zh_sample.txt",
                 "--block-size", BLOCK, "--out", out, "--workers", "1", "--validation-ratio", "0"]) == 0
    return out


def _train(base, packed, out, rope_scaling):
    res = subprocess.run([sys.executable, "-m", "zhllama.app.cli", "train", "stage=stage2", f"model={base}",
                          f"data=[{packed}]", "max_steps=2", "global_batch=2", "micro_batch=2", f"block_size={BLOCK}",
                          "lr=0.01", "lora_dropout=0.0", "save_every=100", "tensorboard=false",
                          f"rope_scaling={rope_scaling}", f"out={out}"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory, short_base, packed64):
    return _train(short_base, packed64, tmp_path_factory.mktemp("linear") / "run", "{type: linear, factor: 2}")


@pytest.fixture(scope="module")
def linear_merged(tmp_path_factory, short_base, linear_run):
    out = tmp_path_factory.mktemp("linear_merged") / "model"
    merge_checkpoint(short_base, [linear_run / "final"], out)
    return out


def _meta(run):
    return json.loads((run / "final" / "zhllama_adapter.json").read_text())


def test_stage_run_records_the_positions_it_trained_with(linear_run):
    assert yaml.safe_load((linear_run / "config.yaml").read_text())["rope_scaling"] == {"type": "linear", "factor": 2}
    run_config = _meta(linear_run)["run_config"]
    assert run_config["rope_scaling"] == {"type": "linear", "factor": 2}
    assert run_config["rope"] == {
        "from": {"type": "default", "factor": 1.0, "rope_theta": 10000.0, "max_position_embeddings": 32,
                 "context_length": 32},
        "to": {"type": "linear", "factor": 2.0, "rope_theta": 10000.0, "max_position_embeddings": 32,
               "context_length": 64}}


def test_merge_writes_the_scaling_for_transformers_4_and_5_and_the_card(linear_merged):
    cfg = json.loads((linear_merged / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 32 and cfg["rope_theta"] == 10000.0
    assert cfg["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert cfg["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    report = json.loads((linear_merged / REPORT).read_text())
    assert report["rope"]["to"]["context_length"] == 64 and report["config"]["rope_scaling"] == cfg["rope_scaling"]
    card = (linear_merged / "README.md").read_text()
    assert "context 64 tokens (RoPE linear scaling, factor 2 over 32, theta 10000), extended from the base's 32 " \
           "tokens" in card
    assert "rope_scaling={'type': 'linear', 'factor': 2}" in card


def _plain_trained_model(base, final, rope_parameters):
    """The run's model rebuilt with transformers and PEFT alone: the base loaded with the RoPE settings
    written here by hand, and the adapter applied by PEFT (unmerged)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base))
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    model = AutoModelForCausalLM.from_pretrained(str(base), config=config, attn_implementation="sdpa")
    return PeftModel.from_pretrained(model, str(final)).eval()


def test_merged_logits_equal_the_trained_model_beyond_the_original_context(short_base, linear_run, linear_merged):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    x = torch.randint(3, 3000, (2, 60))        # 60 positions: past the base's 32
    trained = _plain_trained_model(short_base, linear_run / "final",
                                   {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    merged = AutoModelForCausalLM.from_pretrained(str(linear_merged), attn_implementation="sdpa").eval()
    unscaled = _plain_trained_model(short_base, linear_run / "final", None)
    with torch.no_grad():
        a, b, c = trained(input_ids=x).logits, merged(input_ids=x).logits, unscaled(input_ids=x).logits
    late = slice(BASE_CTX, None)
    torch.testing.assert_close(b[:, late], a[:, late], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the scaling matters: without it the logits past the base's context differ by far more than the tolerance
    assert (b[:, late] - c[:, late]).abs().max() > 1e-3


def test_transformers4_reads_the_merged_scaling(linear_merged):
    code = ("import json, sys\nfrom transformers import AutoConfig\nc = AutoConfig.from_pretrained(sys.argv[1])\n"
            "print(json.dumps([c.rope_scaling, c.rope_theta, c.max_position_embeddings]))")
    res = subprocess.run([str(_tf4_python()), "-c", code, str(linear_merged)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [{"type": "linear", "factor": 2.0}, 10000.0, 32]


def _llama3_inv_freq(head_dim, theta, factor, low, high, original):
    """Meta's LLaMA-3.1 frequency rule, written out plainly: wavelengths longer than original/low are
    divided by the factor, shorter than original/high kept, the band between blended linearly."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out)


def test_llama3_style_base_is_extended_from_its_own_settings(tmp_path, llama3_base, packed64):
    """Base: llama3, factor 2 over 16 (32 tokens). Extended x2 to 64: factor 2 x 2 = 4, original 16 and
    the frequency factors kept, max_position_embeddings 64."""
    from transformers import AutoModelForCausalLM

    run = _train(llama3_base, packed64, tmp_path / "run", "{type: llama3, factor: 2}")
    assert _meta(run)["run_config"]["rope"]["to"] == {
        "type": "llama3", "factor": 4.0, "rope_theta": 10000.0, "max_position_embeddings": 64, "context_length": 64,
        "original_max_position_embeddings": 16, "high_freq_factor": 4.0, "low_freq_factor": 1.0}
    merge_checkpoint(llama3_base, [run / "final"], tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 64
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16,
                                   "high_freq_factor": 4.0, "low_freq_factor": 1.0}
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    want = _llama3_inv_freq(head_dim, 10000.0, 4.0, 1.0, 4.0, 16)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, want, rtol=1e-6, atol=0)
    # the base's own factor 2 gives other frequencies: the composition is what is checked
    assert not torch.allclose(_llama3_inv_freq(head_dim, 10000.0, 2.0, 1.0, 4.0, 16), want)


def test_eval_scores_the_trained_adapters_as_the_merged_model(tmp_path, short_base, linear_run, linear_merged):
    """`zhllama eval --positions`, the same command for the base, the base + the run's adapter (loaded with
    the RoPE settings the run recorded) and the merged model: the last two agree, the base does not."""
    figures = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", linear_run / "final"]), ("merged", None)):
        out = tmp_path / f"{name}.json"
        model = linear_merged if extra is None else short_base
        assert main(["eval", "--model", model, *(extra or []), "--text", REPO / "zhllama" / "data" / "zh_sample.txt",
                     "--positions", "--max-length", 64, "--buckets", "32,64", "--out", out]) == 0
        (result,) = json.loads(out.read_text())["results"]
        figures[name] = [b["perplexity"] for b in result["positions"]["buckets"]]
        assert result["context_length"] == (32 if name == "base" else 64)
    assert figures["adapter"] == pytest.approx(figures["merged"], rel=1e-5)
    assert figures["base"][1] != pytest.approx(figures["merged"][1], rel=1e-3)


# ------------------------------------------------------------------------------------------ llama.cpp GGUF

@pytest.mark.parametrize("rope", [Rope("linear", 2.0, 10000.0, 32), Rope("yarn", 2.0, 10000.0, 64, 32),
                                  Rope("llama3", 2.0, 10000.0, 64, 16, (("high_freq_factor", 4.0),
                                                                         ("low_freq_factor", 1.0)))],
                         ids=["linear", "yarn", "llama3"])
def test_gguf_conversion_keeps_the_rope_scaling(tmp_path, linear_merged, rope):
    """llama.cpp's converter, on a merged checkpoint whose config.json zhllama wrote for each RoPE type, writes
    the GGUF keys (or, for llama3, the rope_freqs tensor) that carry the same scaling."""
    model = tmp_path / "model"
    shutil.copytree(linear_merged, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(with_rope(cfg, rope)))
    read = ("import json, sys\nfrom gguf import GGUFReader\nr = GGUFReader(sys.argv[1])\n"
            "f = lambda k: r.fields[k].contents() if k in r.fields else None\n"
            "keys = ('llama.context_length', 'llama.rope.freq_base', 'llama.rope.scaling.type', "
            "'llama.rope.scaling.factor', 'llama.rope.scaling.original_context_length')\n"
            "freqs = [t.data.tolist() for t in r.tensors if t.name == 'rope_freqs.weight']\n"
            "print(json.dumps({k: f(k) for k in keys} | {'rope_freqs': freqs[0] if freqs else None}))\n")
    got = convert_and_read(model, tmp_path / "model.gguf", read)
    assert got["llama.context_length"] == rope.max_position_embeddings and got["llama.rope.freq_base"] == 10000.0
    if rope.type in ("linear", "yarn"):
        assert (got["llama.rope.scaling.type"], got["llama.rope.scaling.factor"]) == (rope.type, 2.0)
        assert got["llama.rope.scaling.original_context_length"] == (32 if rope.type == "yarn" else None)
        assert got["rope_freqs"] is None
    else:   # llama.cpp divides each frequency by the factor it stores: the base's over transformers' llama3 ones
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        plain = _llama3_inv_freq(head_dim, 10000.0, 1.0, 1.0, 4.0, 16)
        want = plain / _llama3_inv_freq(head_dim, 10000.0, 2.0, 1.0, 4.0, 16)
        assert got["rope_freqs"] == pytest.approx(want.tolist(), rel=1e-5)
        assert got["llama.rope.scaling.type"] is None
