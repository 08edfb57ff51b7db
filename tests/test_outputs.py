"""A failed or concurrent run never costs a good output (issue 24, outputs).

- A full disk (`ulimit -f`: RLIMIT_FSIZE with SIGXFSZ ignored, so the write fails with EFBIG where a
  full disk fails with ENOSPC) while `data pack`, `vocab resize`, `merge`, `vocab merge` and
  `vocab train` write over a previous output: one line naming the output, exit 2, the previous output
  byte-identical and usable, and the same command without the limit completes.
- A pack rebuilt on changed input: the old pack stays complete and readable until the new one is
  swapped in; an interrupted rebuild leaves it in place and resumes.
- Two writers of one `--out`: the second is refused naming the holder (pid, host, command, since),
  for every command that takes the lock; with two real `data pack` runs, the output is the first's.
- What killed runs leave in a folder is cleaned by the next run of any command there (only the dead
  ones'); an old output moved aside by a swap that never finished is put back.
- An unwritable output folder is refused before the work (`vocab train` used to train to the end).
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bounded import ZHLLAMA, run_bounded
from conftest import adamw_steps, subprocess_env, synth_chinese, write_lines
from fsfaults import as_nobody, make_readable, run_with_file_size_limit, world_dir
from zhllama import fsutil
from zhllama.app.cli import main as cli_main
from zhllama.export.merge import check_manifest
from zhllama.outlock import output_lock
from zhllama.pretrain import pack, shards
from zhllama.sft.convert import main as convert_main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "zhllama" / "data" / "zh_sample.txt"
SFT_SAMPLE = REPO / "zhllama" / "data" / "sft_zh.jsonl"
API = ["--api-base", "http://127.0.0.1:9/v1", "--model", "m"]


def _snapshot(d: Path) -> dict:
    """relative path -> sha256 of every file under `d` (what 'byte-identical' compares)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _blocks(d: Path) -> np.ndarray:
    b = shards.PackedBlocks(d)
    return np.stack([b[i] for i in range(len(b))])


def _one_error_line(res, *names) -> str:
    errors = [x for x in res.stderr.splitlines() if "error:" in x]
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(errors) == 1, \
        f"exit {res.returncode}\n{res.stderr[-3000:]}"
    for n in names:
        assert str(n) in errors[0], errors[0]
    return errors[0]


def _leftovers(parent: Path, name: str) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    """A stage-2 adapter after one AdamW step (what `merge` merges)."""
    import torch

    from zhllama.modelio import load_model, load_tokenizer
    from zhllama.pretrain.adapters import apply_stage, save_adapter
    from zhllama.pretrain.presets import STAGES
    out = tmp_path_factory.mktemp("adapter") / "final"
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = apply_stage(load_model(tiny_model_dir), STAGES["stage2"])
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:8]
    x = torch.tensor([[tok.bos_token_id] + tok.encode(t, add_special_tokens=False)[:15] for t in lines
                      if len(tok.encode(t, add_special_tokens=False)) >= 15])
    adamw_steps(model, x, 1)
    save_adapter(model, out, tokenizer_dir=tiny_tokenizer_dir, run_config={"stage": "stage2"})
    return out


# ----------------------------------------------------------------------------- a full disk

def _pack_argv(tok, src, out):
    return ["data", "pack", "--tokenizer", tok, "--input", src, "--out", out, "--workers", "1",
            "--block-size", "32", "--unit-mb", "0.02"]


def test_disk_full_during_pack_rebuild_keeps_the_old_pack_and_the_rerun_completes(tiny_tokenizer_dir, tmp_path):
    src = write_lines(tmp_path / "a.txt", synth_chinese(1500, seed=1))
    out = tmp_path / "pack"
    assert cli_main(_pack_argv(tiny_tokenizer_dir, src, out)) == 0
    before, old_blocks = _snapshot(out), _blocks(out)
    write_lines(src, synth_chinese(1800, seed=2))                # changed input: a rebuild
    res = run_with_file_size_limit([*ZHLLAMA, *_pack_argv(tiny_tokenizer_dir, src, out)], 12_000,
                                   env=subprocess_env())
    line = _one_error_line(res, out, "disk full")
    assert "File too large" in line
    assert _snapshot(out) == before and np.array_equal(_blocks(out), old_blocks)   # still whole, still usable
    assert _leftovers(tmp_path, "pack") == [".pack.pack-next"]       # the rebuild so far: resumable
    assert cli_main(_pack_argv(tiny_tokenizer_dir, src, out)) == 0
    clean = tmp_path / "clean"
    assert cli_main(_pack_argv(tiny_tokenizer_dir, src, clean)) == 0
    assert np.array_equal(_blocks(out), _blocks(clean))         # the new pack, as a fresh one would be
    assert _leftovers(tmp_path, "pack") == []


def test_disk_full_during_first_pack_is_one_line_and_the_rerun_completes(tiny_tokenizer_dir, tmp_path):
    src = write_lines(tmp_path / "a.txt", synth_chinese(1500, seed=3))
    out = tmp_path / "pack"
    res = run_with_file_size_limit([*ZHLLAMA, *_pack_argv(tiny_tokenizer_dir, src, out)], 12_000,
                                   env=subprocess_env())
    _one_error_line(res, out, "disk full")
    assert not (out / "manifest.json").exists()
    assert cli_main(_pack_argv(tiny_tokenizer_dir, src, out)) == 0
    assert len(shards.PackedBlocks(out)) > 0


def test_disk_full_during_resize_keeps_the_old_checkpoint(tiny_model_dir, tiny_tokenizer_dir, tmp_path):
    from zhllama.modelio import load_model
    out = tmp_path / "resized"
    argv = ["vocab", "resize", "--model", tiny_model_dir, "--tokenizer", tiny_tokenizer_dir, "--out", out]
    assert cli_main(argv) == 0
    before = _snapshot(out)
    res = run_with_file_size_limit([*ZHLLAMA, *argv, "--overwrite", "--init", "mean"], 200_000, env=subprocess_env())
    _one_error_line(res, out, "disk full")
    assert _snapshot(out) == before and _leftovers(tmp_path, "resized") == []
    load_model(out)                                           # usable
    assert cli_main([*argv, "--overwrite", "--init", "mean"]) == 0
    assert json.loads((out / "resize_report.json").read_text())["init"] == "mean"


def test_disk_full_during_merge_keeps_the_old_merged_checkpoint(tiny_model_dir, adapter, tmp_path):
    out = tmp_path / "merged"
    argv = ["merge", "--base", tiny_model_dir, "--adapter", adapter, "--out", out]
    assert cli_main(argv) == 0
    before = _snapshot(out)
    res = run_with_file_size_limit([*ZHLLAMA, *argv, "--overwrite", "--dtype", "fp32"], 200_000,
                                   env=subprocess_env())
    _one_error_line(res, out, "disk full")
    assert _snapshot(out) == before and _leftovers(tmp_path, "merged") == []
    check_manifest(out)                                       # every shard's checksum as written
    assert cli_main([*argv, "--overwrite", "--dtype", "fp32"]) == 0
    check_manifest(out)


@pytest.mark.parametrize("command", ["vocab merge", "vocab train"])
def test_disk_full_in_the_tokenizer_commands_keeps_the_old_output(command, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "tok"
    sp = tiny_tokenizer_dir / "tokenizer.model"
    argv = (["vocab", "merge", "--base", sp, "--add", sp, "--out", out] if command == "vocab merge" else
            ["vocab", "train", "--input", SAMPLE, "--out", out, "--vocab-size", "2500", "--threads", "1"])
    assert cli_main(argv) == 0
    before = _snapshot(out)
    res = run_with_file_size_limit([*ZHLLAMA, *argv, "--overwrite"], 20_000, env=subprocess_env())
    _one_error_line(res, out, "disk full")
    assert _snapshot(out) == before and _leftovers(tmp_path, "tok") == []
    assert cli_main([*argv, "--overwrite"]) == 0


# ----------------------------------------------------------------------------- a rebuild in progress

def test_old_pack_stays_usable_until_the_rebuild_is_complete(tiny_tokenizer_dir, tmp_path, caplog):
    src = write_lines(tmp_path / "a.txt", synth_chinese(1500, seed=4))
    out = tmp_path / "pack"
    assert cli_main(_pack_argv(tiny_tokenizer_dir, src, out)) == 0
    old_manifest, old_blocks = shards.read_manifest(out), _blocks(out)
    write_lines(src, synth_chinese(1500, seed=4) + synth_chinese(600, seed=5))
    seen = []

    def check_old_pack(unit):
        seen.append(unit.index)
        assert shards.read_manifest(out) == old_manifest
        assert np.array_equal(_blocks(out), old_blocks)
        if len(seen) == 2:
            raise KeyboardInterrupt            # a Ctrl-C mid-rebuild

    pack.Packer.after_unit = check_old_pack
    try:
        assert cli_main(_pack_argv(tiny_tokenizer_dir, src, out)) == 130
    finally:
        pack.Packer.after_unit = None
    assert len(seen) == 2
    assert shards.read_manifest(out) == old_manifest and np.array_equal(_blocks(out), old_blocks)

    pack.Packer.after_unit = lambda unit: seen.append(("resumed", unit.index))
    try:
        with caplog.at_level("INFO", logger="zhllama.pack"):
            assert cli_main(_pack_argv(tiny_tokenizer_dir, src, out)) == 0
    finally:
        pack.Packer.after_unit = None
    assert "resumed:" in caplog.text
    clean = tmp_path / "clean"
    assert cli_main(_pack_argv(tiny_tokenizer_dir, src, clean)) == 0
    assert np.array_equal(_blocks(out), _blocks(clean))
    assert shards.read_manifest(out)["sources"][0]["size"] == src.stat().st_size
    assert _leftovers(tmp_path, "pack") == []


def test_swap_without_renameat2_and_an_interrupted_swap_is_undone(tmp_path, monkeypatch):
    out = tmp_path / "o"
    with fsutil.atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)      # another OS or filesystem
    with fsutil.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2" and _leftovers(tmp_path, "o") == []
    # killed between moving the old output aside and putting the new one in place:
    dead = _dead_pid()
    aside = tmp_path / f".o.old-{socket.gethostname()}-{dead}-abc123.tmp"
    os.replace(out, aside)
    fsutil.remove_stale_partials(tmp_path / "anything")            # any command's cleanup of the folder
    assert (out / "v").read_text() == "2" and not aside.exists()


def test_an_output_that_is_a_symlink_stays_one(tiny_tokenizer_dir, tmp_path):
    """A data dir linked to another disk: the rebuild replaces the target, the link stays a link."""
    src = write_lines(tmp_path / "a.txt", synth_chinese(600, seed=8))
    target = tmp_path / "disk2" / "pack"
    target.parent.mkdir()
    link = tmp_path / "pack"
    link.symlink_to(target, target_is_directory=True)
    assert cli_main(_pack_argv(tiny_tokenizer_dir, src, link)) == 0
    write_lines(src, synth_chinese(700, seed=9))
    assert cli_main(_pack_argv(tiny_tokenizer_dir, src, link)) == 0
    assert link.is_symlink() and shards.read_manifest(target)["sources"][0]["size"] == src.stat().st_size
    with fsutil.atomic_dir(link, overwrite=True) as tmp:
        (tmp / "x").write_text("1")
    assert link.is_symlink() and (target / "x").read_text() == "1"
    assert _leftovers(tmp_path, "pack") == [] and _leftovers(target.parent, "pack") == []


# ----------------------------------------------------------------------------- two writers

HOLDER = textwrap.dedent("""
    import sys
    from zhllama.outlock import output_lock
    with output_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()
""")


def _hold(out: Path, command: str):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), command], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert p.stdout.readline().strip() == "held"
    return p


WRITERS = {
    "data pack": lambda t, m, a, o: ["data", "pack", "--tokenizer", t, "--input", SAMPLE, "--out", o, "--workers", "1"],
    "vocab train": lambda t, m, a, o: ["vocab", "train", "--input", SAMPLE, "--out", o, "--vocab-size", "60"],
    "vocab merge": lambda t, m, a, o: ["vocab", "merge", "--base", Path(t) / "tokenizer.model",
                                       "--add", Path(t) / "tokenizer.model", "--out", o],
    "vocab resize": lambda t, m, a, o: ["vocab", "resize", "--model", m, "--tokenizer", t, "--out", o],
    "merge": lambda t, m, a, o: ["merge", "--base", m, "--adapter", a, "--out", o],
    "train": lambda t, m, a, o: ["train", f"model={m}", f"out={o}", "stage=sft", f"data=[{SFT_SAMPLE}]",
                                 "max_steps=1"],
    "sft.convert": lambda t, m, a, o: ["sft.convert", SFT_SAMPLE, "--out", o],
    "selfinstruct": lambda t, m, a, o: ["selfinstruct", "--seed-tasks", SFT_SAMPLE, "--out", o, "--num", "2", *API],
    "translate": lambda t, m, a, o: ["translate", "--input", SFT_SAMPLE, "--out", o, *API],
    "eval --benchmark": lambda t, m, a, o: ["eval", "--benchmark", "ceval", "--data", o.parent / "ceval",
                                            "--model", m, "--out", o],
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_second_writer_is_refused_naming_the_holder(command, tiny_tokenizer_dir, tiny_model_dir, adapter,
                                                   tmp_path, capsys):
    out = tmp_path / ("out.jsonl" if command in ("sft.convert", "selfinstruct", "translate") else "out")
    holder = _hold(out, "zhllama something --out " + str(out))
    try:
        argv = [str(a) for a in WRITERS[command](tiny_tokenizer_dir, tiny_model_dir, adapter, out)]
        code = convert_main(argv[1:]) if argv[0] == "sft.convert" else cli_main(argv)
        err = capsys.readouterr().err
        errors = [x for x in err.splitlines() if "error:" in x]
        assert code == 2 and "Traceback" not in err and len(errors) == 1, err
        assert f"{out}: another run is writing" in errors[0]
        assert f"pid {holder.pid} on {socket.gethostname()}, since " in errors[0] and "zhllama something" in errors[0]
        assert not out.exists()
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert _leftovers(tmp_path, out.name) == []                  # the lock file goes with its holder


PAUSED_PACK = textwrap.dedent("""
    import os, sys, time
    from zhllama.app.cli import main
    from zhllama.pretrain import pack
    def pause(unit):
        open(sys.argv[1], "w").close()
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.02)
    pack.Packer.after_unit = pause
    sys.exit(main(sys.argv[3:]))
""")


def test_two_real_packs_into_one_out_the_second_is_refused(tiny_tokenizer_dir, tmp_path):
    a = write_lines(tmp_path / "a.txt", synth_chinese(600, seed=6))
    b = write_lines(tmp_path / "b.txt", synth_chinese(600, seed=7))
    out = tmp_path / "pack"
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_PACK, paused, go,
                              *map(str, _pack_argv(tiny_tokenizer_dir, a, out))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        second = run_bounded([*ZHLLAMA, *_pack_argv(tiny_tokenizer_dir, b, out)], max_rss_mb=1500, timeout_s=120,
                             env=subprocess_env())
        line = second.assert_one_line_error(out, f"pid {first.pid}", "zhllama data pack", "since")
        assert "another run is writing" in line
    finally:
        go.touch()
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert shards.read_manifest(out)["sources"][0]["path"] == str(a.resolve())   # the first run's output


# ----------------------------------------------------------------------------- what killed runs leave

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from zhllama.fsutil import atomic_dir
    from zhllama.outlock import output_lock
    with output_lock(sys.argv[1], "killed"), atomic_dir(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_of_any_command_in_the_folder_removes_stale_temps(tiny_tokenizer_dir, tmp_path):
    # a killed writer of `merged`: its partial dir (and its lock file, no longer held)
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "merged")], env=subprocess_env())
    assert res.returncode == -9
    host, dead = socket.gethostname(), _dead_pid()
    partial_file = tmp_path / f".notes.txt.partial-{host}-{dead}-k3j4.tmp"    # as atomic_write names them
    partial_file.write_text("half")
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    kept = [tmp_path / f".other.partial-{host}-{live.pid}-abcd.tmp",           # a live writer's
            tmp_path / ".other.partial-another-node-1-abcd.tmp",                # another host's
            tmp_path / ".other.someone-elses.tmp"]                               # not ours
    try:
        for k in kept:
            k.mkdir()
        stale = sorted(p.name for p in tmp_path.iterdir() if ".partial-" in p.name and p not in kept)
        assert len(stale) == 2 and any(n.startswith(".merged.partial-") for n in stale)
        # another command, another output, same folder
        sp = tiny_tokenizer_dir / "tokenizer.model"
        assert cli_main(["vocab", "merge", "--base", str(sp), "--add", str(sp), "--out", str(tmp_path / "tok")]) == 0
        assert not any(".partial-" in p.name and p not in kept for p in tmp_path.iterdir())
        assert all(k.is_dir() for k in kept)
        assert not (tmp_path / "merged").exists() and not (tmp_path / "notes.txt").exists()
        # the killed run's lock file is not held: the next writer of `merged` takes it
        assert (tmp_path / ".merged.lock").exists()
        with output_lock(tmp_path / "merged", "zhllama merge"):
            pass
        assert not (tmp_path / ".merged.lock").exists()
    finally:
        live.communicate(b"")


# ----------------------------------------------------------------------------- checked before the work

@pytest.mark.parametrize("command", ["vocab train", "data pack", "sft.convert"])
def test_unwritable_output_is_refused_before_the_work(command, tiny_tokenizer_dir):
    with world_dir("zhllama-outputs-") as root:
        (root / "tok").mkdir()
        for f in tiny_tokenizer_dir.iterdir():
            (root / "tok" / f.name).write_bytes(f.read_bytes())
        (root / "ro").mkdir()
        make_readable(root)
        (root / "ro").chmod(0o555)
        out = root / "ro" / ("x.jsonl" if command == "sft.convert" else "out")
        argv = {"vocab train": [*ZHLLAMA, "vocab", "train", "--input", SAMPLE, "--out", out, "--vocab-size", "60"],
                "data pack": [*ZHLLAMA, "data", "pack", "--tokenizer", root / "tok", "--input", SAMPLE, "--out", out],
                "sft.convert": [sys.executable, "-m", "zhllama.sft.convert", SFT_SAMPLE, "--out", out]}[command]
        res = run_bounded(as_nobody(argv), max_rss_mb=1500, timeout_s=120, cwd=root)
        line = res.assert_one_line_error(out, f"{root / 'ro'} is not writable")
        assert "sentences read" not in res.stderr and "packing" not in res.stderr, line   # before reading
