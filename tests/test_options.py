"""Documented options that no other test runs, each against an expectation worked out here:

  merge      --dtype fp16 (one rounding of the fp32 merge; a weight beyond fp16's range refused),
             --template (the chat template of a merge without an SFT adapter), --tokenizer (shipped byte
             for byte; what lets a grown adapter without a tokenizer merge)
  resize     --base-tokenizer (the split of each new token that subword-mean averages)
  generate   --input, --system (the prompt written out by hand), --stop (the greedy text cut by hand)
  translate  --fields (only those fields sent and replaced)
  launchers  DETACH=1 (a new session, immune to SIGHUP, stdin closed, the printed pid, output in the log)
  train      --help imports no torch (docs/architecture.md, rule 4)
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import sentencepiece
import torch
from safetensors.torch import load_file, save_file

from conftest import GROWN_PIECES, REPO, cli_error, grow_tiny, run_cli, subprocess_env, train_adapter
from test_selfinstruct import _Translator  # the scripted translation server
from zhllama.modelio import load_model, load_tokenizer

ZH = "北京是中国的首都，经济持续稳定发展。"


def _weights(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def stage2_adapter(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """A stage-2 adapter (LoRA q,k,v,o + embed_tokens + lm_head) trained in-process on the tiny model."""
    out = tmp_path_factory.mktemp("opt_s2") / "final"
    return train_adapter(load_model(tiny_model_dir), "stage2", out, tiny_tokenizer_dir, run_config={"stage": "stage2"})


# ------------------------------------------------------------------------------------------ merge --dtype fp16

def test_merge_fp16_is_one_rounding_of_the_fp32_merge(tmp_path, tiny_model_dir, stage2_adapter):
    assert run_cli("merge", "--base", tiny_model_dir, "--adapter", stage2_adapter, "--out", tmp_path / "f32") == 0
    assert run_cli("merge", "--base", tiny_model_dir, "--adapter", stage2_adapter, "--out", tmp_path / "f16",
                   "--dtype", "fp16") == 0
    w32, w16 = _weights(tmp_path / "f32"), _weights(tmp_path / "f16")
    assert w32.keys() == w16.keys() and {t.dtype for t in w16.values()} == {torch.float16}
    for k in w32:
        assert torch.equal(w16[k], w32[k].to(torch.float16)), k
    cfg = json.loads((tmp_path / "f16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"


def _base_with(tmp_path, tiny_model_dir, name, value) -> Path:
    """A copy of the tiny model with one element of `name` set to `value`."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (shard,) = base.glob("*.safetensors")
    tensors = load_file(str(shard))
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight",      # untouched by the adapter
                                  "model.layers.0.self_attn.q_proj.weight"])  # LoRA merged into it
def test_merge_fp16_refuses_a_weight_beyond_fp16_range(tmp_path, capsys, tiny_model_dir, stage2_adapter, name):
    base = _base_with(tmp_path, tiny_model_dir, name, 70000.0)     # fp16 holds at most 65504: 70000 -> inf
    err = cli_error(capsys, "merge", "--base", base, "--adapter", stage2_adapter, "--out", tmp_path / "m",
                    "--dtype", "fp16")
    assert err.startswith("zhllama merge: error: ") and name in err and "65504" in err and "--dtype bf16" in err
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    # the same weight fits bf16 (fp32's range): merged and kept, one rounding away
    assert run_cli("merge", "--base", base, "--adapter", stage2_adapter, "--out", tmp_path / "b", "--dtype", "bf16") == 0
    assert float(_weights(tmp_path / "b")[name][0, 0]) == pytest.approx(70000.0, rel=2 ** -8)


# ------------------------------------------------------------------------------- merge --template, --tokenizer

def test_merge_template_ships_that_chat_template_without_an_sft_adapter(tmp_path, tiny_model_dir, stage2_adapter):
    from transformers import AutoTokenizer

    out = tmp_path / "m"
    assert run_cli("merge", "--base", tiny_model_dir, "--adapter", stage2_adapter, "--out", out,
                   "--template", "chinese-alpaca") == 0
    report = json.loads((out / "zhllama_merge.json").read_text())
    assert report["chat_template"]["name"] == "chinese-alpaca"
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": ZH}], add_generation_prompt=True, tokenize=False)
    # Chinese-LLaMA-Alpaca v1's prompt, written out (its "### Response: " ends with a space)
    assert text == (tok.bos_token + "Below is an instruction that describes a task. Write a response that "
                    "appropriately completes the request.\n\n### Instruction:\n" + ZH + "\n\n### Response: ")
    # without --template, a pretraining-only merge ships no chat template
    assert run_cli("merge", "--base", tiny_model_dir, "--adapter", stage2_adapter, "--out", tmp_path / "plain") == 0
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """The tiny tokenizer extended by 4 pieces, the tiny model resized to it, and a stage-2 adapter trained on
    that whose directory holds no tokenizer (as when a user copies only the weights)."""
    root = tmp_path_factory.mktemp("opt_grown")
    big, resized = grow_tiny(root, tiny_model_dir, tiny_tokenizer_dir)
    adapter = train_adapter(load_model(resized), "stage2", root / "s2", big, run_config={"stage": "stage2"})
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (adapter / name).unlink(missing_ok=True)
    return {"tok": big, "adapter": adapter, "rows": len(load_tokenizer(big))}


def test_merge_tokenizer_lets_a_grown_adapter_without_one_merge(tmp_path, capsys, tiny_model_dir, grown):
    err = cli_error(capsys, "merge", "--base", tiny_model_dir, "--adapter", grown["adapter"], "--out", tmp_path / "m")
    assert "--tokenizer" in err and str(grown["rows"]) in err
    out = tmp_path / "m"
    assert run_cli("merge", "--base", tiny_model_dir, "--adapter", grown["adapter"], "--out", out,
                   "--tokenizer", grown["tok"]) == 0
    for name in ("tokenizer.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (grown["tok"] / name).read_bytes(), name
    assert _weights(out)["model.embed_tokens.weight"].shape[0] == grown["rows"] == 3004


def test_merge_tokenizer_replaces_the_shipped_one_and_must_fit_the_rows(tmp_path, capsys, tiny_model_dir,
                                                                         tiny_tokenizer_dir, stage2_adapter, grown):
    mine = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, mine)
    cfg = json.loads((mine / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 777          # a harmless edit that marks this copy
    (mine / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m"
    assert run_cli("merge", "--base", tiny_model_dir, "--adapter", stage2_adapter, "--out", out, "--tokenizer", mine) == 0
    for name in ("tokenizer.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (mine / name).read_bytes(), name
    # tokenizer_config.json is rewritten to load in transformers 4.x and 5.x (docs/publish.md), keeping its keys
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 777
    err = cli_error(capsys, "merge", "--base", tiny_model_dir, "--adapter", stage2_adapter, "--out", tmp_path / "x",
                    "--tokenizer", grown["tok"])
    assert "3004 tokens" in err and "3000 embedding rows" in err


# ------------------------------------------------------------------------------------ resize --base-tokenizer

def test_resize_base_tokenizer_gives_the_split_that_subword_mean_averages(tmp_path, capsys, tiny_model_dir,
                                                                            tiny_tokenizer_dir, grown):
    bare = tmp_path / "bare"          # the checkpoint without its tokenizer: config and weights only
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    err = cli_error(capsys, "vocab", "resize", "--model", bare, "--tokenizer", grown["tok"], "--out", tmp_path / "x")
    assert "--base-tokenizer" in err
    out = tmp_path / "r"
    assert run_cli("vocab", "resize", "--model", bare, "--tokenizer", grown["tok"], "--out", out,
                   "--base-tokenizer", tiny_tokenizer_dir) == 0
    # By hand: each new piece's text, split by plain sentencepiece with the base model (no dummy prefix);
    # its new embed_tokens row is the mean of the base rows of that split.
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tiny_tokenizer_dir / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    old, new = _weights(tiny_model_dir)["model.embed_tokens.weight"], _weights(out)["model.embed_tokens.weight"]
    assert new.shape[0] == 3004 and torch.equal(new[:3000], old)
    for i, piece in enumerate(GROWN_PIECES, start=3000):
        split = sp.encode(piece)
        assert len(split) > 1, piece
        torch.testing.assert_close(new[i], old[split].mean(0), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- generate --input, --system, --stop

def _greedy(model, tok, ids, n):
    """HF's own greedy continuation of `ids`, decoded."""
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def _generate_json(capsys, model_dir, *args) -> dict:
    assert run_cli("generate", "--model", model_dir, "--greedy", "--json", *args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_generate_input_and_system_fill_the_prompt_written_out(capsys, tiny_model_dir, model_tok):
    model, tok = model_tok
    prompt, inp, system = "把下面的句子翻译成英文。", "今天天气很好。", "你是一个翻译。"
    alpaca = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              f"Write a response that appropriately completes the request.\n\n### Instruction:\n{prompt}\n\n"
              f"### Input:\n{inp}\n\n### Response:")
    llama2 = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{prompt} [/INST]"
    for args, text, stop in ((["--template", "alpaca", "--input", inp], alpaca, "### Instruction:"),
                             (["--template", "llama2-chat", "--system", system], llama2, "[INST]")):
        ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
        got = _generate_json(capsys, tiny_model_dir, "--prompt", prompt, "--max-new-tokens", "8", *args)
        assert got["prompt_tokens"] == len(ids), args
        want = _greedy(model, tok, ids, 8).split(stop)[0]
        assert got["response"] == (want.lstrip(" ") if args[1] == "llama2-chat" else want), args


def test_generate_stop_cuts_the_answer_at_the_first_occurrence(capsys, tiny_model_dir, model_tok):
    model, tok = model_tok
    ids = [tok.bos_token_id] + tok.encode("今天天气", add_special_tokens=False)
    full = _greedy(model, tok, ids, 16)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(full) >= 6 and stop.strip() == stop != "", full
    got = _generate_json(capsys, tiny_model_dir, "--no-template", "--prompt", "今天天气", "--max-new-tokens", "16",
                         "--stop", stop)
    assert got["response"] == full[:full.index(stop)] and got["finish_reason"] == "stop"
    assert got["completion_tokens"] < 16


# ------------------------------------------------------------------------------------------ translate --fields

def test_translate_fields_sends_and_replaces_only_those(tmp_path, capsys):
    records = [{"instruction": f"Give tip {i}.", "input": f"ctx {i}", "output": f"Tip {i}.", "note": "keep"}
               for i in range(3)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Translator)
    server.lock, server.n, server.broken, server.down = threading.Lock(), 0, set(), False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "out.jsonl"
    try:
        assert run_cli("translate", "--input", src, "--out", out, "--api-base",
                       f"http://127.0.0.1:{server.server_address[1]}/v1", "--model", "m", "--concurrency", "1",
                       "--fields", "instruction,output") == 0
    finally:
        server.shutdown()
        server.server_close()
    rows = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    assert rows == [{"instruction": f"译:Give tip {i}.", "input": f"ctx {i}", "output": f"译:Tip {i}.", "note": "keep"}
                    for i in range(3)]
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ launchers: DETACH=1

STUB = '''#!{python}
"""Stands in for `python -m deepspeed.launcher.runner ...`: records how it was started, then waits."""
import json, os, signal, sys, time
from pathlib import Path
print("stub started", flush=True)
record = {{"pid": os.getpid(), "sid": os.getsid(0), "sighup_ignored": signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
          "stdin": os.path.realpath("/proc/self/fd/0"), "argv": sys.argv[1:]}}
go, deadline = Path(os.environ["STUB_GO"]), time.time() + 60
while not go.exists() and time.time() < deadline:
    time.sleep(0.05)
Path(os.environ["STUB_OUT"]).write_text(json.dumps(record))
'''


def test_detach_runs_the_launcher_in_its_own_session_immune_to_hangup(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    go, rec = tmp_path / "go", tmp_path / "record.json"
    env = subprocess_env(DETACH=1, PYTHON=stub, GPUS_PER_NODE=2, LOG_DIR=tmp_path / "logs", STUB_GO=go, STUB_OUT=rec)
    res = subprocess.run(["bash", str(REPO / "launch" / "pretrain_stage2.sh"), "model=m", "data=[d]", "out=o"],
                         env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert not rec.exists()                      # the launcher returned while its child still runs
    log = tmp_path / "logs" / "pretrain_stage2_node0.log"
    assert f"follow it with: tail -f {log}" in res.stdout
    pid = int(res.stdout.split("(pid ")[1].split(")")[0])
    go.touch()
    deadline = time.time() + 30
    while not rec.exists() and time.time() < deadline:
        time.sleep(0.05)
    r = json.loads(rec.read_text())
    assert r["pid"] == pid                       # the pid printed is the process to follow
    assert r["sid"] == pid != os.getsid(0)       # setsid: a session of its own, away from the terminal's
    assert r["sighup_ignored"] is True           # nohup
    assert r["stdin"] == "/dev/null"
    assert r["argv"][:2] == ["-m", "deepspeed.launcher.runner"] and "zhllama.app.cli" in r["argv"]
    lines = log.read_text().splitlines()
    assert lines[0].startswith("# ") and "deepspeed.launcher.runner" in lines[0] and "stub started" in lines


# ----------------------------------------------------------------------------------------- train --help is light

def test_train_help_imports_no_torch():
    code = ("import sys\nfrom zhllama.app.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nprint(sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--dry-run" in res.stdout and res.stdout.strip().splitlines()[-1] == "[]"
