"""Self-instruct: parsing recorded answers, language-aware filters, the client's retries against a
misbehaving server, resumable output, and the whole loop against `zhllama serve` on loopback."""

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_cli, shared_path

from zhllama.errors import InputError, UserError
from zhllama.sft import selfinstruct as si
from zhllama.sft.api_client import APIClient, APIError

# -- recorded answers ---------------------------------------------------------------------------

# A completion continuing Stanford's prompt after "4. Instruction:" (text-davinci-003 style), cut by
# max_tokens in the middle of task 7.
EN_COMPLETION = """ Suggest three names for a bakery that sells gluten-free bread.
4. Input:
<noinput>
4. Output:
1. The Golden Crust 2. Free Rise Bakery 3. Honest Loaf
###
5. Instruction: Classify the sentiment of the following tweet as positive, negative or neutral.
5. Input:
Just missed my train again. Great start to the week.
5. Output:
Negative
###
6. Instruction: Draw a picture of a cat sitting on a mat.
6. Input:
<noinput>
6. Output:
(a drawing)
###
7. Instruction: Rewrite the sentence so that it uses the passive voice.
7. Input:
The committee approved the new budget on"""

# A chat answer with a preamble, markdown bold and a closing remark.
EN_CHAT = """Sure! Here are more tasks in the same format:

###
**4. Instruction:** Explain the difference between weather and climate in two sentences.
**4. Input:**
<noinput>
**4. Output:**
Weather is the state of the atmosphere at a given moment; climate is the average of the weather over decades.
###
**5. Instruction:** Give me a synonym.
**5. Input:**
happy
**5. Output:**
joyful
###
I hope these help!"""

# A Chinese chat answer: full-width colons, 、 after the number, a missing output, a truncated end.
ZH_CHAT = """好的，以下是新的任务：
###
4、指令：请把下面这句话翻译成英文。
4、输入：
我每天早上七点起床。
4、输出：
I get up at seven every morning.
###
5. 指令：根据下面的描述，判断这是哪种动物。
5. 输入：
它有长长的鼻子和大大的耳朵，生活在非洲和亚洲。
5. 输出：
大象
###
6. 指令：列出三种常见的编程范式
6. 输入：
<无输入>
###
7. 指令：写一首关于秋天的五言绝句。
7. 输入：
<无输入>
7. 输出：
秋风"""

GARBAGE = "▁的的 of of 了 the 我 ，，， 9 9 9 ."


def test_parse_english_completion_drops_truncated_last():
    tasks, dropped = si.parse_response(EN_COMPLETION, finish_reason="length")
    assert [t["instruction"] for t in tasks] == [
        "Suggest three names for a bakery that sells gluten-free bread.",
        "Classify the sentiment of the following tweet as positive, negative or neutral.",
        "Draw a picture of a cat sitting on a mat."]
    assert tasks[0]["input"] == "" and tasks[0]["output"].startswith("1. The Golden Crust")
    assert tasks[1]["input"] == "Just missed my train again. Great start to the week."
    assert tasks[1]["output"] == "Negative"
    assert dropped == Counter(truncated=1)
    # Had the answer stopped normally, task 7 would still lack an output: incomplete.
    tasks, dropped = si.parse_response(EN_COMPLETION, finish_reason="stop")
    assert len(tasks) == 3 and dropped == Counter(incomplete=1)


def test_parse_english_chat_with_stray_text_and_markdown():
    tasks, dropped = si.parse_response(EN_CHAT, "stop")
    assert [t["instruction"] for t in tasks] == [
        "Explain the difference between weather and climate in two sentences.", "Give me a synonym."]
    assert tasks[0]["output"].endswith("over decades.") and "###" not in tasks[1]["output"]
    assert tasks[1] == {"instruction": "Give me a synonym.", "input": "happy", "output": "joyful"}
    assert not dropped


def test_parse_chinese_numbered_list_incomplete_and_truncated():
    tasks, dropped = si.parse_response(ZH_CHAT, "length")
    assert [t["instruction"] for t in tasks] == ["请把下面这句话翻译成英文。", "根据下面的描述，判断这是哪种动物。"]
    assert tasks[0]["output"] == "I get up at seven every morning."
    assert tasks[1]["input"].startswith("它有长长的鼻子")
    assert dropped == Counter(truncated=1, incomplete=1)


def test_parse_garbage_is_counted_not_raised():
    for text in (GARBAGE, "", "4. 输出", "###\n###"):
        tasks, dropped = si.parse_response(text, "stop")
        assert tasks == [] and dropped["unparsable"] == 1


def test_filters_language_aware():
    def reason(inst, lang):
        return si.filter_reason({"instruction": inst, "input": "", "output": "x"}, lang)
    # English: Stanford's rules.
    assert reason("Give three tips for staying healthy.", "en") is None
    assert reason("Sort the list.", "en") == "too_short"
    assert reason("Describe the map of Paris.", "en") == "blacklist"
    assert reason("Describe the mapping of keys.", "en") is None          # whole words only
    assert reason("Write a program that sorts numbers in Python.", "en") == "write_a_program"
    assert reason('"Quote" this sentence for me please.', "en") == "punctuation"
    assert reason("请给出三条保持健康的建议。", "en") == "too_short"          # one "word" to str.split
    assert reason("请 给出 三条 保持 健康 的 建议", "en") == "wrong_language"
    # Chinese: characters, the Chinese blacklist, Chinese punctuation, "mostly Chinese".
    assert reason("给出三条保持健康的建议。", "zh") is None
    assert reason("写首诗", "zh") == "too_short"                             # 3 characters
    assert reason("写" * 301, "zh") == "too_long"
    assert reason("根据下面的描述绘制一张流程图", "zh") == "blacklist"
    assert reason("描述一下这张 image 的内容", "zh") == "blacklist"        # English words too
    assert reason("编写一个程序来计算斐波那契数列", "zh") == "write_a_program"
    assert reason("【重要】总结下面这段话的要点", "zh") == "punctuation"
    assert reason("Give three tips for staying healthy.", "zh") == "wrong_language"
    assert reason("将下面的句子翻译成中文：I like apples", "zh") is None     # an English term or two is fine


def test_filters_keep_the_real_seed_tasks():
    """The human seeds are what good tasks look like: the length and language filters keep them all."""
    for rel, lang in (("data/sft/seed_tasks_belle_zh.json", "zh"), ("data/sft/seed_tasks_alpaca_en.jsonl", "en")):
        seeds = si.load_seed_tasks(shared_path(rel))
        assert len(seeds) == 175
        reasons = Counter(si.filter_reason(t, lang) for t in seeds)
        assert reasons["wrong_language"] == reasons["punctuation"] == 0
        assert reasons[None] >= 170, reasons


def test_prompt_round_trips_through_the_parser():
    seeds = [{"instruction": f"示例任务第{i}号：写一段话", "input": "" if i % 2 else "输入", "output": f"输出{i}"}
             for i in range(3)]
    for lang in ("zh", "en"):
        prompt = si.encode_prompt(seeds, lang, num_tasks=20)
        assert "20" in prompt and prompt.rstrip().endswith(("4. 指令：", "4. Instruction:"))
        tasks, _ = si.parse_response(prompt + " 新的任务：解释一下什么是光合作用\n4. Output: 植物利用光能")
        assert [t["instruction"] for t in tasks][:3] == [s["instruction"] for s in seeds]
        assert tasks[3]["instruction"] == "新的任务：解释一下什么是光合作用"


def test_seed_file_errors_name_the_line(tmp_path):
    good = {"instruction": "给出下面词语的同义词", "instances": [{"input": "惊人地", "output": "令人惊奇地"}]}
    cases = {
        "not json": (json.dumps(good) + "\n{not json\n", 2),
        "no instruction": (json.dumps(good) + "\n\n" + json.dumps({"instances": []}) + "\n", 3),
        "bad instances": (json.dumps(dict(good, instances=[])) + "\n", 1),
        "not object": ("[1, 2]\n", "record 1"),  # a JSON array: records are numbered
    }
    for name, (text, line) in cases.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text(text, encoding="utf-8")
        with pytest.raises(InputError) as e:
            si.load_seed_tasks(f)
        assert f"{f}:{line}" in str(e.value), name
    with pytest.raises(InputError, match="no such"):
        si.load_seed_tasks(tmp_path / "missing.jsonl")


def test_resumable_jsonl_cuts_an_unfinished_batch(tmp_path):
    out = tmp_path / "out.jsonl"
    w = si.ResumableJsonl(out)
    records, state = w.open({"lang": "zh"})
    assert records == []
    w.commit([{"instruction": "一"}, {"instruction": "二"}], state)
    with open(out, "ab") as f:                       # a crash in the middle of the next batch
        f.write(b'{"instruction": "\xe4\xb8\x89"}\n{"instruc')
    records, state = si.ResumableJsonl(out).open({"lang": "zh"})
    assert [r["instruction"] for r in records] == ["一", "二"]
    assert out.read_bytes().endswith("二\"}\n".encode())
    with pytest.raises(UserError, match="different lang"):
        si.ResumableJsonl(out).open({"lang": "en"})


# -- the client against a misbehaving server ----------------------------------------------------

def _ok_body(text, finish="stop"):
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish}]}).encode()


class _Scripted(BaseHTTPRequestHandler):
    """Plays `server.script` in order: 'ok', '500', '429', 'garbage', 'noschema', 'deep' (JSON nested
    too deep to parse), 'slow', '401', 'redirect' (to `server.redirect_to`). Records Authorization
    headers in `server.auth`."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            action = self.server.script.pop(0) if self.server.script else "ok"
            self.server.seen.append(action)
            self.server.auth.append(self.headers.get("Authorization"))
        if action == "slow":
            threading.Event().wait(1.0)
            action = "ok"
        status, body, headers = 200, _ok_body("4. Instruction: ok"), {}
        if action in ("500", "401"):
            status, body = int(action), b'{"error": {"message": "boom"}}'
        elif action == "429":
            status, body, headers = 429, b"slow down", {"Retry-After": "0"}
        elif action == "garbage":
            body = b"<html>502 Bad Gateway</html>"
        elif action == "noschema":
            body = b'{"result": "no choices here"}'
        elif action == "deep":
            body = b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        elif action == "redirect":
            status, body, headers = 307, b"", {"Location": self.server.redirect_to}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def scripted_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.seen, server.auth, server.lock = [], [], [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _client(server, **kw):
    kw = {"max_retries": 4, "backoff": 0.01, "timeout": 5, **kw}
    return APIClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", **kw)


def test_client_retries_errors_and_counts_them(scripted_server):
    scripted_server.script = ["500", "garbage", "429", "noschema", "deep", "ok"]
    client = _client(scripted_server, max_retries=5)
    assert client.chat([{"role": "user", "content": "hi"}]).text == "4. Instruction: ok"
    assert client.stats["requests"] == 6 and client.stats["retries"] == 5 and client.stats["ok"] == 1
    assert {k: v for k, v in client.stats.items() if k.startswith("retry:")} == {
        "retry:http_500": 1, "retry:bad_json": 2, "retry:http_429": 1, "retry:bad_response": 1}


def test_client_gives_up_with_a_clear_message(scripted_server):
    scripted_server.script = ["500"] * 3
    with pytest.raises(APIError, match=r"HTTP 500 .*boom.*gave up after 3 attempts"):
        _client(scripted_server, max_retries=2).chat([])
    scripted_server.script = ["401"]
    client = _client(scripted_server)
    with pytest.raises(APIError, match="HTTP 401.*not retried"):
        client.chat([])
    assert client.stats["requests"] == 1                # a bad key is not worth retrying
    scripted_server.script = ["slow", "slow"]
    client = _client(scripted_server, timeout=0.2, max_retries=1)
    with pytest.raises(APIError, match="no answer within 0.2s"):
        client.chat([])
    assert client.stats["retry:timeout"] == 1


def test_client_endpoint_down(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                             # nothing listens there now
    client = APIClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff=0.01)
    with pytest.raises(APIError, match="cannot connect.*gave up after 3 attempts"):
        client.chat([])
    with pytest.raises(UserError, match="expected an http"):
        APIClient("127.0.0.1:8000", "m")


def test_api_key_rule_env_key_only_over_https_or_loopback(monkeypatch):
    from zhllama.sft.api_client import resolve_api_key
    env = {"OPENAI_API_KEY": "sk-env"}
    for base in ("https://api.openai.com/v1", "http://127.0.0.1:8000/v1", "http://localhost:8000/v1",
                 "http://[::1]:8000/v1", "http://127.3.2.1/v1"):
        assert resolve_api_key(base, None, env) == "sk-env", base
    for base in ("http://10.0.0.5:8000/v1", "http://api.example.org/v1", "http://0.0.0.0:8000/v1",
                 "http://127.0.0.1.example.org/v1"):
        with pytest.raises(UserError, match=r"refusing to send \$OPENAI_API_KEY in clear text.*--api-key"):
            resolve_api_key(base, None, env)
    # An explicit --api-key is sent as given, even over plain http; '' sends none.
    assert resolve_api_key("http://10.0.0.5:8000/v1", "sk-cli", env) == "sk-cli"
    assert resolve_api_key("http://10.0.0.5:8000/v1", "", env) is None
    assert resolve_api_key("http://10.0.0.5:8000/v1", None, {}) is None


def test_api_key_sent_to_the_base_only_never_through_a_redirect(scripted_server, monkeypatch):
    import argparse

    from zhllama.sft.api_client import add_client_arguments, client_from_args
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    other.script, other.seen, other.auth, other.lock = [], [], [], threading.Lock()
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        parser = argparse.ArgumentParser()
        add_client_arguments(parser)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        url = f"http://127.0.0.1:{scripted_server.server_address[1]}/v1"
        client = client_from_args(parser.parse_args(["--api-base", url, "--model", "m", "--backoff", "0.01"]))
        assert client.chat([]).text == "4. Instruction: ok"
        assert scripted_server.auth == ["Bearer sk-env"]        # loopback: the environment's key is sent

        scripted_server.redirect_to = f"http://127.0.0.1:{other.server_address[1]}/v1/chat/completions"
        scripted_server.script = ["redirect"]
        with pytest.raises(APIError, match="redirect.*not followed"):
            client.chat([])
        assert other.seen == [] and other.auth == []            # the key never left for the other host
        assert client.stats["requests"] == 2

        # The environment's key is not sent in clear text to another host: the command stops first.
        args = parser.parse_args(["--api-base", "http://192.0.2.7:8000/v1", "--model", "m"])
        with pytest.raises(UserError, match="refusing"):
            client_from_args(args)
    finally:
        other.shutdown()
        other.server_close()


def test_selfinstruct_refuses_env_key_over_plain_http(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    seeds, out = _write_seeds(tmp_path), tmp_path / "regen.jsonl"
    code = run_cli("selfinstruct", "--seed-tasks", seeds, "--out", out, "--api-base", "http://192.0.2.7:8000/v1",
                   "--model", "m", "--num", "3")
    assert code == 2 and "refusing to send $OPENAI_API_KEY" in capsys.readouterr().err
    assert not out.exists()


def test_generate_keeps_what_was_written_when_the_endpoint_fails(scripted_server, tmp_path):
    """A batch that succeeds is committed; when every request of a batch fails the run stops with a
    message, and the file still holds the earlier batch."""
    seeds = si.load_seed_tasks(_write_seeds(tmp_path))
    answer = ("4. 指令：把下面的句子改写得更正式一些。\n4. 输入：\n我觉得这事儿挺好。\n4. 输出：\n我认为此事甚好。\n###\n"
              "5. 指令：请把下面的句子改写得更加正式一些。\n5. 输入：\n这事儿挺好\n5. 输出：\n此事甚好\n###\n"
              "6. 指令：解释什么是通货膨胀\n6. 输入：\n<无输入>\n6. 输出：\n物价持续上涨。")
    client = _client(scripted_server, max_retries=1, concurrency=1)
    orig = client.generate
    client.generate = lambda prompt, **kw: _fixed(answer)     # a recorded answer for the first batch
    out = tmp_path / "out.jsonl"
    kept, counts = si.generate(seeds, out, client, num=10, lang="zh", batch_size=1, max_requests=1)
    assert [t["instruction"] for t in kept] == ["把下面的句子改写得更正式一些。", "解释什么是通货膨胀"]
    assert counts["similar"] == 1 and counts["kept"] == 2
    client.generate = orig
    scripted_server.script = ["500"] * 10
    with pytest.raises(UserError, match=r"every request of batch 2 failed.*HTTP 500.*2 instructions are safe"):
        si.generate(seeds, out, client, num=10, lang="zh", batch_size=2)
    assert len(out.read_text("utf-8").splitlines()) == 2
    state = json.loads((tmp_path / "out.jsonl.state.json").read_text("utf-8"))
    assert state["counts"]["request_failed"] == 2 and state["counts"]["kept"] == 2


def test_overwrite_keeps_the_old_output_until_the_new_run_finishes(scripted_server, tmp_path):
    """--overwrite whose run fails costs nothing: the old output waits in OUT.previous, a second failed
    --overwrite does not replace it with the first one's unfinished output, and a run that ends drops it."""
    seeds = si.load_seed_tasks(_write_seeds(tmp_path))
    answer = "4. 指令：解释什么是通货膨胀\n4. 输入：\n<无输入>\n4. 输出：\n物价持续上涨。"
    client = _client(scripted_server, max_retries=1, concurrency=1)
    orig = client.generate
    client.generate = lambda prompt, **kw: _fixed(answer)
    out, previous = tmp_path / "out.jsonl", tmp_path / "out.jsonl.previous"
    si.generate(seeds, out, client, num=1, lang="zh", batch_size=1)
    old = out.read_bytes()
    client.generate = orig
    for _ in range(2):
        scripted_server.script = ["500"] * 4
        with pytest.raises(UserError, match=r"every request of batch 1 failed.*kept in .*out\.jsonl\.previous"):
            si.generate(seeds, out, client, num=1, lang="zh", batch_size=1, overwrite=True)
        assert previous.read_bytes() == old and out.read_bytes() == b""
        assert json.loads((tmp_path / "out.jsonl.state.json.previous").read_text("utf-8"))["counts"]["kept"] == 1
    client.generate = lambda prompt, **kw: _fixed(answer)
    kept, _ = si.generate(seeds, out, client, num=1, lang="zh", batch_size=1, overwrite=True)
    assert len(kept) == 1 and out.read_bytes() == old
    assert not previous.exists() and not (tmp_path / "out.jsonl.state.json.previous").exists()


def _fixed(text):
    from zhllama.sft.api_client import Completion
    return Completion(text, "stop")


def _write_seeds(tmp_path):
    rows = [{"instruction": inst, "instances": [{"input": "", "output": out}]} for inst, out in [
        ("给出三条保持健康的建议", "多运动、均衡饮食、保证睡眠。"), ("解释一下什么是光合作用", "植物利用光能合成有机物。"),
        ("推荐几本适合初学者的理财书籍", "《小狗钱钱》《富爸爸穷爸爸》。"), ("把这句话翻译成英文：你好", "Hello."),
    ]]
    f = tmp_path / "seeds.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return f


# -- end to end against `zhllama serve` on loopback ---------------------------------------------

from serve_helpers import KEY  # noqa: E402

pytest_plugins = ["serve_fixtures"]      # tiny_server: the one served tiny model of the serve tests


def _si_args(server, seeds, out, *extra):
    return ["selfinstruct", "--seed-tasks", seeds, "--out", out, "--api-base", server.url, "--model", "tiny-zh",
            "--lang", "zh", "--batch-size", "2", "--concurrency", "2", "--max-tokens", "8",
            "--backoff", "0.01", "--timeout", "60", "--api-key", KEY, *extra]


def test_end_to_end_tiny_model_output_is_rejected_not_fatal(tiny_server, tmp_path, capsys):
    """A tiny random model answers nonsense: every request is made and answered, every answer is
    counted as rejected, and a second run resumes the counts and the seed sampling."""
    seeds, out = _write_seeds(tmp_path), tmp_path / "regen.jsonl"
    state_file = tmp_path / "regen.jsonl.state.json"
    before = tiny_server.model.requests
    assert run_cli(*_si_args(tiny_server, seeds, out, "--num", "5", "--max-requests", "2")) == 0
    assert tiny_server.model.requests - before == 2
    state = json.loads(state_file.read_text("utf-8"))
    counts = Counter(state["counts"])
    assert state["requests_total"] == 2 and state["batches"] == 1
    assert counts["request_failed"] == 0
    rejected = sum(v for k, v in counts.items() if k not in ("kept", "request_failed"))
    # 8 random tokens cannot hold a whole task: nothing kept, and each of the 2 answers counted as rejected
    assert counts["kept"] == 0 and rejected >= 2, counts
    printed = capsys.readouterr().out
    assert str(out) in printed and "requests 2 (ok 2, failed 0" in printed

    # Resume: same command, the state carries on (batch 2 samples other seeds: rng keyed by batch).
    assert run_cli(*_si_args(tiny_server, seeds, out, "--num", "5", "--max-requests", "2", "--api",
                             "completions")) == 0
    state = json.loads(state_file.read_text("utf-8"))
    assert state["requests_total"] == 4 and state["batches"] == 2
    assert tiny_server.model.requests - before == 4


def test_end_to_end_recorded_answers_kept_and_resumed(tiny_server, tmp_path, monkeypatch, capsys):
    """The server's model replaced by recorded answers (HTTP, JSON, client and filters all real):
    tasks are kept and written; a rerun with a larger --num resumes from the file, and the recorded
    answer, now a duplicate of what was kept, is rejected as similar."""
    def recorded(prompt_ids, max_tokens=None, temperature=1.0, top_p=1.0, stop=None, seed=None,
                 on_text=None, template_stop=True):
        with tiny_server.model.lock:
            tiny_server.model.requests += 1
        if on_text is not None:
            on_text(ZH_CHAT)
        return ZH_CHAT, "length", len(prompt_ids), 50
    monkeypatch.setattr(tiny_server.model, "generate", recorded)
    seeds, out = _write_seeds(tmp_path), tmp_path / "regen.jsonl"
    assert run_cli(*_si_args(tiny_server, seeds, out, "--num", "1", "--batch-size", "1")) == 0
    lines = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    # Task 4 is a near-copy of the seed "把这句话翻译成英文：你好": rejected as similar.
    assert lines == [{"instruction": "根据下面的描述，判断这是哪种动物。",
                      "input": "它有长长的鼻子和大大的耳朵，生活在非洲和亚洲。", "output": "大象"}]
    assert run_cli(*_si_args(tiny_server, seeds, out, "--num", "3", "--max-requests", "2")) == 0
    assert [json.loads(x) for x in out.read_text("utf-8").splitlines()] == lines   # nothing new, nothing lost
    counts = json.loads((tmp_path / "regen.jsonl.state.json").read_text("utf-8"))["counts"]
    assert counts == {"kept": 1, "similar": 1 + 2 * 2, "truncated": 3, "incomplete": 3}
    assert "1 instructions (kept 1, rejected 11" in capsys.readouterr().out


def test_end_to_end_endpoint_down_is_a_clear_error(tmp_path, capsys):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    seeds, out = _write_seeds(tmp_path), tmp_path / "regen.jsonl"
    code = run_cli("selfinstruct", "--seed-tasks", seeds, "--out", out, "--api-base", f"http://127.0.0.1:{port}/v1",
                   "--model", "m", "--num", "3", "--max-retries", "1", "--backoff", "0.01", "--batch-size", "2")
    err = capsys.readouterr().err
    assert code == 2
    assert "every request of batch 1 failed" in err and "cannot connect" in err and "resume" in err
    assert len(err.strip().splitlines()) == 1 or err.count("error:") == 1


# -- translate ----------------------------------------------------------------------------------

class _Translator(BaseHTTPRequestHandler):
    """'Translates' the JSON object in the prompt by prefixing each value with 译:. Requests whose
    number is in server.broken get a 500; a record whose instruction contains GARBLE gets prose."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.n += 1
            n = self.server.n
        if n in self.server.broken or self.server.down:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        obj = json.loads(prompt[prompt.index("{"):])
        answer = ("抱歉，我无法翻译。" if "GARBLE" in obj.get("instruction", "")
                  else "```json\n" + json.dumps({k: "译:" + v for k, v in obj.items()}, ensure_ascii=False) + "\n```")
        data = _ok_body(answer)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_translate_keeps_fields_counts_failures_and_resumes(tmp_path, capsys):
    records = [{"id": i, "instruction": f"Give tip number {i}.", "input": "" if i % 2 else f"ctx {i}",
                "output": f"Tip {i}."} for i in range(7)]
    records[3]["instruction"] = "GARBLE this"
    records.append({"id": 7, "instruction": "", "input": "", "output": ""})
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Translator)
    server.lock, server.n, server.broken, server.down = threading.Lock(), 0, {2}, False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    out = tmp_path / "alpaca_zh.jsonl"
    args = ["translate", "--input", src, "--out", out, "--api-base", url, "--model", "m", "--batch-size", "3",
            "--concurrency", "1", "--backoff", "0.01", "--max-retries", "1", "--parse-retries", "1"]
    try:
        # First run: the endpoint goes down after the first batch (3 records).
        orig = _Translator.do_POST

        def flaky(self):
            if self.server.n >= 4:          # request 2 was a retried 500; requests 1-4 make batch 1
                self.server.down = True
            orig(self)
        _Translator.do_POST = flaky
        assert run_cli(*args) == 2
        assert "every request for records 3..5 failed" in capsys.readouterr().err
        first = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
        assert [r["id"] for r in first] == [0, 1, 2]
        _Translator.do_POST = orig
        server.down = False
        assert run_cli(*args) == 0                       # resumes at record 3
        printed = capsys.readouterr().out
    finally:
        _Translator.do_POST = orig
        server.shutdown()
        server.server_close()
    rows = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 4, 5, 6, 7]         # 3 failed, listed in the state
    assert rows[0] == {"id": 0, "instruction": "译:Give tip number 0.", "input": "译:ctx 0", "output": "译:Tip 0."}
    assert rows[1]["input"] == "" and list(rows[1]) == ["id", "instruction", "input", "output"]
    assert rows[-1] == records[-1]                                   # nothing to translate: copied
    state = json.loads((tmp_path / "alpaca_zh.jsonl.state.json").read_text("utf-8"))
    assert state["failed"] == [3] and state["counts"]["failed_bad_translation"] == 1
    assert "6 translated, 1 copied" in printed and "1 failed" in printed


def test_translate_bad_input_names_the_record(tmp_path):
    from zhllama.sft.translate import load_records, parse_translation
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": 3}]), encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.json:record 2: field 'instruction' must be a string"):
        load_records(f, ("instruction", "input", "output"))
    f.write_text('{"instruction": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.json:2: invalid JSON"):
        load_records(f, ("instruction",))
    with pytest.raises(ValueError, match="expected keys"):
        parse_translation('{"instruction": "x"}', ["instruction", "output"])
    assert parse_translation('好的：\n```json\n{"output": "输出"}\n```', ["output"]) == {"output": "输出"}


def test_rate_limiter_spaces_request_starts():
    from zhllama.sft.api_client import RateLimiter
    now, slept = [100.0], []
    limiter = RateLimiter(per_minute=120, clock=lambda: now[0], sleep=slept.append)
    for _ in range(3):
        limiter.wait()                       # three starts at t=100: 0.5 s apart
    assert slept == [0.5, 1.0]
    now[0] = 200.0                           # after a pause, no wait
    limiter.wait()
    assert slept == [0.5, 1.0]
    RateLimiter(0).wait()                    # 0 = no limit, returns at once
