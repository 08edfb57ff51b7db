"""Bad input is one line naming the file (or key), exit 2, no traceback, nothing half-written.

One table walks every class of bad input (issue 13, items 5-10) through every command that reads that
input, running the real CLI in-process (`zhllama.app.cli.main`, `zhllama.sft.convert.main`): a bug that
escapes as an exception fails the test with its traceback. Inputs are tiny and built here.
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


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir):
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
    return out


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


CASES = _cases()


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
    name, build, names = case
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
    assert not torch.distributed.is_initialized(), f"{name}: refused only after a process group started"
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    head, _, tail = names.partition("/")
    want = str(Path(bad[head], tail)) if head in bad else names
    assert want in errors[0], f"{name}: {errors[0]!r} does not name {want}"
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
