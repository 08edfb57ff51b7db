"""`zhllama serve` against hostile and clumsy input (issue 24): request fields out of range, too many
messages or stop strings, prompts whose rendering (not their content) is over the context, option
values and model configs that would leave a limit off.

Each request-level case asserts: a 400 whose `param` names the field, no tokenizing at all (or, for a
prompt that fits in characters but not in tokens, never more than the character bound), the peak
resident memory of this process (the server runs in it) bounded, and a good request served after it.
Each option or config case runs `zhllama serve` in a child process capped in memory and time
(tests/bounded.py) and asserts one `error:` line naming the option or key, exit 2, no traceback.
Counts: HOSTILE_REQUESTS + CONVERSATIONS (request classes and cases), ACCEPTED (the edges of each
range, served), BAD_OPTIONS and BAD_CONTEXTS (CLI classes and cases)."""

import json
import os
import select
import shutil
import subprocess
import threading
import types

import psutil
import pytest
from bounded import ZHLLAMA, run_bounded
from conftest import subprocess_env
from serve_helpers import CONTEXT, KEY, call

pytest_plugins = ["serve_fixtures"]      # serve_model, tiny_server, tokenizer_calls: shared with test_serve.py

USER = {"role": "user", "content": "你好"}
# Peak RSS growth allowed while one hostile request is handled. Its body is under 8 MiB, and parsed into
# Python objects before it is validated: 2.7 M empty JSON objects, the most an 8 MiB body holds, peak
# at about 200 MiB (issue 24's 230,000 messages, at about 40 MiB).
MAX_GROWTH_MB = 300


class PeakRSS:
    """Samples this process's resident memory every 2 ms inside a `with` block; `grown_mb` is the
    peak over the value at entry."""

    def __enter__(self):
        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def grown_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _chat(**fields):
    return {"messages": [USER], "max_tokens": 2, **fields}


def _assert_still_serves(server):
    status, text, _ = call(server, "/chat/completions", _chat(temperature=0))
    assert status == 200, text


def _empty_messages(n: int) -> bytes:
    """A chat body of `n` empty messages, user and assistant in turn (built when the case runs)."""
    turns = ['{"role": "user", "content": ""}', '{"role": "assistant", "content": ""}']
    return ('{"messages": [' + ", ".join(turns[i % 2] for i in range(n)) + "]}").encode()


def _many(field: bytes, item: bytes) -> bytes:
    """A body whose `field` is a list of as many `item`s as fit under the 8 MiB body limit."""
    n = ((8 << 20) - 64) // (len(item) + 1)
    return b'{"' + field + b'": [' + b",".join([item] * n) + b'], "max_tokens": 1}'


# (class, id, path, body: a dict sent as JSON, raw bytes, or a function making them; the field named)
HOSTILE_REQUESTS = [
    # issue 24: 230,000 empty messages (7 MB) were one "character" and 3.1 M tokens of work
    ("messages", "230k-empty", "/chat/completions", lambda: _empty_messages(230_001), "messages"),
    ("messages", "2.7M-empty-objects", "/chat/completions", lambda: _many(b"messages", b"{}"), "messages"),
    ("messages", "513", "/chat/completions", {"messages": [USER] * 513}, "messages"),
    ("messages", "257-parts", "/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 257}]}, "messages"),
    ("messages", "role-tool", "/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("messages", "out-of-order", "/chat/completions", {"messages": [USER, USER]}, "messages"),
    ("messages", "system-only", "/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "messages"),
    # issue 24: 300,000 stop strings were accepted
    ("stop", "300k", "/chat/completions", lambda: json.dumps(_chat(stop=["ab"] * 300_000)).encode(), "stop"),
    ("stop", "17", "/chat/completions", _chat(stop=["ab"] * 17), "stop"),
    ("stop", "257-chars", "/chat/completions", _chat(stop=["a" * 257]), "stop"),
    ("stop", "1M-chars-string", "/completions", lambda: json.dumps({"prompt": "x", "stop": "a" * (1 << 20)}).encode(),
     "stop"),
    ("stop", "not-a-string", "/chat/completions", _chat(stop=[1]), "stop"),
    ("prompt", "2.7M-strings", "/completions", lambda: _many(b"prompt", b'""'), "prompt"),
    ("prompt", "4M-numbers", "/completions", lambda: _many(b"prompt", b"0"), "prompt"),
    # issue 24: temperature 1e-300 gave a 500 (inf/nan probabilities)
    ("temperature", "1e-300", "/chat/completions", _chat(temperature=1e-300), "temperature"),
    ("temperature", "5e-6", "/chat/completions", _chat(temperature=5e-6), "temperature"),
    ("temperature", "negative", "/chat/completions", _chat(temperature=-0.1), "temperature"),
    ("temperature", "2.5", "/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
    ("temperature", "1e400", "/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                                  b'"temperature": 1e400}', "temperature"),
    ("temperature", "NaN", "/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                                b'"temperature": NaN}', "temperature"),
    ("temperature", "true", "/chat/completions", _chat(temperature=True), "temperature"),
    ("temperature", "string", "/chat/completions", _chat(temperature="0.7"), "temperature"),
    ("top_p", "negative", "/chat/completions", _chat(top_p=-0.1), "top_p"),
    ("top_p", "1.5", "/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("top_p", "Infinity", "/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                               b'"top_p": Infinity}', "top_p"),
    ("top_p", "true", "/chat/completions", _chat(top_p=True), "top_p"),
    # issue 24: seed 2**70 gave a 500 (torch.manual_seed overflow)
    ("seed", "2**70", "/chat/completions", _chat(seed=2**70), "seed"),
    ("seed", "-2**70", "/completions", {"prompt": "x", "seed": -2**70}, "seed"),
    ("seed", "2**63", "/chat/completions", _chat(seed=2**63), "seed"),
    ("seed", "1.5", "/chat/completions", _chat(seed=1.5), "seed"),
    ("seed", "true", "/chat/completions", _chat(seed=True), "seed"),
    ("max_tokens", "0", "/chat/completions", _chat(max_tokens=0), "max_tokens"),
    ("max_tokens", "negative", "/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("max_tokens", "1.5", "/chat/completions", _chat(max_tokens=1.5), "max_tokens"),
    ("max_tokens", "true", "/chat/completions", _chat(max_tokens=True), "max_tokens"),
    ("max_tokens", "completion-0", "/chat/completions",
     {"messages": [USER], "max_completion_tokens": 0}, "max_completion_tokens"),
    ("n", "2", "/chat/completions", _chat(n=2), "n"),
    ("n", "0", "/chat/completions", _chat(n=0), "n"),
    ("n", "2**70", "/completions", {"prompt": "x", "n": 2**70}, "n"),
    ("n", "best_of-3", "/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("penalties", "presence-2.5", "/chat/completions", _chat(presence_penalty=2.5), "presence_penalty"),
    ("penalties", "frequency--3", "/completions", {"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ("penalties", "NaN", "/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                              b'"presence_penalty": NaN}', "presence_penalty"),
    ("stream", "string", "/chat/completions", _chat(stream="yes"), "stream"),
]


@pytest.mark.parametrize("path, body, field, kind", [pytest.param(*c[2:], c[0], id=f"{c[0]}-{c[1]}")
                                                     for c in HOSTILE_REQUESTS])
def test_a_hostile_request_field_is_a_400_naming_it_before_any_work(tiny_server, tokenizer_calls, path, body,
                                                                    field, kind):
    body = body() if callable(body) else body
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert len(raw) < 8 << 20                         # under the body limit: the parser sees it all
    with PeakRSS() as mem:
        status, text, _ = call(tiny_server, path, raw=raw)
    assert status == 400, text[:300]
    error = json.loads(text)["error"]
    assert error["param"] == field and field in error["message"], error
    assert tokenizer_calls == []                      # refused before a character was tokenized
    assert mem.grown_mb < MAX_GROWTH_MB, f"peak RSS grew {mem.grown_mb:.0f} MiB"
    _assert_still_serves(tiny_server)


def _conversation(n_messages: int, content: str):
    return [{"role": ("user", "assistant")[i % 2], "content": content} for i in range(n_messages)]


def test_a_conversation_is_bounded_by_its_rendered_prompt_not_its_content(tiny_server, tokenizer_calls):
    """511 messages whose content alone fits the character bound (the old rule counted only that), but
    which the template renders into 511 turns of "### Instruction: ... ### Response:" and more: refused
    as too long before anything is tokenized."""
    limit = tiny_server.model.max_prompt_chars
    content = "好" * (limit // 511)
    messages = _conversation(511, content)
    assert sum(len(m["content"]) for m in messages) <= limit
    with PeakRSS() as mem:
        status, text, _ = call(tiny_server, "/chat/completions", {"messages": messages})
    error = json.loads(text)["error"]
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "messages"), text[:300]
    assert f"at most {CONTEXT} tokens" in error["message"]
    assert tokenizer_calls == []
    assert mem.grown_mb < MAX_GROWTH_MB, f"peak RSS grew {mem.grown_mb:.0f} MiB"
    _assert_still_serves(tiny_server)


# Prompts within the character bound but over the token budget: tokenized (never more characters than
# the bound), then refused by their token count, before generation.
CONVERSATIONS = [
    ("one message of 2,000 byte-fallback characters (3 tokens each)", [{"role": "user", "content": "龘" * 2000}]),
    ("a system prompt and a question, 6,000 tokens", [{"role": "system", "content": "x"},
                                                      {"role": "user", "content": "龘" * 2000}]),
]


@pytest.mark.parametrize("messages", [pytest.param(m, id=name) for name, m in CONVERSATIONS])
def test_a_prompt_over_the_token_budget_is_refused_after_bounded_tokenizing(tiny_server, tokenizer_calls,
                                                                             messages, monkeypatch):
    generated = []
    monkeypatch.setattr(tiny_server.model.model, "generate", lambda *a, **k: generated.append(1))
    status, text, _ = call(tiny_server, "/chat/completions", {"messages": messages})
    error = json.loads(text)["error"]
    assert (status, error["code"]) == (400, "context_length_exceeded"), text[:300]
    # 2,000 characters of 3 bytes each, byte-fallback: 6,000 tokens and the template's, over 4,096
    tokens = int(error["message"].split("the prompt is ", 1)[1].split(" tokens", 1)[0])
    assert tokens > 6000 and f"at most {CONTEXT}" in error["message"]
    assert 0 < max(tokenizer_calls) <= tiny_server.model.max_prompt_chars
    assert generated == []
    monkeypatch.undo()
    _assert_still_serves(tiny_server)


# The edges of each range are served (200), not refused and not a 500.
ACCEPTED = [
    ("temperature-min", _chat(temperature=1e-5)),
    ("temperature-2", _chat(temperature=2)),
    ("temperature-int-0", _chat(temperature=0)),
    ("top_p-0", _chat(top_p=0, temperature=1)),
    ("top_p-1", _chat(top_p=1, temperature=1)),
    ("seed-int64-max", _chat(seed=2**63 - 1, temperature=1)),
    ("seed-int64-min", _chat(seed=-2**63, temperature=1)),
    ("max_tokens-2**70", _chat(max_tokens=2**70, temperature=0)),
    ("stops-16x256", _chat(stop=["\u0001" * 256] * 16)),
    ("penalties-edges", _chat(presence_penalty=-2, frequency_penalty=2)),
    ("parts-256", {"messages": [{"role": "user", "content": [{"type": "text", "text": "好"}] * 256}],
                   "max_tokens": 2}),
]


@pytest.mark.parametrize("body", [pytest.param(b, id=name) for name, b in ACCEPTED])
def test_the_edges_of_each_range_are_served(tiny_server, body):
    status, text, _ = call(tiny_server, "/chat/completions", body)
    assert status == 200, text[:300]
    usage = json.loads(text)["usage"]
    # max_tokens above --max-new-tokens (64 here) is capped to it
    assert 1 <= usage["completion_tokens"] <= min(body.get("max_tokens", 64), 64)


def test_the_same_seed_samples_the_same_text_at_the_int64_edges(tiny_server):
    """A seed at either end of int64 is used as given: the same seed, the same sample; the other end,
    another sample (temperature 1.5 over 8 tokens of a random model)."""
    texts = []
    for seed in (2**63 - 1, 2**63 - 1, -2**63):
        status, text, _ = call(tiny_server, "/chat/completions", _chat(seed=seed, temperature=1.5, max_tokens=8))
        assert status == 200, text
        texts.append(json.loads(text)["choices"][0]["message"]["content"])
    assert texts[0] == texts[1] != texts[2]


# -- the command's options and the model's context ------------------------------------------------

BAD_OPTIONS = [   # (class, argv after --model DIR, the option the error names)
    ("timeout", ["--timeout", "nan"], "--timeout"),
    ("timeout", ["--timeout", "inf"], "--timeout"),
    ("timeout", ["--timeout", "0"], "--timeout"),
    ("timeout", ["--timeout", "-1"], "--timeout"),
    ("timeout", ["--timeout", "1e9"], "--timeout"),
    ("timeout", ["--timeout", "soon"], "--timeout"),
    ("queue-size", ["--queue-size", "-1"], "--queue-size"),
    ("queue-size", ["--queue-size", "1000000000"], "--queue-size"),
    ("queue-size", ["--queue-size", "2.5"], "--queue-size"),
    ("max-new-tokens", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("max-new-tokens", ["--max-new-tokens", "-5"], "--max-new-tokens"),
    ("max-new-tokens", ["--max-new-tokens", str(10**12)], "--max-new-tokens"),
    ("max-context", ["--max-context", "0"], "--max-context"),
    ("max-context", ["--max-context", "-1"], "--max-context"),
    ("max-context", ["--max-context", str(10**12)], "--max-context"),
    ("max-context", ["--max-context", str(2 * CONTEXT)], "--max-context"),   # over the model's positions
    ("port", ["--port", "70000"], "--port"),
    ("name", ["--name", " "], "--name"),
]


@pytest.mark.parametrize("argv, option", [pytest.param(c[1], c[2], id=f"{c[0]}:{' '.join(c[1])}")
                                          for c in BAD_OPTIONS])
def test_a_bad_option_value_is_one_line_before_anything_loads(serve_model, argv, option):
    res = run_bounded([*ZHLLAMA, "serve", "--model", serve_model, "--port", "0", *argv],
                      max_rss_mb=600, timeout_s=60, env=subprocess_env())
    res.assert_one_line_error(option)


BAD_CONTEXTS = [0, -1, None, 10**12, "4096", True, 4096.5]    # None: the key left out


def _model_with_context(serve_model, tmp_path, value):
    """A copy of the served model whose config.json says `max_position_embeddings: value`."""
    model = tmp_path / "model"
    shutil.copytree(serve_model, model)
    config = json.loads((model / "config.json").read_text())
    if value is None:
        del config["max_position_embeddings"]
    else:
        config["max_position_embeddings"] = value
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("value", BAD_CONTEXTS, ids=repr)
def test_a_config_without_a_usable_context_is_refused_at_start(serve_model, tmp_path, value):
    """issue 24: `max_position_embeddings: 0` turned the prompt cap off. Refused, naming the file and
    the key, before the weights are loaded."""
    model = _model_with_context(serve_model, tmp_path, value)
    res = run_bounded([*ZHLLAMA, "serve", "--model", model, "--port", "0"], max_rss_mb=600, timeout_s=60,
                      env=subprocess_env())
    line = res.assert_one_line_error(f"{model / 'config.json'}: max_position_embeddings", "--max-context")
    assert f"is {value!r}" in line


def test_a_server_object_without_a_context_is_refused(tiny_server):
    """The same rule for a Server made in code: a model whose config has no usable context."""
    from zhllama.errors import ConfigError
    from zhllama.export.inference import InferenceModel
    from zhllama.export.serve import Server
    for positions in (0, None):
        broken = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=positions))
        model = InferenceModel(broken, tiny_server.model.tokenizer, tiny_server.model.template, "broken")
        with pytest.raises(ConfigError, match=f"max_position_embeddings.* is {positions!r}"):
            Server(model, "127.0.0.1", 0)


def _first_line(proc, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def test_max_context_serves_a_model_whose_config_has_none(serve_model, tmp_path):
    """`--max-context 64` on a config with `max_position_embeddings: 0`: it serves, and 64 tokens are
    the budget of a request (a longer prompt is refused, naming 64)."""
    model = _model_with_context(serve_model, tmp_path, 0)
    proc = subprocess.Popen([*ZHLLAMA, "serve", "--model", model, "--port", "0", "--device", "cpu",
                             "--api-key", KEY, "--max-context", "64"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=subprocess_env(), start_new_session=True)
    try:
        line = _first_line(proc, 120)
        assert "serving" in line, line
        server = types.SimpleNamespace(url=line.split(" on ", 1)[1].split()[0])
        status, text, _ = call(server, "/chat/completions", _chat(temperature=0))
        assert status == 200, text
        status, text, _ = call(server, "/completions", {"prompt": "龘" * 30})    # 90 byte tokens + BOS
        assert status == 400 and "at most 64" in json.loads(text)["error"]["message"], text
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
