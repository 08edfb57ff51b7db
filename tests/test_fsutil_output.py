"""Atomic outputs: a killed run's partial temp dir is removed by the next run (only ours), and output
dirs/files get the permissions `mkdir`/`open` would give under the umask (issue 13, items 12 and 13)."""

import os
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from zhllama.fsutil import atomic_dir, atomic_write_text, remove_stale_partials

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from zhllama.fsutil import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sigkilled_writer_leaves_a_partial_that_the_next_run_removes(tmp_path):
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True)
    assert res.returncode == -9
    partials = list(tmp_path.glob(".merged.*.tmp"))
    assert len(partials) == 1 and (partials[0] / "model.safetensors").is_file() and not out.exists()
    assert f".merged.partial-{socket.gethostname()}-" in partials[0].name

    foreign = tmp_path / ".merged.someone-elses.tmp"    # not named by atomic_dir: kept
    foreign.mkdir()
    (foreign / "data").write_text("x")
    remote = tmp_path / ".merged.partial-another-node-1-abcd1234.tmp"   # another host may still write it
    remote.mkdir()
    other = tmp_path / f".merged2.partial-{socket.gethostname()}-1-abcd1234.tmp"  # another output's
    other.mkdir()

    with atomic_dir(out) as tmp:
        (tmp / "ok").write_text("done")
    assert sorted(p.name for p in out.iterdir()) == ["ok"]      # nothing of ours among the outputs
    assert not partials[0].exists()
    assert foreign.is_dir() and remote.is_dir() and other.is_dir()


def test_a_live_writers_partial_is_kept(tmp_path):
    out = tmp_path / "o"
    with atomic_dir(out) as tmp:
        assert remove_stale_partials(out) == []          # our own process: alive
        assert tmp.is_dir()


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664),
                                                       (0o077, 0o700, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "published"
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_bytes(b"w")
            atomic_write_text(tmp / "config.json", "{}\n")
        atomic_write_text(tmp_path / "manifest.json", "{}\n")
    finally:
        os.umask(old)
    assert _mode(out) == dir_mode
    assert _mode(out / "weights.bin") == file_mode
    assert _mode(out / "config.json") == file_mode
    assert _mode(tmp_path / "manifest.json") == file_mode


def test_a_command_run_after_a_killed_one_removes_its_partial(tmp_path, tiny_tokenizer_dir):
    """Through a real command (export `merge` and `vocab merge` both write with atomic_dir)."""
    from zhllama.app.cli import main

    out = tmp_path / "merged_tok"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True)
    assert len(list(tmp_path.glob(".merged_tok.partial-*.tmp"))) == 1
    sp = tiny_tokenizer_dir / "tokenizer.model"
    assert main(["vocab", "merge", "--base", str(sp), "--add", str(sp), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    assert list(tmp_path.glob(".merged_tok*")) == []
