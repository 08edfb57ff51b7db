"""The checks that stand before every loader (issue 24): no code from a model folder, bounded YAML,
sizes estimated before anything is allocated, safetensors headers that tile their file.

The CLI-level table of bad inputs is tests/test_bad_input.py; these are the pieces, each against an
independent expectation (transformers' and PEFT's own parameter counts, node counts worked out by hand).
"""

import argparse
import ast
import json
import struct
from pathlib import Path

import pytest

from zhllama import model_config, yamlio
from zhllama.argtypes import SEED, float_range, int_range
from zhllama.errors import ConfigError, UserError
from zhllama.st_stream import HeaderError, read_header

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ["zhllama", "vocab", "pretrain", "sft", "export"]   # zhllama/app is under zhllama


# ------------------------------------------------------------------------------------------ no code

# Calls that load from a folder or the Hub and take trust_remote_code: transformers' and PEFT's, and
# `datasets.load_dataset` (which runs a Hub dataset's loading script, or asks on stdin, before 4.0).
TRUSTING = ("from_pretrained", "from_config", "load_dataset")
# Loaders with no such keyword, each read to see that it runs no code (tests/test_hf_datasets.py shows
# it for a saved dataset whose Arrow schema carries a pickle).
NO_CODE_PATH = {"load_from_disk": ["zhllama/hfdatasets.py"]}


def _calls(names):
    """(file:line, call) of every `X.name(...)` with a name in `names` in the product code."""
    for folder in PRODUCT:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in names):
                    yield f"{path.relative_to(REPO)}:{node.lineno}", node


def test_every_transformers_peft_and_datasets_loader_passes_trust_remote_code_false():
    """Without the keyword transformers asks on stdin whether to run a folder's code; with it False it
    never imports any. 17 loaders in the product code today (counted by hand: modelio 5, hf_tokenizer 1,
    vocab/report 2, vocab/bpe_report 1, export/merge 2, app/smollm2 2, tiny_bpe 1, pretrain/adapters 1,
    pretrain/plan 1, hfdatasets 1 load_dataset)."""
    assert model_config.TRUST_REMOTE_CODE is False
    calls = list(_calls(TRUSTING))
    assert len(calls) >= 17, [where for where, _ in calls]
    assert any(call.func.attr == "load_dataset" for _, call in calls)
    missing = []
    for where, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        value = kw.get("trust_remote_code")
        ok = (isinstance(value, ast.Name) and value.id == "TRUST_REMOTE_CODE") or (
            isinstance(value, ast.Constant) and value.value is False)
        if not ok:
            missing.append(where)
    assert not missing, f"loaders without trust_remote_code=False: {missing}"


YAML_READERS = {"load", "safe_load", "full_load", "unsafe_load", "load_all", "safe_load_all", "full_load_all",
                "unsafe_load_all", "compose", "compose_all", "Loader", "SafeLoader", "FullLoader", "UnsafeLoader",
                "CLoader", "CSafeLoader", "CFullLoader", "CUnsafeLoader", "BaseLoader"}


def test_yaml_is_parsed_only_by_yamlio():
    """Every YAML document (run configs, overrides, templates) goes through zhllama/yamlio.py, which
    measures aliases before expanding them; `yaml.safe_load` anywhere else would take the alias bomb."""
    found = []
    for folder in PRODUCT:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml"
                        and node.attr in YAML_READERS):
                    found.append(str(path.relative_to(REPO)))
    assert found and set(found) == {"zhllama/yamlio.py"}, found


def test_loaders_without_the_keyword_are_the_ones_read():
    """A new `load_from_disk` (or another loader with no trust_remote_code) must be looked at first."""
    for name, files in NO_CODE_PATH.items():
        found = sorted({where.split(":")[0] for where, _ in _calls((name,))})
        assert found == files, (name, found)


@pytest.mark.parametrize("file, data, key", [
    ("config.json", {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.M"}}, "'auto_map'"),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": [None, "x.T"]}}, "'auto_map'"),
    ("tokenizer_config.json", {"tokenizer_class": "NotInTransformersTokenizer"}, "'tokenizer_class'"),
    ("config.json", {"model_type": "not-in-transformers"}, "'model_type'"),
    ("adapter_config.json", {"peft_type": "LORA", "auto_mapping": {"parent_library": "os"}}, "'auto_mapping'"),
    ("tokenizer_config.json", [], "JSON object"),
])
def test_a_folder_naming_code_is_refused_naming_file_and_key(tmp_path, file, data, key):
    (tmp_path / file).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserError) as e:
        model_config.check_no_remote_code(tmp_path)
    assert str(tmp_path / file) in str(e.value) and key in str(e.value)


@pytest.mark.parametrize("file, data", [
    ("config.json", {"model_type": "llama"}),
    ("tokenizer_config.json", {"tokenizer_class": "LLaMATokenizer"}),     # decapoda: modelio repairs it
    ("tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"}),
    ("tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"}),
    ("tokenizer_config.json", {"tokenizer_class": "TokenizersBackend"}),  # what transformers 5 writes
    ("adapter_config.json", {"peft_type": "LORA", "auto_mapping": {"parent_library": "transformers.models.llama"}}),
])
def test_what_transformers_ships_passes(tmp_path, file, data):
    (tmp_path / file).write_text(json.dumps(data), encoding="utf-8")
    model_config.check_no_remote_code(tmp_path)


# ------------------------------------------------------------------------------------------- sizes

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "tie_word_embeddings": False}


@pytest.mark.parametrize("change", [{}, {"num_key_value_heads": 2}, {"tie_word_embeddings": True},
                                    {"head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1}])
def test_the_parameter_estimate_is_what_transformers_builds(change):
    """For LLaMA configs the lower bound is exact: transformers' own count on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**LLAMA, **change}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    assert model_config.estimate_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key, value", [("num_hidden_layers", -1), ("num_hidden_layers", 10 ** 6),
                                        ("num_hidden_layers", "2"), ("num_hidden_layers", True),
                                        ("hidden_size", 1 << 20), ("vocab_size", 0),
                                        ("max_position_embeddings", 0), ("num_key_value_heads", 3)])
def test_a_dimension_out_of_range_names_file_and_key(tmp_path, key, value):
    with pytest.raises(UserError) as e:
        model_config.check_model_config({**LLAMA, key: value}, tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(e.value) and f"'{key}'" in str(e.value)


def test_a_huge_layer_count_carries_the_weights_it_implies(tmp_path):
    """10^6 layers of the LLAMA shape: 10^6 x (4 x 64 x 64 + 3 x 64 x 176 + 2 x 64) + 2 x 300 x 64 + 64
    = 50,304,038,464 parameters, 201 GB in float32 (worked out by hand)."""
    with pytest.raises(UserError) as e:
        model_config.check_model_config({**LLAMA, "num_hidden_layers": 10 ** 6}, tmp_path / "config.json")
    assert "5.03e+10 parameters, 201 GB in float32" in str(e.value)


def test_weights_that_do_not_fit_are_refused_before_loading(monkeypatch):
    n = model_config.estimate_params(LLAMA)       # 3 x 50,304 + 2 x 19,200 + 64 = 189,376
    assert n == 189_376
    monkeypatch.setattr(model_config, "available_memory", lambda: 4 * n)
    model_config.check_weights_fit(LLAMA, "m/config.json", 4, "float32")   # exactly fits
    monkeypatch.setattr(model_config, "available_memory", lambda: 4 * n - 1)
    with pytest.raises(UserError, match=r"m/config.json: .* at least 0.000758 GB for its 1.89e\+05 weights in "
                                        r"float32, but 0.000758 GB"):
        model_config.check_weights_fit(LLAMA, "m/config.json", 4, "float32")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("stage, extra, stage_kw", [
    ("stage1", [], {}), ("stage1", ["new_rows_only=true"], {"new_rows_from": 472}),
    ("stage2", [], {}), ("stage2", ["embed_lr_base=0"], {"split_rows_at": 472, "train_base_rows": False}),
    ("sft", [], {}), ("sft", ["embed_lr_base=0"], {"split_rows_at": 472, "train_base_rows": False}),
    ("sft", ["embed_lr_base=0.5"], {"split_rows_at": 472}),
])
def test_the_run_estimate_counts_what_peft_trains(tmp_path, tied, stage, extra, stage_kw):
    """LoRA and embedding parts of the run estimate / 16 bytes = the trainable parameters PEFT makes, for
    a tiny model of 512 rows whose first 472 are the base's (as `vocab resize` records): tied or not,
    with the base rows frozen (new_rows_only, embed_lr_base: 0; the trainer splits the matrix there) or
    trained at another lr (split, both trained)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from zhllama import tiny
    from zhllama.modelio import BASE_VOCAB_KEY
    from zhllama.pretrain.adapters import apply_stage, count_trainable
    from zhllama.pretrain.budget import estimate
    from zhllama.pretrain.config import load_config

    config = {**tiny.tiny_llama_config(512).to_dict(), "tie_word_embeddings": tied, BASE_VOCAB_KEY: 472}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    cfg = load_config(None, [f"model={tmp_path}", "out=o", f"stage={stage}", "data=[x]", *extra])
    parts = estimate(cfg, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    trainable, _ = count_trainable(apply_stage(model, cfg.preset(), **stage_kw))
    assert (parts["lora"] + parts["embeddings"]) // 16 == trainable


# -------------------------------------------------------------------------------------------- YAML

def test_yaml_nodes_are_counted_without_expanding():
    """a: &x [1, 2] / b: [*x, *x]: written: the mapping, keys a and b, the list x and its two items, the
    list b = 7; expanded: b holds x twice (1 + 3 + 3) so 1 + (1 + 3) + (1 + 7) = 13; nesting 4."""
    import yaml
    node = yaml.compose("a: &x [1, 2]\nb: [*x, *x]\n", Loader=yaml.SafeLoader)
    assert yamlio._measure(node) == (7, 13, 4)


def test_aliases_may_add_at_most_the_cap():
    """k references to a list of n items add k x (n + 1) nodes: 100 x 100 = 10,000 is the cap, 101 x 100
    is over it."""
    items = ", ".join(["x"] * 99)
    ok = f"a: &a [{items}]\nb: [{', '.join(['*a'] * 100)}]\n"
    assert len(yamlio.load_yaml(ok, "ok.yaml")["b"]) == 100
    over = f"a: &a [{items}]\nb: [{', '.join(['*a'] * 101)}]\n"
    with pytest.raises(ConfigError, match=r"over.yaml: YAML aliases expand .* \(at most 10,000 more"):
        yamlio.load_yaml(over, "over.yaml")


@pytest.mark.parametrize("text, says", [("a: &a [*a]", "recursive"), ("a: " + "[" * 101 + "]" * 101, "nested 102"),
                                        ("a: " + "[" * 3000 + "]" * 3000, "nested too deeply"),
                                        ("a: 1" + "0" * 5000, "4300 digits"), ("a: [", "1: not a valid YAML file")])
def test_unbounded_or_broken_yaml_is_one_user_error(text, says):
    with pytest.raises(UserError, match=f"^f.yaml:.*{says}"):
        yamlio.load_yaml(text, "f.yaml")


# ------------------------------------------------------------------------------------ safetensors

def _st(entries, data: bytes) -> bytes:
    """A safetensors file with the header `entries` (name -> (begin, end) of F32 [n]) over `data`."""
    header = {k: {"dtype": "F32", "shape": [max(0, e - b) // 4], "data_offsets": [b, e]}
              for k, (b, e) in entries.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("entries, size, says", [
    ({"a": (0, 8), "b": (8, 16)}, 16, None),
    ({"a": (0, 8), "b": (4, 12)}, 16, "tensor 'b' at 4..12 overlaps 'a'"),
    ({"a": (0, 8), "b": (12, 20)}, 20, "tensor 'b' at 12..20 leaves a gap after 'a'"),
    ({"a": (0, 8)}, 12, "4 bytes after the last tensor"),
    ({"a": (0, 8), "b": (8, 16)}, 12, "truncated safetensors file"),
    ({"a": (8, 0)}, 8, r"offsets 8..0 do not hold F32 \[0\]"),
])
def test_a_header_must_tile_its_data(tmp_path, entries, size, says):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_st(entries, bytes(size)))
    with open(path, "rb") as f:
        if says is None:
            got, _, _ = read_header(f, path.stat().st_size)
            assert {k: (b, e) for k, (_, _, b, e) in got.items()} == entries
        else:
            with pytest.raises(HeaderError, match=says):
                read_header(f, path.stat().st_size)


# ----------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("parse, good, bad", [
    (float_range(0, 1, above_low=True), ["1", "0.5", "1e-9"], ["0", "nan", "inf", "-inf", "1.0000001", "abc"]),
    (float_range(0, 10), ["0", "10"], ["10.0001", "-0.1", "NaN", "inf"]),
    (int_range(1, 5), ["1", "5"], ["0", "6", "1.5", "nan", str(2 ** 70)]),
    (SEED, ["0", str(2 ** 32 - 1)], ["-1", str(2 ** 32), str(2 ** 70)]),
])
def test_option_types_refuse_nan_inf_and_out_of_range(parse, good, bad):
    for text in good:
        parse(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
