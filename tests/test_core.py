"""The shared core: CLI dispatch, corpus reading with clear errors, atomic output."""

import gzip
import json
import subprocess

import pytest

from zhllama import corpus
from zhllama.app.cli import main
from zhllama.errors import InputError, UserError
from zhllama.fsutil import atomic_dir, atomic_write_text


def test_cli_help_lists_commands(capsys):
    from zhllama.app.cli import _available
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: zhllama" in out
    for name in _available():
        assert name in out


def test_cli_unknown_command_fails(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_runs(zhllama_exe):
    res = subprocess.run([zhllama_exe, "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("zhllama ")


def test_expand_inputs_files_dirs_globs(tmp_path):
    (tmp_path / "a.txt").write_text("一\n", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text('{"text": "二"}\n', encoding="utf-8")
    with gzip.open(sub / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("三\n")
    (sub / "ignored.bin").write_bytes(b"\x00")
    got = corpus.expand_inputs([str(tmp_path / "a.txt"), str(sub), str(tmp_path / "*.txt")])
    assert [p.name for p in got] == ["a.txt", "b.jsonl", "c.txt.gz"]
    assert list(corpus.iter_corpus(got)) == ["一", "二", "三"]


def test_missing_input_and_empty_glob(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        corpus.expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(InputError, match="glob matches no file"):
        corpus.expand_inputs([str(tmp_path / "*.txt")])


def test_empty_and_binary_files_rejected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.txt: file is empty"):
        list(corpus.iter_documents(empty))
    binary = tmp_path / "model.txt"
    binary.write_bytes(b"\x0a\x0b\x00\x01binary")
    with pytest.raises(InputError, match="binary"):
        list(corpus.iter_documents(binary))


def test_bad_utf8_counted_or_strict(tmp_path):
    f = tmp_path / "gbk.txt"
    f.write_bytes("好的\n".encode("utf-8") + "中文".encode("gbk") + b"\n" + "再见\n".encode("utf-8"))
    stats = corpus.CorpusStats()
    assert list(corpus.iter_documents(f, stats=stats)) == ["好的", "再见"]
    assert stats.bad_utf8 == 1 and "gbk.txt:2" in stats.first_problems[0]
    with pytest.raises(InputError, match=r"gbk.txt:2: not valid UTF-8"):
        list(corpus.iter_documents(f, strict=True))


def test_jsonl_bad_lines_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "好"}\n[1, 2]\n{"body": "x"}\n{"text": ""}\nnot json\n', encoding="utf-8")
    stats = corpus.CorpusStats()
    assert list(corpus.iter_documents(f, stats=stats)) == ["好"]
    assert (stats.bad_json, stats.missing_field, stats.empty) == (2, 1, 1)
    with pytest.raises(InputError, match=r"d.jsonl:2: JSON line is a list"):
        list(corpus.iter_documents(f, strict=True))
    assert list(corpus.iter_documents(f, text_field="body")) == ["x"]


def test_blank_line_paragraphs(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("第一段\n第二行\n\n\n第二段\n", encoding="utf-8")
    assert list(corpus.iter_documents(f, doc_sep="blank")) == ["第一段\n第二行", "第二段"]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / "done.json", json.dumps({"ok": 1}))
    assert (out / "done.json").exists()
    with pytest.raises(UserError, match="output exists"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
