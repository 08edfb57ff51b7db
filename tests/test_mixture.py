"""Weighted data mixtures (pretrain/mixture.py) and the pack's characters per split, without DeepSpeed (fast).

* the sequences of every step, on 1 and on 2 ranks, as the engine's own `_train_step` takes them, equal
  those of a plain reference sampler written here from the spec (not a call into the mixture code);
* a single pack gives exactly the sequences it always gave (one seeded permutation per epoch);
* each source's share is within 1 point of its weight over any 100 steps, for weights that give a source
  less than one sequence per step too;
* a source that runs out starts its next epoch alone;
* packs of different tokenizers or block sizes are refused naming both; weights are checked;
* `data pack` counts the characters of each split; a pack made before it did gives the loss without
  bits per character.
"""

import hashlib
import json
import math
import shutil
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import SAMPLES, run_cli
from zhllama.errors import ConfigError, UserError
from zhllama.pretrain import engine as engine_mod
from zhllama.pretrain.config import load_config
from zhllama.pretrain.hooks import TrainHooks
from zhllama.pretrain.mixture import Mixture, MixtureOrder, load_sources, source_names
from zhllama.pretrain.shards import PackedBlocks


# ----------------------------------------------------------------------------- the reference sampler

def ref_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(n)


def ref_source_seed(seed: int, k: int) -> int:
    return seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def ref_counts(weights, global_batch: int, steps: int):
    """Per step, sequences per source: Hamilton's largest remainder on (what each source is owed + its quota)."""
    shares = [Fraction(str(w)) / sum(Fraction(str(x)) for x in weights) for w in weights]
    owed = [Fraction(0)] * len(weights)
    out = []
    for _ in range(steps):
        due = [o + s * global_batch for o, s in zip(owed, shares)]
        counts = [max(math.floor(d), 0) for d in due]
        remainders = sorted(((due[k] - counts[k], -k) for k in range(len(due))), reverse=True)
        for _, neg_k in remainders[:global_batch - sum(counts)]:
            counts[-neg_k] += 1
        owed = [d - c for d, c in zip(due, counts)]
        out.append(counts)
    return out


def ref_steps(sizes, weights, seed: int, global_batch: int, steps: int):
    """[(source, block id) for each of the G slots] for each step, written from the spec in pretrain/mixture.py."""
    taken = [0] * len(sizes)
    out = []
    for step, counts in enumerate(ref_counts(weights, global_batch, steps)):
        labels = []
        for k, c in enumerate(counts):
            labels += [k] * c
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x6D6978, step])))
        labels = [labels[i] for i in rng.permutation(len(labels))]
        slots = []
        for k in labels:
            epoch, offset = divmod(taken[k], sizes[k])
            slots.append((k, int(ref_permutation(ref_source_seed(seed, k), epoch, sizes[k])[offset])))
            taken[k] += 1
        out.append(slots)
    return out


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def small_en(tmp_path_factory, tiny_tokenizer_dir):
    """4 lines of the English sample: a source of a few blocks, which runs out many times in a short run."""
    d = tmp_path_factory.mktemp("small_en")
    src = d / "en4.txt"
    src.write_text("\n".join((SAMPLES / "en_sample.txt").read_text(encoding="utf-8").splitlines()[:4]) + "\n",
                   encoding="utf-8")
    assert run_cli("data", "pack", "--tokenizer", tiny_tokenizer_dir, "--input", src, "--block-size", 32,
                   "--out", d / "en", "--validation-ratio", "0", "--workers", 1) == 0
    return d / "en"


class _NoEngine:
    """The engine's calling surface with no model: `_train_step` runs its data path for real."""

    def __call__(self, **batch):
        return torch.zeros((), dtype=torch.float64)

    def backward(self, loss, scale_wrt_gas=True):
        pass

    def step(self):
        pass


def _steps_taken(data, rank: int, world: int, global_batch: int, steps: int, micro: int = 2):
    """The blocks `Trainer._train_step` feeds to the model, per step, on `rank` of `world`."""
    t = engine_mod.Trainer.__new__(engine_mod.Trainer)
    t.cfg = SimpleNamespace(micro_batch=micro)
    t.preset = SimpleNamespace(global_batch=global_batch)
    t.rank, t.world, t.device, t.hooks, t.engine = rank, world, torch.device("cpu"), TrainHooks(), _NoEngine()
    seen = []
    t.data = SimpleNamespace(train=data.train, collate=lambda items: seen.extend(items) or
                             engine_mod._collate_blocks(items))
    out = []
    for step in range(steps):
        seen.clear()
        t._train_step(step, data.mixture.order, grad_accum=global_batch // (micro * world))
        out.append([np.asarray(x) for x in seen])
    return out


# ----------------------------------------------------------------------------- the sequences of each step

@pytest.mark.parametrize("world", [1, 2])
def test_each_steps_sequences_equal_the_reference_sampler(world, tiny_model_dir, tiny_packed, small_en):
    G, STEPS, SEED = 8, 40, 7
    weights = (0.7, 0.3)
    cfg = load_config(None, ["stage=stage2", f"model={tiny_model_dir}", f"data=[{tiny_packed}:0.7, {small_en}:0.3]",
                             "out=unused", f"global_batch={G}", "micro_batch=2", "block_size=32", f"seed={SEED}"])
    data = engine_mod.build_data(cfg, cfg.preset(), None, tiny_model_dir)
    packs = [PackedBlocks(tiny_packed, "train"), PackedBlocks(small_en, "train")]
    assert len(packs[1]) * 5 < 0.3 * G * STEPS  # the small source runs through 5+ epochs
    reference = ref_steps([len(p) for p in packs], weights, SEED, G, STEPS)
    taken = [_steps_taken(data, r, world, G, STEPS) for r in range(world)]
    per_rank = G // world
    for step in range(STEPS):
        for r in range(world):  # each rank: its contiguous slice of the step's list
            want = [packs[k][b] for k, b in reference[step][r * per_rank:(r + 1) * per_rank]]
            got = taken[r][step]
            assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want)), (step, r)
    # both sources in the run's list, in the proportions of the weights
    ids = [k for slots in reference for k, _ in slots]
    assert ids.count(1) == round(0.3 * G * STEPS)


def test_a_single_pack_gives_the_sequences_it_always_gave(tiny_model_dir, tiny_packed):
    cfg = load_config(None, ["stage=stage2", f"model={tiny_model_dir}", f"data=[{tiny_packed}]", "out=unused",
                             "global_batch=8", "block_size=32", "seed=3"])
    data = engine_mod.build_data(cfg, cfg.preset(), None, tiny_model_dir)
    n = len(PackedBlocks(tiny_packed, "train"))
    assert len(data.train) == n
    positions = list(range(0, 2 * n + 40))  # through two epochs
    want = [int(ref_permutation(3, p // n, n)[p % n]) for p in positions]
    assert [data.mixture.order.index(p) for p in positions] == want


@pytest.mark.parametrize("weights, G", [((0.85, 0.15), 8), ((0.95, 0.05), 8), ((0.5, 0.3, 0.2), 4),
                                        ((1, 1, 1), 16), ((0.9, 0.1), 1024), ((0.999, 0.001), 4)])
def test_shares_stay_within_one_point_of_the_weights_over_any_100_steps(weights, G):
    steps = 1000
    order = MixtureOrder([10, 20, 30][:len(weights)], [Fraction(str(w)) for w in weights], 0, G)
    counts = np.array([order.step_counts(t) for t in range(steps)])
    assert (counts >= 0).all() and (counts.sum(axis=1) == G).all()
    assert counts.tolist() == ref_counts(weights, G, steps)
    target = np.array(weights, dtype=float) / sum(weights)
    window = np.lib.stride_tricks.sliding_window_view(counts, 100, axis=0).sum(axis=2)  # (steps-99, sources)
    assert np.abs(window / (100 * G) - target).max() <= 0.01
    cumulative = counts.cumsum(axis=0)   # within one sequence of the target after every step
    expected = np.outer(np.arange(1, steps + 1) * G, target)
    assert np.abs(cumulative - expected).max() < 1 + 1e-9
    assert order.consumed(steps) == cumulative[-1].tolist()


def test_a_source_that_runs_out_starts_its_next_epoch_alone():
    G, steps = 8, 30
    weights = [Fraction(1, 2), Fraction(1, 2)]
    a, b = MixtureOrder([5, 500], weights, 11, G), MixtureOrder([7, 500], weights, 11, G)
    ids_a = [a.index(p) for p in range(G * steps)]
    ids_b = [b.index(p) for p in range(G * steps)]
    # the big source's blocks, in the order they come: its own stream, whatever the small source's size
    big_a = [i - 5 for i in ids_a if i >= 5]
    big_b = [i - 7 for i in ids_b if i >= 7]
    assert big_a == big_b == [int(x) for x in ref_permutation(ref_source_seed(11, 1), 0, 500)[:len(big_a)]]
    # the small source: a fresh permutation of its 5 blocks per epoch
    small = [i for i in ids_a if i < 5]
    epochs = [small[k:k + 5] for k in range(0, len(small) - 4, 5)]
    assert len(epochs) >= 20 and all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    # a fresh order asked at step 20 directly (a resume) gives the same slots
    fresh = MixtureOrder([5, 500], weights, 11, G)
    assert [fresh.index(p) for p in range(20 * G, steps * G)] == ids_a[20 * G:]


# ----------------------------------------------------------------------------- what is refused

def test_packs_of_another_tokenizer_or_block_size_are_refused_naming_both(tmp_path, tiny_tokenizer_dir,
                                                                          tiny_packed, tiny_packed_en):
    from zhllama.tiny import make_tiny_sp

    other_tok = make_tiny_sp(tmp_path / "other" / "tokenizer.model", vocab_size=400)
    for name, tok, block in (("other_tok", other_tok, 32), ("block16", tiny_tokenizer_dir, 16)):
        assert run_cli("data", "pack", "--tokenizer", tok, "--input", SAMPLES / "en_sample.txt", "--block-size",
                       block, "--out", tmp_path / name, "--workers", 1) == 0
    with pytest.raises(UserError) as e:
        load_sources([str(tiny_packed), f"{tmp_path / 'other_tok'}:0.2"], tiny_tokenizer_dir, 32)
    assert str(tiny_packed) in str(e.value) and str(tmp_path / "other_tok") in str(e.value)
    assert "tokenizer" in str(e.value)
    with pytest.raises(UserError) as e:
        load_sources([str(tiny_packed_en), str(tmp_path / "block16")], tiny_tokenizer_dir, 32)
    assert str(tiny_packed_en) in str(e.value) and str(tmp_path / "block16") in str(e.value)
    assert "blocks of 32 tokens" in str(e.value) and "blocks of 16" in str(e.value)


def test_weights_and_names(tmp_path, tiny_tokenizer_dir, tiny_packed, tiny_packed_en):
    with pytest.raises(ConfigError, match="weight must be a number >= 0"):
        load_sources([f"{tiny_packed}:-1"], tiny_tokenizer_dir, 32)
    with pytest.raises(ConfigError, match="every weight is 0"):
        load_sources([f"{tiny_packed}:0", f"{tiny_packed_en}:0"], tiny_tokenizer_dir, 32)
    # weight 0: scored on validation, never trained on
    sources = load_sources([f"{tiny_packed}:1", f"{tiny_packed_en}:0"], tiny_tokenizer_dir, 32)
    mixture = Mixture(sources, 0, 8)
    assert [s.name for s in mixture.trained] == ["packed"] and sources[1].validation is not None
    assert {mixture.order.index(p) for p in range(80)} <= set(range(len(sources[0].train)))
    other = tmp_path / "b" / "packed"
    shutil.copytree(tiny_packed, other)
    assert source_names([tiny_packed, other, tiny_packed_en]) == ["packed", "packed-2", "en"]


# ----------------------------------------------------------------------------- characters per split

def test_pack_counts_the_characters_of_each_split(tiny_packed_en):
    """The validation split is a document's 64-bit BLAKE2b hash below ratio x 2^64 (docs/data.md), so the
    characters of each split can be counted from the input text here."""
    docs = [line for line in (SAMPLES / "en_sample.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    threshold = int(0.05 * (1 << 64))
    val = [d for d in docs if int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little")
           < threshold]
    counts = json.loads((tiny_packed_en / "manifest.json").read_text())["counts"]["splits"]
    assert counts["validation"]["characters"] == sum(map(len, val)) > 0
    assert counts["train"]["characters"] == sum(map(len, docs)) - sum(map(len, val))
    assert counts["validation"]["documents"] == len(val)


def test_a_pack_without_character_counts_gives_the_loss_only(tmp_path, tiny_tokenizer_dir, tiny_packed_en):
    from zhllama.pretrain.source_eval import SourceValidation

    old = tmp_path / "old"
    shutil.copytree(tiny_packed_en, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for split in manifest["counts"]["splits"].values():
        del split["characters"]    # as zhllama wrote it before it counted characters
    (old / "manifest.json").write_text(json.dumps(manifest))
    sources = load_sources([str(old)], tiny_tokenizer_dir, 32)
    assert sources[0].characters is None
    sv = SourceValidation(sources, 32, 0, 1, 0, 4)
    assert "no character count" in sv.describe()[0] and "--overwrite" in sv.describe()[0]
    assert sv.figures([(10.0, 5.0)]) == {"val_loss/old": 2.0}


def test_the_loss_curve_png_draws_each_sources_validation(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the demo's PNG needs matplotlib (the dev extra)")
    import matplotlib.pyplot as plt

    from zhllama.app.demo.report import plot_curves

    closed = []
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig))
    records = [{"step": 1, "loss": 3.0},
               {"step": 2, "loss": 2.5, "val_loss": 2.6, "val_loss/zh": 2.7, "val_loss/en": 2.2},
               {"step": 3, "loss": 2.4, "val_loss": 2.5, "val_loss/zh": 2.6, "val_loss/en": 2.3}]
    assert plot_curves({"stage2": records}, tmp_path / "curves.png") and (tmp_path / "curves.png").stat().st_size
    handles, labels = closed[0].axes[0].get_legend_handles_labels()
    lines = dict(zip(labels, handles))
    assert list(lines["held-out en"].get_ydata()) == [2.2, 2.3]
    assert list(lines["held-out zh"].get_ydata()) == [2.7, 2.6]


@pytest.mark.parametrize("style", ["sentencepiece", "gpt2"])
def test_validation_documents_are_the_ids_zhllama_eval_scores(style, tmp_path, tiny_tokenizer_dir, tiny_packed):
    """Each source's validation documents, cut from the pack at EOS, are BOS + the ids `zhllama eval` gets
    for the same text; also for a GPT-2 style tokenizer whose BOS and EOS are one id (`<|endoftext|>`)."""
    from zhllama.modelio import load_tokenizer
    from zhllama.pretrain.shards import split_documents
    from zhllama.textenc import encode_text
    from zhllama.tiny_bpe import make_byte_level_bpe

    lines = [d for d in (SAMPLES / "zh_sample.txt").read_text(encoding="utf-8").splitlines() if d.strip()]
    tok_dir, pack = tiny_tokenizer_dir, tiny_packed
    if style == "gpt2":
        tok_dir = make_byte_level_bpe(tmp_path / "tok", lines, vocab_size=400, style="gpt2")
        pack = tmp_path / "packed"
        assert run_cli("data", "pack", "--tokenizer", tok_dir, "--input", SAMPLES / "zh_sample.txt", "--block-size",
                       32, "--out", pack, "--validation-ratio", "0.05", "--workers", 1) == 0
    tok = load_tokenizer(tok_dir)
    assert (tok.bos_token_id == tok.eos_token_id) == (style == "gpt2")
    threshold = int(0.05 * (1 << 64))
    val = [d for d in lines
           if int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8).digest(), "little") < threshold]
    want = [[tok.bos_token_id] + encode_text(tok, d) for d in val]
    assert [d.tolist() for d in split_documents(pack, "validation")] == want
