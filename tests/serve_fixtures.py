"""The server the serve tests share: a tiny real LLaMA checkpoint served by `zhllama serve`'s Server on
loopback, built once per session. A pytest plugin (`pytest_plugins = ["serve_fixtures"]` in each
module that uses it), so test_serve.py and test_serve_limits.py get the same server, not one each."""

import pytest
from serve_helpers import CONTEXT, KEY, CountingTokenizer

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
def serve_model(tmp_path_factory):
    """A tiny random LLaMA with a tiny SentencePiece tokenizer (byte fallback), built once."""
    from zhllama.tiny import TINY_TEXT, make_tiny_llama, make_tiny_sp
    root = tmp_path_factory.mktemp("serve_model")
    sp = make_tiny_sp(root / "sp" / "tokenizer.model", text=TINY_TEXT + _TOKENIZER_TEXT, vocab_size=800)
    return make_tiny_llama(sp, root / "tiny-zh", max_position_embeddings=CONTEXT, seed=0)


@pytest.fixture(scope="session")
def tiny_server(serve_model):
    """`zhllama serve`'s server on 127.0.0.1, an ephemeral port, an API key, a queue of 2 and short
    deadlines (1 s for a request's head or body), shut down after the session."""
    from zhllama.export.inference import load_inference_model
    from zhllama.export.serve import Server
    model = load_inference_model(serve_model, template="alpaca", device="cpu", max_new_tokens=64)
    server = Server(model, "127.0.0.1", 0, api_key=KEY, queue_size=2, head_timeout=1.0, body_timeout=1.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tokenizer_calls(tiny_server, monkeypatch) -> list:
    """The lengths of the texts the served model's tokenizer encodes during the test."""
    calls = []
    monkeypatch.setattr(tiny_server.model, "tokenizer", CountingTokenizer(tiny_server.model.tokenizer, calls))
    return calls
