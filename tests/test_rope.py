"""Context extension settings (pretrain/rope.py): reading a base's positions from either transformers
format, extending them (factors composed on an already scaled base), and the config.json keys written.

Every expected config here is worked out by hand from the rules in pretrain/rope.py's docstring.
"""

import json
import subprocess
from pathlib import Path

import pytest

from test_deploy_files import _tf4_python
from zhllama.errors import ConfigError, UserError
from zhllama.pretrain.config import load_config
from zhllama.pretrain.rope import (Rope, RopeChange, check_request, config_keys, context_length, extend, read_rope,
                                   run_change, with_rope)

# LLaMA-2-7B as transformers 4.x saves it, and as transformers 5.x saves it.
LLAMA2_TF4 = {"model_type": "llama", "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None}
LLAMA2_TF5 = {"model_type": "llama", "max_position_embeddings": 4096,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
# LLaMA-3.1-8B's config.json (its published rope keys).
LLAMA31 = {"model_type": "llama", "max_position_embeddings": 131072, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def test_both_transformers_formats_read_the_same():
    want = Rope("default", 1.0, 10000.0, 4096)
    assert read_rope(LLAMA2_TF4) == read_rope(LLAMA2_TF5) == want
    assert want.context_length == 4096
    assert read_rope({"max_position_embeddings": 2048}) == Rope("default", 1.0, 10000.0, 2048)  # no theta: 10000
    # a 5.x config whose rope_parameters carry the scaling (what save_pretrained writes after a load)
    tf5_linear = {"max_position_embeddings": 4096,
                  "rope_parameters": {"type": "linear", "rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}
    assert read_rope(tf5_linear) == Rope("linear", 4.0, 10000.0, 4096)
    assert context_length(tf5_linear) == 16384
    r = read_rope(LLAMA31)
    assert (r.type, r.factor, r.theta, r.max_position_embeddings, r.original, r.context_length) == \
        ("llama3", 8.0, 500000.0, 131072, 8192, 131072)
    assert dict(r.extra) == {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def test_linear_extension_of_an_unscaled_base_hand_worked():
    """Chinese-LLaMA-Alpaca-2's 16K recipe on a 4K base: linear, factor 4."""
    new = extend(read_rope(LLAMA2_TF5), {"type": "linear", "factor": 4})
    assert new == Rope("linear", 4.0, 10000.0, 4096)
    assert new.context_length == 16384
    assert config_keys(new) == {
        "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},             # exactly {type, factor}: transformers 4.40
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}
    # the target alone gives the same, and both agreeing too
    assert extend(read_rope(LLAMA2_TF4), {"type": "linear"}, 16384) == new
    assert extend(read_rope(LLAMA2_TF4), {"type": "linear", "factor": 4.0}, 16384) == new
    # dynamic keeps max_position_embeddings as the length it starts scaling past
    assert config_keys(extend(read_rope(LLAMA2_TF4), {"type": "dynamic"}, 8192))["rope_scaling"] == \
        {"type": "dynamic", "factor": 2.0}


def test_yarn_extension_of_an_unscaled_base_hand_worked():
    """Chinese-LLaMA-Alpaca-2's 64K model: YaRN, factor 16 over 4K."""
    new = extend(read_rope(LLAMA2_TF5), {"type": "yarn", "factor": 16})
    assert new == Rope("yarn", 16.0, 10000.0, 65536, 4096)
    assert config_keys(new) == {
        "max_position_embeddings": 65536, "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096},
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                            "original_max_position_embeddings": 4096}}
    tuned = extend(read_rope(LLAMA2_TF5), {"type": "yarn", "factor": 16, "beta_fast": 16})
    assert config_keys(tuned)["rope_scaling"]["beta_fast"] == 16.0


def test_llama31_base_is_extended_from_its_own_settings():
    """LLaMA-3.1 (llama3, factor 8 over 8192, 128K) extended x2 to 256K: factor 8 x 2 = 16, the original
    length 8192 and the frequency factors kept, max_position_embeddings 131072 x 2 = 262144."""
    new = extend(read_rope(LLAMA31), {"type": "llama3", "factor": 2})
    out = with_rope(LLAMA31, new)
    assert out == {"model_type": "llama", "max_position_embeddings": 262144, "rope_theta": 500000.0,
                   "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 8192,
                                    "high_freq_factor": 4.0, "low_freq_factor": 1.0},
                   "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                       "original_max_position_embeddings": 8192, "high_freq_factor": 4.0,
                                       "low_freq_factor": 1.0}}
    assert new.context_length == 262144 == 131072 * 2   # LLaMA-3.1 itself: 131072 = 8192 x 16, factor 8
    # given as the target instead of the factor: the same
    assert extend(read_rope(LLAMA31), {"type": "llama3"}, 262144) == new


def test_scaled_bases_compose_their_factor():
    linear16k = read_rope({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert linear16k.context_length == 16384
    assert extend(linear16k, {"type": "linear", "factor": 2}) == Rope("linear", 8.0, 10000.0, 4096)
    yarn = read_rope({"max_position_embeddings": 65536, "rope_scaling": {
        "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "beta_fast": 32}})
    assert extend(yarn, {"type": "yarn"}, 131072) == Rope("yarn", 32.0, 10000.0, 131072, 4096, (("beta_fast", 32),))


def test_refusals_name_the_key():
    base = read_rope(LLAMA31)
    with pytest.raises(ConfigError, match="already uses llama3 RoPE scaling.*extend it with type llama3"):
        extend(base, {"type": "linear", "factor": 2})
    with pytest.raises(ConfigError, match=r"factor' 4 x the model's context 4,096 = 16,384, not 'context_length' "
                                          r"32,768"):
        extend(read_rope(LLAMA2_TF4), {"type": "linear", "factor": 4}, 32768)
    with pytest.raises(ConfigError, match="'context_length' 2,048 must be longer than the model's context 4,096"):
        extend(read_rope(LLAMA2_TF4), {"type": "yarn"}, 2048)
    with pytest.raises(ConfigError, match="not a whole number of tokens"):
        extend(read_rope({"max_position_embeddings": 100}), {"type": "linear", "factor": 1.333})
    with pytest.raises(UserError, match="RoPE type 'longrope'"):
        read_rope({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})


@pytest.mark.parametrize("request_, ctx, message", [
    ({"type": "ntk", "factor": 2}, None, "type must be one of linear, dynamic, yarn, llama3, got 'ntk'"),
    ({"type": "linear", "factor": 1}, None, r"'rope_scaling.factor' must be > 1"),
    ({"type": "linear", "factor": -2}, None, r"'rope_scaling.factor' must be a number > 0"),
    ({"type": "linear", "factor": float("nan")}, None, r"'rope_scaling.factor' must be a number > 0"),
    ({"type": "linear", "beta_fast": 2}, 4096, "unknown key.*beta_fast for type linear"),
    ({"type": "linear"}, None, "needs a 'factor', or give the target as 'context_length'"),
    ({"type": "yarn"}, 1.5, "'context_length' must be an integer >= 2"),
    (None, 8192, "'context_length' needs 'rope_scaling'"),
    ("linear", None, "must be a mapping"),
])
def test_request_checks(request_, ctx, message):
    with pytest.raises(ConfigError, match=message):
        check_request(request_, ctx)


def test_run_config_keys_are_checked_before_any_model(tmp_path):
    base = ["model=m", "out=o", "data=[d]"]
    cfg = load_config(None, base + ["rope_scaling={type: yarn, factor: 4}", "context_length=2048"])
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4} and cfg.context_length == 2048
    with pytest.raises(ConfigError, match="type must be one of"):
        load_config(None, base + ["rope_scaling={type: ntk, factor: 4}"])
    with pytest.raises(ConfigError, match="key 'rope_scaling' must be a mapping"):
        load_config(None, base + ["rope_scaling=linear"])
    with pytest.raises(ConfigError, match="key 'context_length' must be an integer"):
        load_config(None, base + ["context_length=long"])


def test_a_run_on_an_extended_stage_inherits_it_and_refuses_another_base():
    before = read_rope(LLAMA2_TF5)
    stage2 = RopeChange(before, extend(before, {"type": "linear", "factor": 4}))
    # SFT on base + the long stage 2 (init_adapters): the stage's positions, unchanged
    assert run_change(LLAMA2_TF5, stage2, None, None) == stage2
    # a further extension composes on top of the inherited one, and still records the base's positions
    assert run_change(LLAMA2_TF5, stage2, {"type": "linear", "factor": 2}, None) == \
        RopeChange(before, Rope("linear", 8.0, 10000.0, 4096))
    assert run_change(LLAMA2_TF5, None, None, None) is None
    with pytest.raises(UserError, match="trained from a base whose positions were 4,096 tokens"):
        run_change({"max_position_embeddings": 2048}, stage2, None, None)
    assert RopeChange.from_record(json.loads(json.dumps(stage2.record()))) == stage2


# ------------------------------------------------------------------------------------------ transformers 4.x

def test_transformers440_reads_linear_and_dynamic_as_written(tmp_path):
    """The oldest transformers zhllama supports validates rope_scaling as exactly {type, factor > 1.0}
    (a float): the keys written for linear and dynamic load there with the same scaling and theta."""
    py = _tf4_python()
    for rtype in ("linear", "dynamic"):
        cfg = with_rope({"model_type": "llama", "max_position_embeddings": 256, "hidden_size": 64,
                         "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 128,
                         "vocab_size": 100, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
                        Rope(rtype, 8.0, 10000.0, 256))
        d = tmp_path / rtype
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        code = ("import json, sys\nfrom transformers import AutoConfig\nc = AutoConfig.from_pretrained(sys.argv[1])\n"
                "print(json.dumps([c.rope_scaling, c.rope_theta, c.max_position_embeddings]))")
        res = subprocess.run([str(py), "-c", code, str(d)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout.strip().splitlines()[-1]) == [{"type": rtype, "factor": 8.0}, 10000.0, 256]


def test_serve_takes_its_context_from_the_scaling(tmp_path):
    """`zhllama serve` bounds requests by the extended context: 1024 positions x linear factor 4 = 4096
    tokens, YaRN's 8192 written as max_position_embeddings; --max-context may lower it, not raise it;
    an odd scaling entry falls back to max_position_embeddings."""
    from zhllama.export.serve import serving_context
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100}
    cases = {"linear": ({**base, "max_position_embeddings": 1024, "rope_scaling": {"type": "linear", "factor": 4.0}},
                        4096),
             "yarn": ({**base, "max_position_embeddings": 8192,
                       "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024}},
                      8192),
             "odd": ({**base, "max_position_embeddings": 1024, "rope_scaling": "linear"}, 1024)}
    for name, (config, want) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        assert serving_context(d) == want, name
        assert serving_context(d, 1000) == 1000
    with pytest.raises(UserError, match=r"--max-context 5000 is more than .*max_position_embeddings x rope_scaling "
                                         r"factor 4096"):
        serving_context(tmp_path / "linear", 5000)


# ------------------------------------------------------------------------------------------ the shipped config

def test_the_shipped_long16k_config_is_the_documented_4k_to_16k_recipe():
    """configs/long16k.yaml holds every key line docs/training.md shows of it, and from a 4K base
    (LLaMA-2) its scaling trains 16,384 positions: the block size the config asks for."""
    repo = Path(__file__).resolve().parents[1]
    shipped = (repo / "configs" / "long16k.yaml").read_text(encoding="utf-8").splitlines()
    doc = (repo / "docs" / "training.md").read_text(encoding="utf-8")
    block = doc[doc.index("# configs/long16k.yaml"):].split("```")[0].splitlines()[1:]
    assert len(block) >= 10 and all(line in shipped for line in block if line.strip()), \
        [line for line in block if line.strip() and line not in shipped]
    cfg = load_config(str(repo / "configs" / "long16k.yaml"), [])
    assert (cfg.stage, cfg.block_size, cfg.context_length, cfg.micro_batch) == ("stage2", 16384, 16384, 1)
    assert cfg.rope_scaling == {"type": "linear", "factor": 4}
    assert (cfg.preset().global_batch, cfg.preset().lr) == (32, 2e-5)
    change = run_change(LLAMA2_TF5, None, cfg.rope_scaling, cfg.context_length)
    assert change.after == Rope("linear", 4.0, 10000.0, 4096) and context_length(with_rope(LLAMA2_TF5, change.after)) == 16384
