"""A two-source mixture through the real engine (DeepSpeed ZeRO-2 on CPU ranks): `zhllama train` on the
Chinese and English samples mixed 0.7 / 0.3, the vocabulary split into base rows (lr x 0.1) and new rows.

Runs (module-scoped, each a real process):
  baseline   1 rank, uninterrupted, TensorBoard on
  crashed    the same config SIGKILLed after step 5, then restarted
  two_ranks  the same config on 2 ranks through launch/pretrain_stage2.sh
  resharded  two_ranks cut back to its step-6 checkpoint and resumed on 1 rank

* after SIGKILL and resume the steps continue exactly: the same sequences of each source per step, the same
  losses and the same final weights, bit for bit (the split groups' optimizer state included);
* 2 ranks train on the same sequences as 1 (the step's list is a function of (seed, step), each rank takes
  its slice): the same per-step counts, and the same weights within float tolerance;
* a mixture with split rows checkpointed on 2 ranks resumes on 1: the mixture's sequences continue and the
  split groups' optimizer state is redistributed by name, ending as the uninterrupted runs do;
* each source's validation figures equal `zhllama eval` on that source's validation text (the documents
  `data pack` sent to validation), loss and bits per character, in metrics.jsonl, TensorBoard and
  summary.json.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLES, run_cli
from runs import assert_same_run, cut_back, metrics, resume_on_one_rank, train, train_two_ranks

STEPS = 8
COMMON = ["stage=stage2", "init_adapters=[]", f"max_steps={STEPS}", "global_batch=8", "micro_batch=2",
          "block_size=32", "lr=0.01", "save_every=2", "keep_last=2", "eval_every=4", "eval_batches=2",
          "lora_dropout=0.0", "embed_lr_base=0.1"]


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def _mix(records):
    return [{k: v for k, v in r.items() if k.startswith("sequences/")} for r in records]


@pytest.fixture(scope="module")
def base_args(tiny_model_base_vocab, tiny_packed, tiny_packed_en):
    return [f"model={tiny_model_base_vocab}", f"data=[{tiny_packed}:0.7, {tiny_packed_en}:0.3]", *COMMON]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, base_args):
    run = tmp_path_factory.mktemp("mix_baseline") / "run"
    res = train([*base_args, "tensorboard=true", f"out={run}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trainable" in res.stderr and "base rows" in res.stderr and "new rows" in res.stderr
    return run


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_sequences(tmp_path, base_args, baseline):
    run = tmp_path / "run"
    args = [*base_args, "tensorboard=false", f"out={run}"]
    killed = train(args, ZHLLAMA_CRASH="after-step:5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-4'}" in resumed.stderr
    a, b = metrics(baseline), metrics(run)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert _mix(b) == _mix(a) and all(sum(m.values()) == 8 for m in _mix(a))
    assert {k for m in _mix(a) for k in m} == {"sequences/packed", "sequences/en"}
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    wa, wb = _weights(baseline), _weights(run)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (baseline, run))
    assert sa["sources"] == sb["sources"]   # shares and each source's first and last validation figures
    assert sa["trainable_groups"].keys() == {"lora", "base_rows", "new_rows"}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, base_args):
    run = tmp_path_factory.mktemp("mix_two_ranks") / "run"
    res = train_two_ranks([*base_args, "tensorboard=false", f"out={run}"], run)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


@pytest.mark.slow
def test_two_ranks_train_on_the_same_sequences(two_ranks, baseline):
    a, b = metrics(baseline), metrics(two_ranks)
    assert _mix(b) == _mix(a)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    wa, wb = _weights(baseline), _weights(two_ranks)   # tolerance as in test_engine.py: float summation order
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    for key in ("val_loss/packed", "val_bits_per_char/en"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5)   # validation windows dealt to 2 ranks


@pytest.mark.slow
def test_a_two_rank_mixture_with_split_rows_resumes_on_one_rank(tmp_path, base_args, two_ranks, baseline):
    """The mixture's order and the base-row/new-row groups together across a world-size change."""
    run = cut_back(two_ranks, tmp_path / "run", 6)
    resume_on_one_rank([*base_args, "tensorboard=false", f"out={run}"])
    assert _mix(metrics(run)) == _mix(metrics(baseline))
    assert_same_run(run, two_ranks)
    assert_same_run(run, baseline)


def _validation_text(src: Path, out: Path, ratio: float = 0.05) -> Path:
    """The documents of `src` that `data pack` sent to validation: BLAKE2b-64 of the text below ratio x 2^64."""
    threshold = int(ratio * (1 << 64))
    docs = [d for d in src.read_text(encoding="utf-8").splitlines() if d.strip()
            and int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8).digest(), "little") < threshold]
    out.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return out


@pytest.mark.slow
def test_each_sources_validation_equals_zhllama_eval_on_its_text(tmp_path, capsys, baseline, tiny_model_base_vocab):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged = tmp_path / "merged"
    assert run_cli("merge", "--base", tiny_model_base_vocab, "--adapter", baseline / "final", "--out", merged) == 0
    texts = {"packed": _validation_text(SAMPLES / "zh_sample.txt", tmp_path / "val_zh.txt"),
             "en": _validation_text(SAMPLES / "en_sample.txt", tmp_path / "val_en.txt")}
    capsys.readouterr()
    assert run_cli("eval", "--model", merged, "--text", *texts.values(), "--max-length", 32, "--stride", 16,
                   "--json") == 0
    results = {Path(r["text"]).name: r for r in json.loads(capsys.readouterr().out)["results"]}
    last = metrics(baseline)[-1]
    summary = json.loads((baseline / "summary.json").read_text())["sources"]
    events = EventAccumulator(str(baseline / "tensorboard"))
    events.Reload()
    for name, text in texts.items():
        want = results[text.name]
        assert last[f"val_loss/{name}"] == pytest.approx(want["loss"], rel=1e-5)
        assert last[f"val_bits_per_char/{name}"] == pytest.approx(want["bits_per_char"], rel=1e-5)
        assert summary[name]["validation"]["last"] == {"step": STEPS, "loss": last[f"val_loss/{name}"],
                                                       "bits_per_char": last[f"val_bits_per_char/{name}"]}
        assert summary[name]["validation"]["first"]["step"] == 4
        scalars = events.Scalars(f"val_bits_per_char/{name}")
        assert [s.step for s in scalars] == [4, STEPS]
        assert scalars[-1].value == pytest.approx(want["bits_per_char"], rel=1e-5)
    assert summary["packed"]["weight"] == 0.7 and summary["en"]["share"] == pytest.approx(0.3, abs=1 / 64)
