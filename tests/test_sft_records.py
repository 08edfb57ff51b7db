"""SFT records: formats, field mapping, weights, and bad records reported with file and line."""

import json
import logging

import pytest

from conftest import shared_path
from zhllama.errors import ConfigError, InputError
from zhllama.sft.records import iter_file, load_records, parse_field_map, RecordStats


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ALPACA = [
    {"instruction": "列出三种颜色。", "input": "", "output": "红、黄、蓝。"},
    {"instruction": "翻译成英文。", "input": "早上好", "output": "Good morning."},
    {"instruction": "Say hi.", "output": "Hi!"},  # input may be absent
]


def test_alpaca_json_array_and_json_lines_give_the_same_records(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(ALPACA, ensure_ascii=False, indent=2), encoding="utf-8")
    lines = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    ra, _ = load_records([arr])
    rl, _ = load_records([lines])
    assert [(r.turns[0].user, r.input, r.turns[0].assistant) for r in ra] == \
           [(r.turns[0].user, r.input, r.turns[0].assistant) for r in rl] == \
           [(x["instruction"], x.get("input", ""), x["output"]) for x in ALPACA]
    # source lines: the line each array element starts on, and each JSON line
    text = arr.read_text(encoding="utf-8").split("\n")
    starts = [i + 1 for i, ln in enumerate(text) if ln.strip() == "{"]
    assert [r.source for r in ra] == [f"{arr}:{n}" for n in starts]
    assert [r.source for r in rl] == [f"{lines}:{n}" for n in (1, 2, 3)]


def test_conversations_sharegpt_and_messages_style(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                           {"from": "human", "value": "再见"}, {"from": "gpt", "value": "再见！"}]},
        {"messages": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": "2"}, {"role": "user", "content": "unanswered"}]},
    ]
    recs, stats = load_records([write_jsonl(tmp_path / "c.jsonl", rows)])
    assert [(t.user, t.assistant) for t in recs[0].turns] == [("你好", "你好！"), ("再见", "再见！")]
    assert recs[0].system is None
    assert recs[1].system == "你是助手。"
    assert [(t.user, t.assistant) for t in recs[1].turns] == [("1+1?", "2")]  # trailing user turn trimmed
    assert recs[1].messages() == [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    assert stats.total_skipped == 0


def test_field_map_for_belle_style_fields_mixed_with_plain_alpaca(tmp_path):
    belle = write_jsonl(tmp_path / "belle.json", [
        {"question": "天空为什么是蓝色的？", "std_answer": "因为瑞利散射。", "class": "open qa"}])
    plain = write_jsonl(tmp_path / "plain.jsonl", ALPACA[:1])
    for fm in ("instruction=question,output=std_answer", {"question": "instruction", "std_answer": "output"}):
        recs, _ = load_records([belle, plain], field_map=fm)
        assert [(r.turns[0].user, r.turns[0].assistant) for r in recs] == [
            ("天空为什么是蓝色的？", "因为瑞利散射。"), ("列出三种颜色。", "红、黄、蓝。")]
    with pytest.raises(InputError, match=r"missing field 'instruction', 'output'.*--field-map"):
        load_records([belle], strict=True)


def test_field_map_errors_name_the_key():
    with pytest.raises(ConfigError, match="'prompt' is not one of"):
        parse_field_map({"prompt": "q", "answer": "a"})
    with pytest.raises(ConfigError, match="canonical=source"):
        parse_field_map("instruction:question")


BAD_CASES = [
    ('{"instruction": "x"}', "missing_field", "missing field 'output'"),
    ('{"instruction": "x", "output": "   "}', "empty_field", "field 'output' is empty"),
    ('{"instruction": "x", "output": 42}', "wrong_type", "field 'output' is a JSON number, not a string"),
    ('{"instruction": ["x"], "output": "y"}', "wrong_type", "field 'instruction' is a JSON array"),
    ('{"instruction": "x", "input": null, "output": "y", "system": 1}', "wrong_type", "field 'system'"),
    ('["not", "an", "object"]', "not_object", "record is a JSON array, not an object"),
    ('{"instruction": "x", "output": "y"', "bad_json", "not valid JSON"),
    ('{"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]}',
     "bad_conversation", "conversations[0]: expected a user message"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}',
     "bad_conversation", "unknown role 'robot'"),
    ('{"conversations": "hello"}', "wrong_type", "field 'conversations' is a JSON string, not a list"),
]


@pytest.mark.parametrize("line, reason, message", BAD_CASES)
def test_bad_jsonl_record_counted_with_file_and_line_or_raised_when_strict(tmp_path, line, reason, message):
    good = json.dumps(ALPACA[0], ensure_ascii=False)
    f = tmp_path / "d.jsonl"
    f.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")  # the bad record is on line 3
    recs, stats = load_records([f])
    assert len(recs) == 2
    assert dict(stats.skipped) == {reason: 1}
    assert stats.first_problems[0].startswith(f"{f}:3: ") and message in stats.first_problems[0]
    with pytest.raises(InputError) as e:
        load_records([f], strict=True)
    assert str(e.value).startswith(f"{f}:3: ") and message in str(e.value)


def test_non_utf8_bytes_in_json_lines_and_in_an_array(tmp_path):
    gbk = "你好".encode("gbk")
    f = tmp_path / "gbk.jsonl"
    f.write_bytes(json.dumps(ALPACA[0], ensure_ascii=False).encode() + b"\n"
                  + b'{"instruction": "' + gbk + b'", "output": "y"}\n')
    recs, stats = load_records([f])
    assert len(recs) == 1 and dict(stats.skipped) == {"bad_utf8": 1}
    assert stats.first_problems[0].startswith(f"{f}:2: not valid UTF-8 (byte 0x")
    assert "field 'instruction'" in stats.first_problems[0] and "iconv" in stats.first_problems[0]

    arr = tmp_path / "gbk.json"
    arr.write_bytes(b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n   "output": "'
                    + gbk + b'"}\n]\n')
    recs, stats = load_records([arr])
    assert len(recs) == 1 and dict(stats.skipped) == {"bad_utf8": 1}
    assert stats.first_problems[0].startswith(f"{arr}:3: ")
    with pytest.raises(InputError, match=f"{arr}:3: not valid UTF-8"):
        load_records([arr], strict=True)


def test_json_array_cut_short_keeps_earlier_records_and_names_the_line(tmp_path):
    full = json.dumps(ALPACA, ensure_ascii=False, indent=2)
    cut = full[: full.index('"Good morning."')]  # inside the second record
    f = tmp_path / "cut.json"
    f.write_text(cut, encoding="utf-8")
    second_start = cut.split("\n").index("  {", 2) + 1
    recs, stats = load_records([f])
    assert len(recs) == 1 and dict(stats.skipped) == {"truncated_array": 1}
    assert stats.first_problems[0].startswith(f"{f}:{second_start}: JSON array cut short")
    with pytest.raises(InputError, match=f"cut.json:{second_start}: JSON array cut short"):
        load_records([f], strict=True)
    # cut after a complete record: ']' missing
    g = tmp_path / "cut2.json"
    g.write_text(full[: full.rindex("]")], encoding="utf-8")
    recs, stats = load_records([g])
    assert len(recs) == 3 and dict(stats.skipped) == {"truncated_array": 1}


def test_array_syntax_error_reports_its_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    recs, stats = load_records([f])
    assert len(recs) == 1 and dict(stats.skipped) == {"bad_json": 1}
    assert stats.first_problems[0].startswith(f"{f}:3: not valid JSON")


def test_skipped_counts_are_logged(tmp_path, caplog):
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps(ALPACA[0]) + "\n" + '{"instruction": "x", "output": ""}\n' + "{oops\n")
    with caplog.at_level(logging.INFO, logger="zhllama.sft.records"):
        recs, stats = load_records([f])
    assert len(recs) == 1 and stats.total_skipped == 2
    log = caplog.text
    assert "skipped 2 bad records (bad_json=1, empty_field=1)" in log
    assert f"{f}:2: field 'output' is empty" in log and f"{f}:3: not valid JSON" in log
    assert f"{f}: 1 valid" in log
    assert stats.as_dict()["skipped"] == {"bad_json": 1, "empty_field": 1}


def test_empty_file_and_all_bad_records_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="empty.jsonl: file is empty"):
        load_records([empty])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n')
    with pytest.raises(InputError, match="no valid SFT record.*missing field"):
        load_records([bad])
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\n")
    with pytest.raises(InputError, match="not an SFT data file"):
        load_records([txt])
    with pytest.raises(InputError, match="no such file"):
        load_records([tmp_path / "missing.json"])


def test_weights_upsample_and_downsample_deterministically(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "x"} for i in range(10)])
    recs, stats = load_records([f"{a}:2", f"{b}:0.5"], seed=1)
    users = [r.turns[0].user for r in recs]
    assert users[:20] == [f"a{i}" for i in range(10)] * 2
    assert len(users) == 25 and len(set(users[20:])) == 5 and all(u.startswith("b") for u in users[20:])
    assert stats.read == {str(a): 10, str(b): 10} and stats.sampled == {str(a): 20, str(b): 5}
    again, _ = load_records([f"{a}:2", f"{b}:0.5"], seed=1)
    assert [r.turns[0].user for r in again] == users
    other, _ = load_records([a, b], weights=[2, 0.5], seed=2)
    assert len(other) == 25
    with pytest.raises(ConfigError, match="2 weights for 1 data specs"):
        load_records([a], weights=[1, 2])
    with pytest.raises(ConfigError, match="weight must be a number >= 0"):
        load_records([f"{a}:-1"])


def test_bundled_sample_loads():
    from pathlib import Path
    import zhllama
    f = Path(zhllama.__file__).parent / "data" / "sft_zh.jsonl"
    if not f.exists():
        pytest.skip("bundled sft_zh.jsonl not present")
    recs, stats = load_records([f], strict=True)
    assert len(recs) == sum(1 for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip())


def test_belle_eval_set_via_field_map():
    f = shared_path("data/sft/belle_eval_set_zh.json")
    rows = [json.loads(ln) for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    answered = [r for r in rows if r["std_answer"].strip()]
    stats = RecordStats()
    recs = list(iter_file(f, {"instruction": "question", "output": "std_answer"}, stats=stats))
    assert len(recs) == len(answered) and dict(stats.skipped) == {"empty_field": len(rows) - len(answered)}
    assert recs[0].turns[0].user == answered[0]["question"]
    assert recs[-1].turns[0].assistant == answered[-1]["std_answer"]


def test_convert_writes_records_that_read_back_unchanged(tmp_path):
    from zhllama.sft.convert import main
    src = write_jsonl(tmp_path / "in.jsonl", ALPACA + [
        {"question": "q?", "std_answer": "a."},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}]},
        {"instruction": "x", "output": ""}])
    out = tmp_path / "out.jsonl"
    assert main([str(src), "--out", str(out), "--field-map", "instruction=question,output=std_answer"]) == 0
    before, _ = load_records([src], field_map="instruction=question,output=std_answer")
    after, stats = load_records([out], strict=True)
    strip = lambda rs: [(r.system, r.input, [(t.user, t.assistant) for t in r.turns]) for r in rs]
    assert strip(after) == strip(before) and len(after) == len(ALPACA) + 2
    assert main([str(src), "--out", str(tmp_path / "o2.jsonl"), "--strict"]) == 2
    assert not (tmp_path / "o2.jsonl").exists()
