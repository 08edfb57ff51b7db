"""Bad input is one line naming the file (or key), exit 2, no traceback, nothing half-written.

One table walks every class of bad input (issue 13, items 5-10; issue 24, families 11-13) through every
command that reads that input, running the real CLI in-process (`zhllama.app.cli.main`,
`zhllama.sft.convert.main`): a bug that escapes as an exception fails the test with its traceback.
A second table runs the classes whose regression would hang or eat the machine (alias bombs, configs
of a million layers, sizes that allocate, a model folder shipping code, a server that starts) as real
`zhllama` processes under `tests/bounded.py`, which kills a child past its memory or time cap, so a
regression fails the test instead of taking the runner down. Inputs are tiny and built here.
"""

import gzip
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bounded import ZHLLAMA, run_bounded
from conftest import subprocess_env
from zhllama.app.cli import main as cli_main
from zhllama.sft.convert import main as convert_main

ZH = "今天天气很好，我们去公园散步。人工智能正在改变世界。\n"
EN = "The quick brown fox jumps over the lazy dog.\n"


# ----------------------------------------------------------------------------- bad files

def _varied(body: bytes, n: int = 3000) -> bytes:
    """`body` lines, each tagged with a seeded random number: compresses poorly, so that a .gz cut at
    3/4 still decompresses its first 8 KB (the readers' up-front check) and fails only mid-stream."""
    rng = random.Random(0)
    lines = body.decode("utf-8").splitlines()
    return "".join(f"{rng.getrandbits(64):x} {lines[i % len(lines)]}\n" for i in range(n)).encode("utf-8")


def _gz_truncated(d: Path, name: str, body: bytes) -> Path:
    data = gzip.compress(_varied(body))
    p = d / name
    p.write_bytes(data[: len(data) * 3 // 4])
    return p


def _gz_corrupt(d: Path, name: str, body: bytes) -> Path:
    data = bytearray(gzip.compress(_varied(body)))
    for i in range(len(data) // 2, len(data) - 8, 7):   # damage the second half of the deflate stream
        data[i] ^= 0xFF
    p = d / name
    p.write_bytes(bytes(data))
    return p


def _corrupt_model(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    if how == "truncated":
        st.write_bytes(raw[: 8 + n + (len(raw) - 8 - n) // 2])
    elif how == "flipped-header-byte":
        st.write_bytes(raw[:8] + bytes([raw[8] ^ 0xFF]) + raw[9:])
    elif how == "zero-bytes":
        st.write_bytes(b"")
    elif how == "bad-json":
        st.write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n:])
    elif how == "wrong-shape":
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(st))
        name = next(k for k in tensors if k.endswith("q_proj.weight"))
        tensors[name] = tensors[name][:, :-1].contiguous()
        save_file(tensors, str(st), metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- hostile files (issue 24)

def _evil_py(marker: Path) -> str:
    """Python a model folder ships: importing it leaves `marker` (what the tests look for)."""
    return (f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM\n"
            "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
            "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
            "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data = change(data) if callable(change) else {**data, **change}
    path.write_text(json.dumps(data), encoding="utf-8")


def _variant(src: Path, dst: Path, file: str = None, change=None) -> Path:
    """A copy of the model (or adapter) dir `src` with `file`'s JSON changed (a dict is merged in)."""
    shutil.copytree(src, dst)
    if file is not None:
        _edit_json(dst / file, change)
    return dst


def _rewrite_st_header(st: Path, change) -> None:
    """Rewrite a safetensors file's header with `change(header)` applied, keeping its data bytes."""
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    st.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _overlap(header: dict) -> None:
    """The second tensor in file order starts 4 bytes inside the first (same lengths)."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    b, e = header[names[1]]["data_offsets"]
    header[names[1]]["data_offsets"] = [b - 4, e - 4]


def _negative(header: dict) -> None:
    """The first tensor's offsets start before the data (out of range)."""
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b - 8, e - 8]


def _tiny_adapter(model_dir: Path, out: Path) -> Path:
    """A real SFT LoRA adapter of the tiny model (untrained), saved the way `zhllama train` saves one."""
    from zhllama.modelio import load_model
    from zhllama.pretrain.adapters import apply_stage, save_adapter
    from zhllama.pretrain.presets import STAGES

    save_adapter(apply_stage(load_model(model_dir), STAGES["sft"]), out, tokenizer_dir=model_dir, base_model=model_dir)
    return out


# Nine levels of nine aliases under a real key of a run config: about 400 bytes on disk, 9^9 (387 million)
# strings once anything walks it (copying the config for --dry-run's dump did: 2.6 GB and no end).
BOMB = "stage: sft\nmodel: m\nout: o\ndata: [x.jsonl]\nfield_map:\n" + \
    '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"  {c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
# The same bomb in one `key=value` override (a flow mapping under a real key).
BOMB_OVERRIDE = "field_map={a: &a [x,x,x,x,x,x,x,x,x], " + ", ".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")) + "}"


def _hostile(d: Path, model: Path, tokenizer: Path) -> dict:
    """name -> path of the hostile inputs of issue 24 (model, tokenizer and adapter folders, YAML files),
    plus "marker": the file any shipped Python would write."""
    marker = d / "PWNED"
    out = {"marker": marker}
    for name, file, change in (
            ("automap-tok", "tokenizer_config.json",
             {"auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]}, "tokenizer_class": "EvilTokenizer"}),
            ("automap-cfg", "config.json",
             {"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}})):
        out[name] = _variant(model, d / name, file, change)
        (out[name] / "evil.py").write_text(_evil_py(marker), encoding="utf-8")
    out["class-tok"] = _variant(model, d / "class-tok", "tokenizer_config.json", {"tokenizer_class": "EvilTokenizer"})
    out["type-cfg"] = _variant(model, d / "type-cfg", "config.json", {"model_type": "evil"})
    out["pickle-only"] = _variant(model, d / "pickle-only")
    (out["pickle-only"] / "model.safetensors").unlink()
    (out["pickle-only"] / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    for name, change in (("layers-neg", {"num_hidden_layers": -1}), ("layers-str", {"num_hidden_layers": "2"}),
                         ("maxpos-0", {"max_position_embeddings": 0}), ("kv-heads-3", {"num_key_value_heads": 3}),
                         ("layers-1000", {"num_hidden_layers": 1000}), ("config-list", lambda c: []),
                         ("layers-1e6", {"num_hidden_layers": 10 ** 6}),
                         ("hidden-huge", {"hidden_size": 1 << 20, "intermediate_size": 1 << 20, "head_dim": None}),
                         ("vocab-huge", {"vocab_size": 10 ** 9})):
        out[name] = _variant(model, d / name, "config.json", change)
    # A folder holding only a config.json of a wide model (no weights): what a run's memory estimate reads.
    (d / "wide").mkdir()
    (d / "wide" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 16384, "intermediate_size": 44032, "num_hidden_layers": 100,
        "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 32000}), encoding="utf-8")
    out["wide"] = d / "wide"
    out["tokjson-empty"] = _variant(model, d / "tokjson-empty")
    (out["tokjson-empty"] / "tokenizer.json").write_text("{}", encoding="utf-8")
    (d / "tokjson-only").mkdir()
    (d / "tokjson-only" / "tokenizer.json").write_text("{}", encoding="utf-8")
    out["tokjson-only"] = d / "tokjson-only"
    for name, change in (("st-overlap", _overlap), ("st-negative", _negative)):
        out[name] = _variant(model, d / name)
        _rewrite_st_header(out[name] / "model.safetensors", change)
    adapter = out["adapter"] = _tiny_adapter(model, d / "adapter")
    out["adapter-automap"] = _variant(adapter, d / "adapter-automap", "adapter_config.json",
                                      {"auto_mapping": {"base_model_class": "Evil", "parent_library": "evil"}})
    out["adapter-meta-list"] = _variant(adapter, d / "adapter-meta-list", "zhllama_adapter.json", lambda m: [])
    out["adapter-meta-files"] = _variant(adapter, d / "adapter-meta-files", "zhllama_adapter.json", {"files": [1]})
    out["adapter-cfg-list"] = _variant(adapter, d / "adapter-cfg-list", "adapter_config.json", lambda c: [])
    out["adapter-st-overlap"] = _variant(adapter, d / "adapter-st-overlap")
    (out["adapter-st-overlap"] / "zhllama_adapter.json").unlink()   # no sha256 to catch it first
    _rewrite_st_header(out["adapter-st-overlap"] / "adapter_model.safetensors", _overlap)
    for name, text in (("bomb.yaml", BOMB), ("recursive.yaml", "model: &a [*a]\n"),
                       ("deep.yaml", "model: " + "[" * 5000 + "]" * 5000 + "\n"),
                       ("bigint.yaml", "seed: 1" + "0" * 5000 + "\n")):
        (d / name).write_text(text, encoding="utf-8")
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """name -> path of every bad input, built once."""
    d = tmp_path_factory.mktemp("bad")
    text = (ZH + EN).encode("utf-8")
    jsonl = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in (ZH, EN)).encode("utf-8")
    sft = "".join(json.dumps({"instruction": f"{i} 你好", "output": "你好！"}, ensure_ascii=False) + "\n"
                  for i in range(5)).encode("utf-8")
    out = {
        "gz-truncated.txt": _gz_truncated(d, "cut.txt.gz", text),
        "gz-corrupt.txt": _gz_corrupt(d, "bad.txt.gz", text),
        "gz-truncated.sft": _gz_truncated(d, "cut.jsonl.gz", sft),
        "gz-corrupt.sft": _gz_corrupt(d, "bad.jsonl.gz", sft),
        "gz-truncated.jsonl": _gz_truncated(d, "cut_text.jsonl.gz", jsonl),
    }
    (d / "gbk.txt").write_bytes((ZH * 20).encode("gbk"))
    out["gbk.txt"] = d / "gbk.txt"
    deep = "[" * 10000 + "]" * 10000
    (d / "deep.jsonl").write_text('{"instruction": ' + deep + ', "output": "x"}\n', encoding="utf-8")
    out["nested-10000.sft"] = d / "deep.jsonl"
    (d / "surrogate.jsonl").write_text('{"instruction": "a\\ud800", "output": "b"}\n', encoding="utf-8")
    out["lone-surrogate.sft"] = d / "surrogate.jsonl"
    (d / "a_file").write_text("not a directory\n")
    out["file"] = d / "a_file"
    for how in ("truncated", "flipped-header-byte", "zero-bytes", "bad-json", "wrong-shape"):
        out[f"st-{how}"] = _corrupt_model(tiny_model_dir, d / f"model-{how}", how)
    (d / "gbk.yaml").write_bytes("# 配置\nstage: sft\n".encode("gbk"))
    out["config-gbk"] = d / "gbk.yaml"
    return out | _hostile(d, tiny_model_dir, tiny_tokenizer_dir)


# ----------------------------------------------------------------------------- the table
# (class, command, argv builder, what the error line must name). `t` is the tiny tokenizer dir, `m`
# the tiny model dir, `o` a fresh output path, `b` the bad inputs.

def _train(model, out, *extra):
    return ["train", f"model={model}", f"out={out}", "stage=sft", "data=[x.jsonl]", "max_steps=1", *extra]


def _dry(out, *extra):
    return ["train", "--dry-run", "model=m", f"out={out}", "stage=sft", "data=[x.jsonl]", *extra]


GZ_COMMANDS = [
    ("vocab train", lambda b, t, m, o, f: ["vocab", "train", "--input", b[f], "--out", o, "--vocab-size", "60"]),
    ("vocab report", lambda b, t, m, o, f: ["vocab", "report", "--tokenizer", t, "--text", b[f]]),
    ("data pack", lambda b, t, m, o, f: ["data", "pack", "--tokenizer", t, "--input", b[f], "--out", o,
                                         "--workers", "1"]),
    ("eval", lambda b, t, m, o, f: ["eval", "--model", m, "--text", b[f], "--device", "cpu"]),
]
ST_COMMANDS = [
    ("vocab resize", lambda b, t, m, o, f: ["vocab", "resize", "--model", b[f], "--tokenizer", t, "--out", o]),
    ("eval", lambda b, t, m, o, f: ["eval", "--model", b[f], "--text", SAMPLE, "--device", "cpu"]),
    ("generate", lambda b, t, m, o, f: ["generate", "--model", b[f], "--prompt", "hi", "--greedy",
                                        "--max-new-tokens", "1", "--device", "cpu"]),
    ("train", lambda b, t, m, o, f: _train(b[f], o)),
]
OUT_COMMANDS = [
    ("vocab train", lambda b, t, m, o: ["vocab", "train", "--input", SAMPLE, "--out", o, "--vocab-size", "60"]),
    ("vocab merge", lambda b, t, m, o: ["vocab", "merge", "--base", Path(t) / "tokenizer.model",
                                        "--add", Path(t) / "tokenizer.model", "--out", o]),
    ("vocab resize", lambda b, t, m, o: ["vocab", "resize", "--model", m, "--tokenizer", t, "--out", o]),
    ("data pack", lambda b, t, m, o: ["data", "pack", "--tokenizer", t, "--input", SAMPLE, "--out", o,
                                      "--workers", "1"]),
    ("merge", lambda b, t, m, o: ["merge", "--base", m, "--adapter", m, "--out", o]),
    ("train --dry-run", lambda b, t, m, o: _dry(o)),
    ("train", lambda b, t, m, o: _train(m, o)),
    ("sft.convert", lambda b, t, m, o: ["sft.convert", SFT_SAMPLE, "--out", Path(o) / "x.jsonl"]),
    ("selfinstruct", lambda b, t, m, o: ["selfinstruct", "--seed-tasks", SFT_SAMPLE, "--out", Path(o) / "x.jsonl",
                                         "--num", "2", *API]),
    ("translate", lambda b, t, m, o: ["translate", "--input", SFT_SAMPLE, "--out", Path(o) / "x.jsonl", *API]),
    ("demo", lambda b, t, m, o: ["demo", "--quick", "--out", o]),
]
API = ["--api-base", "http://127.0.0.1:9/v1", "--model", "m"]  # never reached: input is refused first
JSON_COMMANDS = [
    ("sft.convert --strict", lambda b, t, m, o, f: ["sft.convert", b[f], "--out", o, "--strict"]),
    ("sft.convert", lambda b, t, m, o, f: ["sft.convert", b[f], "--out", o]),
    ("selfinstruct", lambda b, t, m, o, f: ["selfinstruct", "--seed-tasks", b[f], "--out", o, "--num", "2", *API]),
    ("translate", lambda b, t, m, o, f: ["translate", "--input", b[f], "--out", o, *API]),
]
CONFIG_VALUES = [("lr=-1", "lr"), ("lr=.nan", "lr"), ("lora_r=0", "lora_r"), ("lora_dropout=1.5", "lora_dropout"),
                 ("betas=[0.9]", "betas"), ("warmup_ratio=5", "warmup_ratio"), ("grad_clip=-1", "grad_clip"),
                 ("epochs=0", "epochs"), ("eval_batches=-1", "eval_batches")]

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "zhllama" / "data" / "zh_sample.txt"
SFT_SAMPLE = REPO / "zhllama" / "data" / "sft_zh.jsonl"


def _cases():
    """(id, argv builder, key naming the bad file in `bad` or a literal the line must name)."""
    cases = []
    for f in ("gz-truncated.txt", "gz-corrupt.txt"):                                   # item 5
        for name, build in GZ_COMMANDS:
            cases.append((f"5 {f} | {name}", lambda b, t, m, o, build=build, f=f: build(b, t, m, o, f), f))
    cases.append(("5 gz-truncated.jsonl | data pack",
                  lambda b, t, m, o: GZ_COMMANDS[2][1](b, t, m, o, "gz-truncated.jsonl"), "gz-truncated.jsonl"))
    for f in ("gz-truncated.sft", "gz-corrupt.sft"):
        cases.append((f"5 {f} | sft.convert", lambda b, t, m, o, f=f: ["sft.convert", b[f], "--out", o], f))
    for f in ("st-truncated", "st-flipped-header-byte", "st-zero-bytes", "st-bad-json", "st-wrong-shape"):  # item 6
        for name, build in ST_COMMANDS:
            cases.append((f"6 {f} | {name}", lambda b, t, m, o, build=build, f=f: build(b, t, m, o, f),
                          f"{f}/model.safetensors"))
    for name, build in OUT_COMMANDS:                                                     # item 7
        cases.append((f"7 out-under-file | {name}",
                      lambda b, t, m, o, build=build: build(b, t, m, Path(b["file"]) / "out"), "file"))
    for f in ("nested-10000.sft", "lone-surrogate.sft"):                                 # item 8
        for name, build in JSON_COMMANDS:
            cases.append((f"8 {f} | {name}", lambda b, t, m, o, build=build, f=f: build(b, t, m, o, f), f))
    for value, key in CONFIG_VALUES:                                                     # item 9
        cases.append((f"9 {value} | train --dry-run", lambda b, t, m, o, value=value: _dry(o, value), f"'{key}'"))
    cases.append(("9 lora_targets=[foo] | train", lambda b, t, m, o: _train(m, o, "lora_targets=[foo]"),
                  "'lora_targets'"))
    cases.append(("9 lora_targets=[foo] | train --dry-run",
                  lambda b, t, m, o: ["train", "--dry-run", f"model={m}", f"out={o}", "stage=sft", "data=[x.jsonl]",
                                      "lora_targets=[q_proj,foo]"], "'foo'"))
    cases.append(("9 config-gbk | train --dry-run",
                  lambda b, t, m, o: ["train", "--dry-run", "--config", b["config-gbk"]], "config-gbk"))
    cases.append(("10 gbk | vocab report", lambda b, t, m, o: ["vocab", "report", "--tokenizer", t,
                                                                "--text", b["gbk.txt"]], "gbk.txt"))
    cases.append(("10 gbk | eval", lambda b, t, m, o: ["eval", "--model", m, "--text", b["gbk.txt"],
                                                        "--device", "cpu"], "gbk.txt"))
    cases.append(("10 --device cuda without a GPU | generate",
                  lambda b, t, m, o: ["generate", "--model", m, "--prompt", "hi", "--device", "cuda"], "--device cuda"))
    cases.append(("10 --device cuda without a GPU | eval",
                  lambda b, t, m, o: ["eval", "--model", m, "--text", SAMPLE, "--device", "cuda"], "--device cuda"))
    return cases


# --------------------------------------------------------------------- issue 24: families 11-13, in-process
# Each reader of a model folder, a tokenizer folder or an adapter, as argv builders of the folder X.

def _gen(x, *extra):
    return ["generate", "--model", x, "--prompt", "hi", "--greedy", "--max-new-tokens", "1", "--device", "cpu", *extra]


MODEL_READERS = [  # commands that read a model folder (config.json, weights)
    ("generate", lambda x, b, t, m, o: _gen(x)),
    ("eval", lambda x, b, t, m, o: ["eval", "--model", x, "--text", SAMPLE, "--device", "cpu"]),
    ("train", lambda x, b, t, m, o: _train(x, o)),
    ("train --dry-run", lambda x, b, t, m, o: ["train", "--dry-run", f"model={x}", f"out={o}", "stage=sft",
                                               "data=[x.jsonl]"]),
    ("vocab resize", lambda x, b, t, m, o: ["vocab", "resize", "--model", x, "--tokenizer", t, "--out", o]),
    ("merge", lambda x, b, t, m, o: ["merge", "--base", x, "--adapter", b["adapter"], "--out", o]),
    ("plan", lambda x, b, t, m, o: ["plan", "--model", x, "--tokens", "1e6", "--gpus", "1"]),
]
WEIGHT_READERS = [r for r in MODEL_READERS if r[0] not in ("train --dry-run", "plan")]  # these read config.json only
TOKENIZER_READERS = [  # commands that load a tokenizer folder with transformers
    ("generate --tokenizer", lambda x, b, t, m, o: _gen(m, "--tokenizer", x)),
    ("eval --tokenizer", lambda x, b, t, m, o: ["eval", "--model", m, "--tokenizer", x, "--text", SAMPLE, "--device", "cpu"]),
    ("train tokenizer=", lambda x, b, t, m, o: _train(m, o, f"tokenizer={x}")),
    ("vocab resize --tokenizer", lambda x, b, t, m, o: ["vocab", "resize", "--model", m, "--tokenizer", x,
                                                         "--out", o]),
    ("merge --tokenizer", lambda x, b, t, m, o: ["merge", "--base", m, "--adapter", b["adapter"], "--tokenizer", x,
                                                  "--out", o]),
    ("vocab report", lambda x, b, t, m, o: ["vocab", "report", "--tokenizer", x, "--text", SAMPLE]),
]
VOCAB_MERGE = ("vocab merge", lambda x, b, t, m, o: ["vocab", "merge", "--base", x, "--add", Path(t) / "tokenizer.model",
                                                    "--out", o])   # ships the base's tokenizer_config.json on
ADAPTER_READERS = [
    ("merge", lambda x, b, t, m, o: ["merge", "--base", m, "--adapter", x, "--out", o]),
    ("train init_adapters", lambda x, b, t, m, o: _train(m, o, f"init_adapters=[{x}]")),
]
TEMPLATE_READERS = [  # in-process where the template is read before anything could block
    ("generate", lambda x, b, t, m, o: _gen(m, "--template", x)),
    ("merge", lambda x, b, t, m, o: ["merge", "--base", m, "--adapter", b["adapter"], "--template", x, "--out", o]),
]
CONFIG_READER = ("train --dry-run", lambda x, b, t, m, o: ["train", "--dry-run", "--config", x])  # a run config file
# (family, bad input, its readers, what the line must name: the file under the input, and the key)
HOSTILE_FILES = [
    ("11", "automap-tok", MODEL_READERS[:3] + TOKENIZER_READERS[2:] + [VOCAB_MERGE], "tokenizer_config.json",
     "'auto_map'"),
    ("11", "automap-cfg", MODEL_READERS + TOKENIZER_READERS[-1:] + [VOCAB_MERGE], "config.json", "'auto_map'"),
    ("11", "class-tok", MODEL_READERS[:3] + TOKENIZER_READERS[2:], "tokenizer_config.json", "'tokenizer_class'"),
    ("11", "type-cfg", MODEL_READERS, "config.json", "'model_type'"),
    ("11", "adapter-automap", ADAPTER_READERS, "adapter_config.json", "'auto_mapping'"),
    ("11", "pickle-only", WEIGHT_READERS, "", "pytorch_model"),
    ("12", "layers-neg", MODEL_READERS, "config.json", "'num_hidden_layers'"),
    ("12", "layers-str", MODEL_READERS, "config.json", "'num_hidden_layers'"),
    ("12", "maxpos-0", MODEL_READERS, "config.json", "'max_position_embeddings'"),
    ("12", "kv-heads-3", MODEL_READERS, "config.json", "'num_key_value_heads'"),
    ("12", "config-list", MODEL_READERS, "config.json", "JSON object"),
    # Huge dimensions where only a meta-device model or headers are built (bounded in-process); the
    # readers that would allocate the weights run in a bounded child (BOUNDED below).
    ("12", "hidden-huge", [r for r in MODEL_READERS if r not in WEIGHT_READERS[:3]], "config.json", "'hidden_size'"),
    ("12", "vocab-huge", [r for r in MODEL_READERS if r not in WEIGHT_READERS[:3]], "config.json", "'vocab_size'"),
    ("13", "tokjson-empty", MODEL_READERS[:3] + TOKENIZER_READERS[2:], "tokenizer.json", ""),
    ("13", "tokjson-only", [("data pack", lambda x, b, t, m, o: ["data", "pack", "--tokenizer", x, "--input", SAMPLE,
                                                                  "--out", o, "--workers", "1"]),
                            TOKENIZER_READERS[-1]], "tokenizer.json", ""),
    ("13", "adapter-meta-list", ADAPTER_READERS, "zhllama_adapter.json", "JSON object"),
    ("13", "adapter-meta-files", ADAPTER_READERS, "zhllama_adapter.json", "'files'"),
    ("13", "adapter-cfg-list", ADAPTER_READERS, "adapter_config.json", "'peft_type'"),
    ("13", "adapter-st-overlap", ADAPTER_READERS, "adapter_model.safetensors", ""),
    ("13", "st-overlap", WEIGHT_READERS, "model.safetensors", "overlaps"),
    ("13", "st-negative", WEIGHT_READERS, "model.safetensors", "offsets -8"),
    ("12", "recursive.yaml", [CONFIG_READER]
     + TEMPLATE_READERS, "", "recursive"),
    ("12", "deep.yaml", [CONFIG_READER]
     + TEMPLATE_READERS, "", "nested"),
    ("12", "bigint.yaml", [CONFIG_READER],
     "", "4300 digits"),
]
# Every number of a run config, out of range (no model: the limits alone).
CONFIG_SIZES = [("global_batch=1000000000000000000000", "'global_batch'", "tokens per optimizer step"),
                ("lora_r=100000000", "'lora_r'", "16 x r x (in + out)"),
                ("micro_batch=1000000000", "'micro_batch'", "tokens in one forward pass"),
                ("block_size=1000000000", "'block_size'", "of token ids per step"),
                ("max_steps=1000000000000000000000000000000", "'max_steps'", ""),
                ("seed=1180591620717411303424", "'seed'", ""), ("epochs=1e300", "'epochs'", ""),
                ("eval_batches=1000000000000", "'eval_batches'", ""), ("keep_last=1000000000", "'keep_last'", ""),
                ("save_every=0", "'save_every'", ""), ("lr=1e9", "'lr'", ""), ("warmup_ratio=.inf", "'warmup_ratio'", ""),
                ("min_lr_ratio=.nan", "'min_lr_ratio'", ""), ("field_map={instruction: 1}", "'field_map'", "")]
# Options of the same kind: NaN, infinity, negative or absurd sizes are argparse errors naming the option.
OPTIONS = [
    ("data pack", ["data", "pack", "--tokenizer", "T", "--input", SAMPLE, "--out", "O", "--unit-mb", "nan"], "--unit-mb"),
    ("data pack", ["data", "pack", "--tokenizer", "T", "--input", SAMPLE, "--out", "O", "--slice-mb", "inf"], "--slice-mb"),
    ("plan", ["plan", "--tokens", "nan", "--gpus", "1"], "--tokens"),
    ("plan", ["plan", "--tokens", "1e9", "--gpus", "1", "--mfu", "nan"], "--mfu"),
    ("plan", ["plan", "--tokens", "1e9", "--gpus", "1", "--global-batch", "1000000000000000000000"], "--global-batch"),
    ("plan", ["plan", "--tokens", "1e9", "--gpus", "1", "--layers", "1000000"], "--layers"),
    ("generate", ["generate", "--model", "M", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    ("generate", ["generate", "--model", "M", "--prompt", "hi", "--top-p", "inf"], "--top-p"),
    ("generate", ["generate", "--model", "M", "--prompt", "hi", "--seed", str(2 ** 70)], "--seed"),
    ("eval", ["eval", "--model", "M", "--text", SAMPLE, "--max-length", "-1"], "--max-length"),
    ("vocab train", ["vocab", "train", "--input", SAMPLE, "--out", "O", "--character-coverage", "nan"],
     "--character-coverage"),
    ("vocab train", ["vocab", "train", "--input", SAMPLE, "--out", "O", "--max-sentence-length", "0"],
     "--max-sentence-length"),
    ("vocab resize", ["vocab", "resize", "--model", "M", "--tokenizer", "T", "--out", "O", "--seed", "-1"], "--seed"),
    ("vocab resize", ["vocab", "resize", "--model", "M", "--tokenizer", "T", "--out", "O", "--max-shard-size", "nan"],
     "--max-shard-size"),
    ("vocab merge", ["vocab", "merge", "--base", "T", "--add", "T", "--out", "O", "--max-vocab", "-5"], "--max-vocab"),
    ("selfinstruct", ["selfinstruct", "--seed-tasks", SFT_SAMPLE, "--out", "O", "--num", "2", "--threshold", "nan",
                      *API], "--threshold"),
    ("translate", ["translate", "--input", SFT_SAMPLE, "--out", "O", "--temperature", "inf", *API], "--temperature"),
    ("demo", ["demo", "--quick", "--out", "O", "--english-share", "nan"], "--english-share"),
]


def _fill(argv, t, m, o):
    return [{"T": t, "M": m, "O": o}.get(a, a) if isinstance(a, str) else a for a in argv]


def _hostile_cases():
    """(id, argv builder, file the line must name (a `bad` key / tail, or a literal), strings it must also hold)."""
    cases = []
    for family, item, readers, file, key in HOSTILE_FILES:
        names = f"{item}/{file}" if file else item
        for cmd, build in readers:
            cases.append((f"{family} {item} | {cmd}",
                          lambda b, t, m, o, build=build, item=item: build(b[item], b, t, m, o), names, (key,)))
    for value, key, note in CONFIG_SIZES:
        cases.append((f"12 {value[:30]} | train --dry-run", lambda b, t, m, o, value=value: _dry(o, value), key, (note,)))
    # With the model's config.json at hand, a size is refused with what it would cost on that model.
    cases.append(("12 lora_r=100000000 on a wide model | train --dry-run",
                  lambda b, t, m, o: ["train", "--dry-run", f"model={b['wide']}", f"out={o}", "stage=sft",
                                      "data=[x.jsonl]", "lora_r=100000000"],
                  "'lora_r' = 100000000", ("for the LoRA weights, gradients and Adam moments", "GB")))
    cases.append(("12 micro_batch=65536 block_size=1048576 | train --dry-run",
                  lambda b, t, m, o: ["train", "--dry-run", f"model={m}", f"out={o}", "stage=sft", "data=[x.jsonl]",
                                      "micro_batch=65536", "block_size=1048576"],
                  "'micro_batch' = 65536", ("activations of one micro batch", "GB")))
    for cmd, argv, option in OPTIONS:
        cases.append((f"13 {option} {argv[argv.index(option) + 1][:12]} | {cmd}",
                      lambda b, t, m, o, argv=argv: _fill(argv, t, m, o), option, ()))
    return cases


CASES = _cases() + _hostile_cases()


def _run(argv):
    argv = [str(a) for a in argv]
    try:
        if argv[0] == "sft.convert":
            return convert_main(argv[1:])
        return cli_main(argv)
    except SystemExit as e:  # argparse
        return e.code


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, bad, tiny_tokenizer_dir, tiny_model_dir, tmp_path, capsys):
    name, build, names, *also = case
    if "cuda" in name:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible: --device cuda is valid here")
    out = tmp_path / "out"
    argv = build(bad, tiny_tokenizer_dir, tiny_model_dir, out)
    code = _run(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, f"{name}: exit {code}\n{err[-3000:]}"
    import torch.distributed
    started = torch.distributed.is_initialized()
    if started:  # one late refusal must not fail every case after it
        torch.distributed.destroy_process_group()
    assert not started, f"{name}: refused only after a process group started"
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    head, _, tail = names.partition("/")
    want = str(Path(bad[head], tail)) if head in bad else names
    assert want in errors[0], f"{name}: {errors[0]!r} does not name {want}"
    for text in (also[0] if also else ()):
        assert text in errors[0], f"{name}: {errors[0]!r} does not say {text!r}"
    ran = bad["marker"].exists()
    bad["marker"].unlink(missing_ok=True)
    assert not ran, f"{name}: code shipped in a model folder ran"
    if "gbk" in name:
        assert "UTF-8" in errors[0] and "empty file" not in errors[0], errors[0]
    # nothing half-written: no output, no temporary sibling. `data pack` is resumable by design: a
    # pack stopped mid-way keeps its finished units in a dir marked in progress (no manifest), which
    # training refuses ("interrupted or failed") and the same command resumes once the input is fixed.
    if "data pack" in name and out.exists():
        from zhllama.errors import UserError
        from zhllama.pretrain.shards import PackedBlocks
        assert not (out / "manifest.json").exists()
        with pytest.raises(UserError, match="interrupted or failed"):
            PackedBlocks(out)
    else:
        assert not out.exists(), f"{name}: left {out}"
    assert not list(tmp_path.glob(".out*")), f"{name}: left {list(tmp_path.glob('.out*'))}"


def test_serve_port_out_of_range_is_an_argparse_error(tiny_model_dir, capsys):
    code = _run(["serve", "--model", tiny_model_dir, "--port", "99999"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--port" in errors[0] and "99999" in errors[0], err


def test_bad_sft_records_are_skipped_without_strict(bad, tmp_path):
    """A 10,000-deep record or a lone surrogate is one skipped record, not the end of the run."""
    mixed = tmp_path / "mixed.jsonl"
    good = json.dumps({"instruction": "你好", "output": "你好！"}, ensure_ascii=False)
    mixed.write_text(good + "\n" + bad["nested-10000.sft"].read_text(encoding="utf-8")
                     + bad["lone-surrogate.sft"].read_text(encoding="utf-8") + good + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert convert_main([str(mixed), "--out", str(out)]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_console_script_prints_one_line(bad, tiny_tokenizer_dir):
    """The same through a real process: exit status 2 and a one-line stderr."""
    res = subprocess.run([sys.executable, "-m", "zhllama.app.cli", "vocab", "report", "--tokenizer",
                          str(tiny_tokenizer_dir), "--text", str(bad["gz-truncated.txt"])],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in res.stderr and len(errors) == 1 and str(bad["gz-truncated.txt"]) in errors[0]


# ------------------------------------------------------------------ issue 24: in a bounded child process
# The classes whose regression would hang, allocate until the machine stops, run shipped code or start a
# server, as the console script runs them. The auto_map reproducer feeds a prompt file whose first line
# is `y` on stdin: the answer transformers' "run the custom code? [y/N]" prompt would read.

def _serve(x, *extra):
    return ["serve", "--model", x, "--port", "0", "--device", "cpu", *extra]


CHILD_READERS = MODEL_READERS + [("serve", lambda x, b, t, m, o: _serve(x))]
LOADERS = [r for r in CHILD_READERS if r[0] in ("generate", "eval", "train", "serve")]  # materialise weights
PROMPTS = "y\n你好\n"
BOUNDED = []
for _item in ("automap-tok", "automap-cfg"):
    _file = "tokenizer_config.json" if _item == "automap-tok" else "config.json"
    for _cmd, _build in (("generate", lambda x, b, t, m, o: ["generate", "--model", x, "--greedy",
                                                            "--max-new-tokens", "1", "--device", "cpu"]),
                         ("eval", lambda x, b, t, m, o: ["eval", "--model", x, "--text", SAMPLE, "--device", "cpu"]),
                         ("serve", lambda x, b, t, m, o: _serve(x))):
        BOUNDED.append((f"11 {_item}, stdin 'y' | {_cmd}", lambda b, t, m, o, bd=_build, it=_item: bd(b[it], b, t, m, o),
                        f"{_item}/{_file}", "'auto_map'"))
BOUNDED += [
    ("11 pickle-only | serve", lambda b, t, m, o: _serve(b["pickle-only"]), "pickle-only", "pytorch_model"),
    # serve names the key with its own way out (--max-context), tests/test_serve_limits.py
    ("12 maxpos-0 | serve", lambda b, t, m, o: _serve(b["maxpos-0"]), "maxpos-0/config.json: max_position_embeddings",
     "--max-context"),
    ("12 bomb.yaml | train --dry-run", lambda b, t, m, o: ["train", "--dry-run", "--config", b["bomb.yaml"]],
     "bomb.yaml", "alias"),
    ("12 bomb.yaml | train", lambda b, t, m, o: ["train", "--config", b["bomb.yaml"]], "bomb.yaml", "alias"),
    ("12 bomb override | train --dry-run", lambda b, t, m, o: _dry(o, BOMB_OVERRIDE), "override 'field_map=", "alias"),
    ("12 bomb.yaml template | generate", lambda b, t, m, o: _gen(m, "--template", b["bomb.yaml"]), "bomb.yaml", "alias"),
    ("12 bomb.yaml template | serve", lambda b, t, m, o: _serve(m, "--template", b["bomb.yaml"]), "bomb.yaml", "alias"),
    ("12 bomb.yaml template | merge", lambda b, t, m, o: ["merge", "--base", m, "--adapter", b["adapter"], "--template",
                                                          b["bomb.yaml"], "--out", o], "bomb.yaml", "alias"),
    ("12 bomb.yaml template | train", lambda b, t, m, o: _train(m, o, f"template={b['bomb.yaml']}"), "bomb.yaml",
     "alias"),
    ("12 global_batch=10^21 | train", lambda b, t, m, o: _train(m, o, "global_batch=" + "1" + "0" * 21),
     "'global_batch' = 1" + "0" * 21, "GB for the token ids of one optimizer step"),
    ("12 lora_r=10^8 | train", lambda b, t, m, o: _train(m, o, "lora_r=100000000"), "'lora_r' = 100000000",
     "GB for the LoRA weights"),
]
# A config of 1,000 layers over shards of 2: refused for the tensors it lacks; a regression would run a
# 1,000-layer model of random weights (minutes of eval or training), hence a bounded child.
for _cmd, _build in WEIGHT_READERS + [("serve", lambda x, b, t, m, o: _serve(x))]:
    BOUNDED.append((f"12 layers-1000 | {_cmd}", lambda b, t, m, o, bd=_build: bd(b["layers-1000"], b, t, m, o),
                    "layers-1000", "'model.layers.2."))
for _item, _key, _readers in (("layers-1e6", "'num_hidden_layers'", CHILD_READERS),
                              ("hidden-huge", "'hidden_size'", LOADERS), ("vocab-huge", "'vocab_size'", LOADERS)):
    for _cmd, _build in _readers:
        BOUNDED.append((f"12 {_item} | {_cmd}", lambda b, t, m, o, bd=_build, it=_item: bd(b[it], b, t, m, o),
                        f"{_item}/config.json", _key))


@pytest.mark.slow
@pytest.mark.parametrize("case", BOUNDED, ids=[c[0] for c in BOUNDED])
def test_hostile_input_in_a_bounded_child(case, bad, tiny_tokenizer_dir, tiny_model_dir, tmp_path):
    """One line, exit 2, within 1.5 GB and 4 minutes (a healthy refusal: under 0.5 GB and seconds), no
    output, and no code from the model folder run."""
    name, build, file, key = case
    out = tmp_path / "out"
    argv = build(bad, tiny_tokenizer_dir, tiny_model_dir, out)
    res = run_bounded([*ZHLLAMA, *argv], max_rss_mb=1500, timeout_s=240, stdin=PROMPTS, cwd=tmp_path,
                      env=subprocess_env())
    head, _, tail = file.partition("/")
    want = str(Path(bad[head], tail)) if head in bad else file
    ran = bad["marker"].exists()
    bad["marker"].unlink(missing_ok=True)   # so one regression fails its own cases only
    assert not ran, f"{name}: code shipped in a model folder ran:\n{res.describe()}"
    res.assert_one_line_error(want, key)
    assert not out.exists(), f"{name}: left {out}"
