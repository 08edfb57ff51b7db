"""`zhllama serve`: the OpenAI-compatible server on a tiny real LLaMA checkpoint, on loopback."""

import json
import threading
import urllib.error
import urllib.request

import pytest
from conftest import run_cli

from zhllama.sft import selfinstruct as si

# Text for the tiny tokenizer: the self-instruct prompts and some Chinese, so prompts tokenize to a
# few hundred pieces, not thousands of byte-fallback bytes.
_TOKENIZER_TEXT = "\n".join([
    si.load_prompt("selfinstruct_zh.txt"), si.load_prompt("selfinstruct_en.txt"),
    "给出三条保持健康的建议。多运动、均衡饮食、保证睡眠。解释一下什么是光合作用。植物利用光能合成有机物。",
    "推荐几本适合初学者的理财书籍。把这句话翻译成英文：你好。Hello. 指令 输入 输出 <无输入> ###",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: ### Input:",
])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random LLaMA with a tiny SentencePiece tokenizer (byte fallback), built once."""
    from zhllama.tiny import TINY_TEXT, make_tiny_llama, make_tiny_sp
    root = tmp_path_factory.mktemp("serve_model")
    sp = make_tiny_sp(root / "sp" / "tokenizer.model", text=TINY_TEXT + _TOKENIZER_TEXT, vocab_size=800)
    return make_tiny_llama(sp, root / "tiny-zh", max_position_embeddings=4096, seed=0)


@pytest.fixture(scope="session")
def tiny_server(tiny_model):
    """`zhllama serve`'s server on 127.0.0.1, an ephemeral port, shut down after the session."""
    from zhllama.export.serve import load_engine, make_server
    engine = load_engine(tiny_model, template="alpaca", device="cpu", max_new_tokens=64)
    server = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _call(server, path, body=None, raw=None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8"), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8"), e.headers


def _events(text):
    lines = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_models_endpoint(tiny_server):
    status, body, _ = _call(tiny_server, "/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["tiny-zh"]


def test_chat_uses_the_template_and_matches_hf_generate(tiny_server):
    import torch

    from zhllama.sft.examples import encode_chat_prompt
    engine = tiny_server.engine
    messages = [{"role": "user", "content": "解释一下什么是光合作用"}]
    status, body, _ = _call(tiny_server, "/chat/completions", {
        "model": "tiny-zh", "messages": messages, "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    out = json.loads(body)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    # The same ids the SFT training put before a response, then greedy decoding: identical text.
    ids = encode_chat_prompt(engine.tokenizer, engine.template, messages)
    assert out["usage"]["prompt_tokens"] == len(ids)
    with torch.no_grad():
        ref = engine.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    ref_text = engine.tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True)
    if "### Instruction:" not in ref_text:
        assert out["choices"][0]["message"]["content"] == ref_text


def test_streaming_equals_non_streaming(tiny_server):
    body = {"model": "tiny-zh", "messages": [{"role": "system", "content": "你是助手"},
                                            {"role": "user", "content": "推荐几本理财书籍"}],
            "max_tokens": 12, "temperature": 0}
    _, plain, _ = _call(tiny_server, "/chat/completions", body)
    status, text, headers = _call(tiny_server, "/chat/completions", dict(body, stream=True))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    chunks = _events(text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    plain = json.loads(plain)["choices"][0]
    assert streamed == plain["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


def test_completions_stop_strings_and_length(tiny_server):
    prompt = "给出三条保持健康的建议。"
    status, body, _ = _call(tiny_server, "/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    choice = json.loads(body)["choices"][0]
    full = choice["text"]
    assert choice["finish_reason"] in ("length", "stop")
    if choice["finish_reason"] == "length":
        assert json.loads(body)["usage"]["completion_tokens"] == 16
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip("the tiny model produced no text to stop on")
    for stream in (False, True):
        status, body, _ = _call(tiny_server, "/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                                              "stop": [stop], "stream": stream})
        if stream:
            chunks = _events(body)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = json.loads(body)["choices"][0]["text"], json.loads(body)["choices"][0]["finish_reason"]
        assert text == full[:full.find(stop)] and finish == "stop"


def test_bad_requests_get_clear_errors(tiny_server):
    cases = [
        ("/chat/completions", b"{not json", 400, "not JSON"),
        ("/chat/completions", json.dumps({"model": "other", "messages": []}).encode(), 404, "serves 'tiny-zh'"),
        ("/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
        ("/chat/completions", json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(), 400, "role"),
        ("/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(),
         400, "temperature"),
        ("/completions", json.dumps({"prompt": "你好" * 5000}).encode(), 400, "at most 4096"),
        ("/nope", b"{}", 404, "no route"),
    ]
    for path, raw, code, needle in cases:
        status, body, _ = _call(tiny_server, path, raw=raw)
        assert status == code, (path, body)
        assert needle in json.loads(body)["error"]["message"], body
    status, body, _ = _call(tiny_server, "/chat/completions")     # GET
    assert status == 405
    assert tiny_server.engine.lock.acquire(timeout=5)              # no request left the lock held
    tiny_server.engine.lock.release()


def test_serve_help_and_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("serve", "--help")
    assert e.value.code == 0 and "/v1/chat/completions" in capsys.readouterr().out
    assert run_cli("serve", "--model", tmp_path / "missing") == 2
    assert "not a directory" in capsys.readouterr().err
