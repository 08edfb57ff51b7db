"""What a merged model carries to other software (issue 14): its SFT chat template, tokenizer files
that transformers 4.x loads too, an Ollama Modelfile, and (when llama.cpp's converter is here) a GGUF
that keeps the template.

transformers 4.x runs in the small venv scripts/setup.sh makes (.venv-tf4, or $ZHLLAMA_TF4_VENV):
those tests skip with a message when it is absent, and fail instead when ZHLLAMA_REQUIRE_TF4=1
(scripts/test.sh sets it, so CI always runs them).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_path, train_adapter
from test_chat_template import CONVERSATIONS, USER_CONTINUE, _split
from zhllama.errors import UserError
from zhllama.export.merge import REPORT, check_manifest, merge_checkpoint
from zhllama.modelio import load_model, load_tokenizer
from zhllama.sft.examples import encode_chat_prompt
from zhllama.sft.templates import Template, get_template
from zhllama.tiny import make_tiny_sp
from zhllama.vocab.merge import merge_tokenizers

REPO = Path(__file__).resolve().parent.parent
ZH_LINES = REPO / "zhllama" / "data" / "zh_sample.txt"
TF4_SCRIPT = REPO / "scripts" / "tf4_tokenizer_check.py"


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """An SFT adapter whose run recorded a user template (as `zhllama train stage=sft` records it)."""
    out = tmp_path_factory.mktemp("deploy_sft") / "final"
    spec = Template.from_dict(USER_CONTINUE).to_dict()
    return train_adapter(load_model(tiny_model_dir), "sft", out, tiny_tokenizer_dir, seed=5,
                          run_config={"stage": "sft", "template": "my-chat.yaml", "template_spec": spec})


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model_dir, sft_adapter):
    out = tmp_path_factory.mktemp("deploy_merged") / "model"
    merge_checkpoint(tiny_model_dir, [sft_adapter], out, ollama_modelfile=".")
    return out


def test_merge_ships_the_recorded_template(merged):
    template = Template.from_dict(USER_CONTINUE)
    jinja = (merged / "chat_template.jinja").read_text(encoding="utf-8")
    cfg = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert jinja == cfg["chat_template"] == template.chat_template()
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    tok = load_tokenizer(merged)  # transformers 5, from the dir alone
    for messages in CONVERSATIONS.values():
        msgs, system, inp = _split(messages)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok(text, add_special_tokens=False)["input_ids"] == encode_chat_prompt(tok, template, msgs, system, inp)
    report = json.loads((merged / REPORT).read_text(encoding="utf-8"))
    assert report["chat_template"]["name"] == "my-chat"
    card = (merged / "README.md").read_text(encoding="utf-8")
    assert "## Chat template" in card and "`my-chat`" in card
    modelfile = (merged / "Modelfile").read_text(encoding="utf-8")
    assert "FROM .\n" in modelfile and "<|user|>{{ $m.Content }}" in modelfile
    assert 'SYSTEM """你是助手。"""' in modelfile and 'PARAMETER stop "<|user|>"' in modelfile
    assert check_manifest(merged) == []


def test_adapter_recording_only_a_builtin_name(tmp_path, tiny_model_dir, sft_adapter):
    """Adapters from before template_spec: the recorded name is resolved in the registry."""
    old = tmp_path / "old_sft"
    shutil.copytree(sft_adapter, old)
    meta = json.loads((old / "zhllama_adapter.json").read_text(encoding="utf-8"))
    meta["run_config"] = {"stage": "sft", "template": "llama2-chat"}
    (old / "zhllama_adapter.json").write_text(json.dumps(meta), encoding="utf-8")
    merge_checkpoint(tiny_model_dir, [old], tmp_path / "m")
    assert (tmp_path / "m" / "chat_template.jinja").read_text(encoding="utf-8") == \
        get_template("llama2-chat").chat_template()


def test_pretraining_only_merge_writes_no_template_and_says_so(tmp_path, tiny_model_dir, tiny_tokenizer_dir):
    stage2 = train_adapter(load_model(tiny_model_dir), "stage2", tmp_path / "s2", tiny_tokenizer_dir,
                            run_config={"stage": "stage2"})
    with pytest.raises(UserError, match="--ollama-modelfile needs an SFT template"):
        merge_checkpoint(tiny_model_dir, [stage2], tmp_path / "x", ollama_modelfile=".")
    assert not (tmp_path / "x").exists()
    merge_checkpoint(tiny_model_dir, [stage2], tmp_path / "m")
    out = tmp_path / "m"
    assert not (out / "chat_template.jinja").exists() and not (out / "Modelfile").exists()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "None: no SFT adapter (a pretraining-only merge" in (out / "README.md").read_text(encoding="utf-8")
    assert load_tokenizer(out).chat_template is None


# ------------------------------------------------------------------------------------------ transformers 4.x

def _tf4_python():
    venv = Path(os.environ.get("ZHLLAMA_TF4_VENV", REPO / ".venv-tf4"))
    py = venv / "bin" / "python"
    if not py.is_file():
        msg = (f"needs the transformers 4.x venv {venv} (bash scripts/setup.sh makes it; "
               "ZHLLAMA_SKIP_TF4=1 skips it there)")
        if os.environ.get("ZHLLAMA_REQUIRE_TF4") == "1":
            pytest.fail(msg + "; ZHLLAMA_REQUIRE_TF4=1")
        pytest.skip(msg)
    return py


def _tf4_check(tok_dir, chat_file=None, lines=ZH_LINES) -> dict:
    args = [str(_tf4_python()), str(TF4_SCRIPT), str(tok_dir), str(lines), "200"]
    if chat_file is not None:
        args.append(str(chat_file))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(env, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_like_sentencepiece(got):
    assert got["transformers"].startswith("4."), got
    assert got["class"] == "PreTrainedTokenizerFast"
    assert got["lines"] == 200 and got["differ"] == 0, got
    assert got["bos_ok"] and got["specials"] == ["<s>", "</s>", "<unk>"] and got["special_ids"] == [1, 2, 0]


def test_transformers4_loads_vocab_merge_output(tmp_path, tiny_tokenizer_dir):
    text = ZH_LINES.read_text(encoding="utf-8")
    add = make_tiny_sp(tmp_path / "zh" / "zh.model", text=text, vocab_size=2600, seed_lines=1)
    merge_tokenizers(tiny_tokenizer_dir / "tokenizer.model", add, tmp_path / "merged_tok")
    _assert_like_sentencepiece(_tf4_check(tmp_path / "merged_tok"))


def test_transformers4_loads_a_llama_merge_like_sentencepiece_on_heldout_news(tmp_path):
    """What docs/deploy.md states: LLaMA + the Chinese pieces `zhllama vocab merge` keeps of Chinese-LLaMA's
    20,000-piece model (16,917), loaded by transformers 4.40, encodes the last 200 news lines of ../shared
    exactly like sentencepiece."""
    news = shared_path("data/zh/news_train.txt")
    report = merge_tokenizers(shared_path("data/llama/tokenizer.model"),
                              shared_path("data/anchors/chinese_llama_sp.model"), tmp_path / "tok")
    assert report["counts"]["added"] == 16917 and report["final_size"] == 32000 + 16917
    lines = tmp_path / "heldout.txt"
    lines.write_text("\n".join(news.read_text(encoding="utf-8").splitlines()[-200:]) + "\n", encoding="utf-8")
    got = _tf4_check(tmp_path / "tok", lines=lines)
    _assert_like_sentencepiece(got)
    assert got["len"] == 48917


def test_transformers4_loads_merged_model_tokenizer_and_chat_template(tmp_path, merged):
    tok = load_tokenizer(merged)
    template = Template.from_dict(USER_CONTINUE)
    cases = []
    for messages in CONVERSATIONS.values():
        msgs, system, inp = _split(messages)
        cases.append({"messages": messages, "ids": encode_chat_prompt(tok, template, msgs, system, inp)})
    (tmp_path / "chat.json").write_text(json.dumps(cases, ensure_ascii=False), encoding="utf-8")
    got = _tf4_check(merged, tmp_path / "chat.json")
    _assert_like_sentencepiece(got)
    assert got["chat_ok"] == got["chat_cases"] == len(CONVERSATIONS)


# ------------------------------------------------------------------------------------------ llama.cpp GGUF

def _converter():
    """(python command prefix, env) for llama.cpp's convert_hf_to_gguf.py, or skip."""
    root = os.environ.get("LLAMA_CPP_DIR")
    if not root or not (Path(root) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("set LLAMA_CPP_DIR to a llama.cpp checkout (convert_hf_to_gguf.py, gguf-py/) to test GGUF "
                    "conversion")
    env = dict(os.environ, PYTHONPATH=str(Path(root) / "gguf-py"), NO_LOCAL_GGUF="")
    return Path(root), env


def convert_and_read(model_dir, out, read: str) -> dict:
    """Convert `model_dir` to the f32 GGUF `out` with llama.cpp's converter, then run `read` (Python that
    gets the GGUF's path as argv[1] and prints JSON) with its gguf-py; returns that JSON."""
    root, env = _converter()
    res = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
                          "--outtype", "f32"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-c", read, str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_gguf_conversion_keeps_vocab_specials_and_chat_template(tmp_path, merged):
    read = ("import json, sys\nfrom gguf import GGUFReader\nr = GGUFReader(sys.argv[1])\n"
            "f = lambda k: r.fields[k].contents() if k in r.fields else None\n"
            "print(json.dumps({k: f(k) for k in ('tokenizer.ggml.model', 'tokenizer.ggml.bos_token_id', "
            "'tokenizer.ggml.eos_token_id', 'tokenizer.ggml.unknown_token_id', 'tokenizer.ggml.add_bos_token', "
            "'tokenizer.chat_template')} | {'n_tokens': len(f('tokenizer.ggml.tokens'))}, ensure_ascii=False))\n")
    got = convert_and_read(merged, tmp_path / "model-f32.gguf", read)
    tok = load_tokenizer(merged)
    assert got["n_tokens"] == len(tok) == json.loads((merged / "config.json").read_text())["vocab_size"]
    assert got["tokenizer.ggml.model"] == "llama"
    assert [got[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown")] == \
        [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    assert got["tokenizer.ggml.add_bos_token"] is True
    assert got["tokenizer.chat_template"] == (merged / "chat_template.jinja").read_text(encoding="utf-8")
