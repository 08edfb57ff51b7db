"""Atomic outputs: a killed run's partial temp dir is removed by the next run (only ours), and output
dirs/files get the permissions `mkdir`/`open` would give under the umask (issue 13, items 12 and 13)."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from zhllama.fsutil import PARTIAL_MARKER, atomic_dir, atomic_write_text, remove_stale_partials

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
    assert len(partials) == 1 and (partials[0] / PARTIAL_MARKER).is_file() and not out.exists()

    foreign = tmp_path / ".merged.someone-elses.tmp"    # same name pattern, not made by us: kept
    foreign.mkdir()
    (foreign / "data").write_text("x")
    other = tmp_path / ".merged2.abc.tmp"               # a partial of another output: not ours to judge
    other.mkdir()

    with atomic_dir(out) as tmp:
        (tmp / "ok").write_text("done")
    assert (out / "ok").read_text() == "done" and not (out / PARTIAL_MARKER).exists()
    assert not partials[0].exists()
    assert foreign.is_dir() and other.is_dir()


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
