"""Language-aware ROUGE-L: Chinese near-duplicates score high, the index agrees with brute force."""

import json
import random
import re

import pytest
from conftest import shared_path

from zhllama.sft import rouge
from zhllama.sft.rouge import SimilarityIndex, edited, fmeasure, lcs_length, rouge_l

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score (dev dependency) not installed")


def _dp_lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _random_seq(rng, alphabet, lo, hi):
    return [rng.choice(alphabet) for _ in range(rng.randint(lo, hi))]


def test_bit_parallel_lcs_and_fmeasure_equal_rouge_score():
    rng = random.Random(0)
    for _ in range(1500):
        a = _random_seq(rng, "abcdef", 0, 80)   # > 64 tokens exercises multi-word integers
        b = _random_seq(rng, "abcdef", 0, 80)
        lcs = lcs_length(a, b)
        assert lcs == _dp_lcs(a, b)
        assert fmeasure(lcs, len(a), len(b)) == rouge_scorer._score_lcs(a, b).fmeasure


def test_english_matches_rouge_score_exactly():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = ["Give three tips for staying healthy.", "Give 3 tips to stay healthy!",
             "What is the relation between the given pairs?", "Write a haiku about the sea.",
             "Rewrite the sentence in the passive voice: The cat chased the mouse."]
    for a in texts:
        assert rouge.tokenize_en(a) == scorer._tokenizer.tokenize(a)
        for b in texts:
            assert rouge_l(a, b, "en") == scorer.score(a, b)["rougeL"].fmeasure


# Real instructions in the style of BELLE's seed tasks: (original, near-duplicate, unrelated).
ZH_CASES = [
    ("给出下面词语的同义词", "请给出下面这个词语的同义词", "写一首关于秋天的五言绝句"),
    ("根据自然语言描述，生成可以在数据库表执行的SQL语句", "根据自然语言描述，生成能在数据库表上执行的SQL语句",
     "把这段英文翻译成中文"),
    ("将下面的句子改写成被动语态", "把下面的句子改写成被动语态。", "推荐几本适合初学者的理财书籍"),
    ("判断下面这条评论的情感是正面还是负面", "判断以下这条评论的情感是正面还是负面", "计算一个圆的面积，半径为3厘米"),
]


def test_chinese_near_duplicates_high_unrelated_low():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for original, near, unrelated in ZH_CASES:
        assert rouge_l(original, near, "zh") > 0.7, (original, near)
        assert rouge_l(original, unrelated, "zh") < 0.3, (original, unrelated)
        if not re.search(r"[A-Za-z0-9]", original + near):
            # The bug this module fixes: rouge_score sees no tokens in Chinese, so it scores 0.
            assert scorer.score(original, near)["rougeL"].fmeasure == 0.0
    # ...and the only tokens it keeps in mixed text are the ASCII ones: unrelated tasks look identical.
    assert scorer.score("生成SQL语句", "解释这条SQL为什么慢")["rougeL"].fmeasure == 1.0
    assert rouge_l("生成SQL语句", "解释这条SQL为什么慢", "zh") < 0.5


def test_chinese_on_belle_seed_tasks():
    path = shared_path("data/sft/seed_tasks_belle_zh.json")
    seeds = [json.loads(line)["instruction"] for line in path.read_text("utf-8").splitlines() if line.strip()]
    assert len(seeds) > 100
    # Near-duplicates made the way a model paraphrases: a polite prefix and a changed ending.
    for s in seeds:
        if len(rouge.tokenize_zh(s)) < 6:
            continue
        near = "请" + s.rstrip("。.") + "。"
        assert rouge_l(s, near, "zh") > 0.7, (s, near)
    # Different seed tasks are mostly far apart.
    index = SimilarityIndex("zh", threshold=0.7)
    pairs = [rouge_l(a, b, "zh") for i, a in enumerate(seeds[:60]) for b in seeds[i + 1:60]]
    pairs.sort()
    assert pairs[len(pairs) // 2] < 0.2
    assert sum(p > 0.7 for p in pairs) <= 0.01 * len(pairs)
    for s in seeds:
        index.add(s)
    assert index.nearest("请" + seeds[3])[0] == 3


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_index_equals_brute_force(threshold):
    rng = random.Random(threshold)
    alphabet = [f"w{i}" for i in range(40)]
    pool = []
    for _ in range(400):
        if pool and rng.random() < 0.5:
            pool.append(edited(rng, rng.choice(pool), alphabet, rng.randint(0, 4)))
        else:
            pool.append(_random_seq(rng, alphabet, 0, 25))
    index = SimilarityIndex("en", threshold=threshold)
    for toks in pool:
        index.add_tokens(toks)
    branches = {"above": 0, "below": 0}
    for _ in range(300):
        q = edited(rng, rng.choice(pool), alphabet, rng.randint(0, 6)) if rng.random() < 0.7 \
            else _random_seq(rng, alphabet + ["unseen"], 0, 25)
        # Brute force with the LCS proven equal to rouge_score's in the first test (its DP is slow).
        scores = [fmeasure(lcs_length(q, p), len(q), len(p)) for p in pool]
        best = max(scores)
        doc_id, score = index.nearest_tokens(q)
        if best > threshold:
            assert score == best and scores[doc_id] == best
            first_id, first_score = index.nearest_tokens(q, first=True)
            assert scores[first_id] == first_score > threshold
        else:
            assert (doc_id, score) == (None, 0.0)
        branches["above" if best > threshold else "below"] += 1
    assert min(branches.values()) >= 20, branches     # both outcomes checked, many times
    assert index.lcs_computed < 300 * len(pool) / 4  # the bound prunes most pairs


def test_sequential_filter_equals_stanford_loop():
    """Filtering a stream (each kept text joins the pool) gives Stanford's all-pairs decisions."""
    rng = random.Random(1)
    alphabet = [f"w{i}" for i in range(30)]
    seeds = [_random_seq(rng, alphabet, 4, 20) for _ in range(50)]
    stream = [edited(rng, rng.choice(seeds), alphabet, rng.randint(0, 8)) for _ in range(300)]
    pool = list(seeds)
    expected = []
    for cand in stream:
        if max(rouge_scorer._score_lcs(cand, p).fmeasure for p in pool) > 0.7:
            expected.append(False)
        else:
            expected.append(True)
            pool.append(cand)
    index = SimilarityIndex("en")
    for s in seeds:
        index.add_tokens(s)
    got = []
    for cand in stream:
        keep = index.nearest_tokens(cand, first=True)[0] is None
        got.append(keep)
        if keep:
            index.add_tokens(cand)
    assert got == expected
    assert 0 < sum(got) < len(got)


def test_bad_language_is_an_error():
    with pytest.raises(ValueError, match="unknown language"):
        SimilarityIndex("fr")
