"""`zhllama data pack --keep-documents` (pretrain/pack/layout.py) and the document length distribution
every pack reports (issue 23: long documents kept whole for a long-context stage).

The layout is checked twice: on small cases worked out by hand, and on a real pack, where every
document's token ids are looked up in the blocks the reader returns (a plain search in the test).
"""

import json

import numpy as np

from test_pack import do_pack, make_docs, sp, tiny_sp, write_lines  # noqa: F401  (sp, tiny_sp: fixtures)
from zhllama.pretrain import shards
from zhllama.pretrain.pack.layout import plan_layout


def test_layout_by_hand_long_document_remainder_fills_gaps():
    """Block 10; documents of 4, 8, 3, 25, 5, 2 tokens at offsets 0, 4, 12, 15, 40, 45.

    The 25-token document gives two whole blocks as it is read (offsets 15 and 25) and a remainder of 5
    at 35. Block 1: the 4 (room 6), the first that fits is the 3 (room 3), then the 2 (room 1); nothing
    fits, so a token of the remainder (it is cut already). Block 2: the 8 (room 2), two more tokens of the
    remainder. 7 tokens are left (< 10): the tail, in input order: the remainder's last 2, the 5."""
    segments, full, counts = plan_layout([4, 8, 3, 25, 5, 2], 10)
    assert segments == [(15, 10), (25, 10), (0, 4), (12, 3), (45, 2), (35, 1), (4, 8), (36, 2), (38, 2), (40, 5)]
    assert full == 40
    assert counts == {"fit": 5, "kept_whole": 4, "cut_to_fill": 0, "longest_cut": 0, "in_tail": 1, "longer": 1}


def test_layout_by_hand_shortest_document_is_cut_when_nothing_fits():
    """Block 10; documents of 6, 7, 6 at offsets 0, 6, 13. Block 1: the first 6 (room 4); neither 7 nor 6
    fits and none is cut already, so the shortest (the third) gives its first 4 tokens. 9 left: the tail,
    in input order: the 7, then the third's last 2."""
    segments, full, counts = plan_layout([6, 7, 6], 10)
    assert segments == [(0, 6), (13, 4), (6, 7), (17, 2)]
    assert full == 10
    assert counts == {"fit": 3, "kept_whole": 1, "cut_to_fill": 1, "longest_cut": 6, "in_tail": 1, "longer": 0}


def _find(hay: np.ndarray, needle: np.ndarray) -> bool:
    return needle.astype("<u4").tobytes() in hay.astype("<u4").tobytes()


def test_keep_documents_pack_keeps_whole_what_it_says(tmp_path, tiny_sp, sp):
    bs = 128
    # short documents and a few longer than a block, shuffled together
    docs = make_docs(300, seed=7, min_len=3, max_len=60) + make_docs(6, seed=8, min_len=150, max_len=220)
    order = np.random.default_rng(0).permutation(len(docs))
    docs = [docs[i] for i in order]
    src = write_lines(tmp_path / "docs.txt", docs)
    out = tmp_path / "packed"
    assert do_pack(tiny_sp, [src], out, "--workers", "1", "--validation-ratio", "0", "--keep-documents",
                   block_size=bs) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["layout"] == "documents-whole"
    train = manifest["counts"]["splits"]["train"]
    ids = [np.array(x, dtype=np.int64) for x in sp.encode(docs, add_bos=True, add_eos=True)]
    lengths = np.array([len(x) for x in ids])
    ds = shards.PackedBlocks(out, expect_block_size=bs)
    blocks = [ds[i] for i in range(len(ds))]
    # every token is in a block or in the one dropped partial block, and no block is padded
    assert len(blocks) * bs + train["dropped_tokens"] == lengths.sum() == train["tokens"]
    whole = sum(any(_find(b, x) for b in blocks) for x in ids if len(x) <= bs)
    kept = train["documents_kept_whole"]
    assert kept["fit"] == int((lengths <= bs).sum()) and kept["longer"] == int((lengths > bs).sum()) > 0
    assert whole >= kept["kept_whole"] >= 0.8 * kept["fit"]
    assert kept["kept_whole"] + kept["cut_to_fill"] + kept["in_tail"] == kept["fit"]
    # a document longer than a block: its first block-size tokens are one block
    for x in ids:
        if len(x) > bs:
            assert any(np.array_equal(b, x[:bs]) for b in blocks)
    # the length distribution, against the lengths counted here
    dist = train["document_lengths"]
    assert (dist["documents"], dist["tokens"], dist["max"]) == (len(ids), int(lengths.sum()), int(lengths.max()))
    assert dist["longer_than_block"] == {"documents": int((lengths > bs).sum()),
                                         "tokens": int(lengths[lengths > bs].sum())}
    assert sum(b["documents"] for b in dist["buckets"]) == len(ids)
    for b in dist["buckets"]:
        assert b["documents"] == int(((lengths <= b["up_to"]) & (lengths > b["up_to"] // 2)).sum())


def test_default_layout_is_unchanged_and_reports_lengths(tmp_path, tiny_sp, sp, capsys):
    docs = make_docs(120, seed=9)
    src = write_lines(tmp_path / "docs.txt", docs)
    out = tmp_path / "packed"
    assert do_pack(tiny_sp, [src], out, "--workers", "1", "--validation-ratio", "0", block_size=64) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert "layout" not in manifest["settings"]          # existing packs keep their settings (resume, up to date)
    stream = np.concatenate([np.asarray(a) for _, a in shards.iter_unit_streams(out)])
    want = np.array([t for x in sp.encode(docs, add_bos=True, add_eos=True) for t in x])
    assert np.array_equal(stream, want)                   # the concatenated documents, in input order
    lengths = [len(x) for x in sp.encode(docs, add_bos=True, add_eos=True)]
    dist = manifest["counts"]["splits"]["train"]["document_lengths"]
    assert (dist["documents"], dist["max"], dist["mean"]) == (120, max(lengths), round(sum(lengths) / 120, 1))
    assert f"mean {sum(lengths) / 120:,.0f}, max {max(lengths):,}" in printed
