"""zhllama eval --benchmark cmmlu|ceval: prompt strings, the truncation rule, bad data, and predictions
checked against an independent scorer (a plain loop over the same prompts with the full model)."""

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import shared_path
from zhllama.app.cli import main
from zhllama.export.benchmark import CEVAL, CMMLU, Prompter, fit_prompt, load_subjects
from zhllama.modelio import load_model, load_tokenizer

CMMLU_HEADER = ",Question,A,B,C,D,Answer"
CEVAL_HEADER = "id,question,A,B,C,D,answer,explanation"
# Columns of C-Eval rows written by _ceval_dir (the explanation is never part of an answer-only prompt).
CEVAL_ROWS = [
    ["计算机网络中，IP 地址有多少位？", "16", "32", "48", "64", "B"],
    ["TCP 属于哪一层？", "传输层", "网络层", "链路层", "应用层", "A"],
    ["HTTP 的默认端口是", "21", "25", "80", "443", "C"],
    ["下列哪个是无线局域网标准", "802.3", "802.5", "802.1", "802.11", "D"],
    ["DNS 用于", " 域名解析", "路由", "加密", "压缩", "A"],
]


def _varied_model(tokenizer_path, out: Path) -> Path:
    """A tiny random LLaMA whose answers vary with the question.

    At the default init (std 0.02) the last position is dominated by the embedding of the final
    "：", so every question gets the same letter and a comparison would prove little; std 0.2 lets
    the context move the letter logits.
    """
    from transformers import LlamaForCausalLM

    from zhllama.modelio import save_pretrained_atomic
    from zhllama.tiny import tiny_llama_config

    tok = load_tokenizer(tokenizer_path)
    cfg = tiny_llama_config(len(tok), initializer_range=0.2, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    return save_pretrained_atomic(model, tok, out)


@pytest.fixture(scope="module")
def tiny_varied(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return _varied_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("bench") / "tiny")


@pytest.fixture(scope="module")
def llama_varied(tmp_path_factory) -> Path:
    sp = shared_path("data/llama/tokenizer.model")
    return _varied_model(sp, tmp_path_factory.mktemp("bench") / "llama-tok")


def _write_csv(path: Path, header: str, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(header + "\n")
        csv.writer(f, lineterminator="\n").writerows(rows)


def _cmmlu_dir(root: Path) -> Path:
    dev = [[0, "肉牛屠宰后，胴体的哪个部位肉质较好", "胸", "腹", "大腿", "小腿", "C"],
           [1, "下列鸭品种中，产蛋量最高的品种是", "高邮鸭", "北京鸭", "樱桃谷鸭", "绍鸭", "D"],
           [2, "第三个例子", "甲", "乙", "丙", "丁", "A"]]
    test = [[0, "土地是农业的基本生产资料吗", " 是", "否 ", "不一定", "无法判断", "A"]]
    _write_csv(root / "dev" / "agronomy.csv", CMMLU_HEADER, dev)
    _write_csv(root / "test" / "agronomy.csv", CMMLU_HEADER, test)
    return root


def _ceval_dir(root: Path, subject="computer_network") -> Path:
    rows = [[i, *r, "解析"] for i, r in enumerate(CEVAL_ROWS)]
    _write_csv(root / "dev" / f"{subject}_dev.csv", CEVAL_HEADER, rows[:2])
    _write_csv(root / "val" / f"{subject}_val.csv", CEVAL_HEADER, rows[2:])
    return root


# ---------------------------------------------------------------------------------------------- prompts

def test_cmmlu_prompt_strings_zero_and_two_shot(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    data = _cmmlu_dir(tmp_path)
    zero = load_subjects(data, CMMLU, shots=0)[0]
    assert Prompter(tok, CMMLU, 0, 2048).prompt(zero, zero.questions[0]) == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：土地是农业的基本生产资料吗\nA.  是\nB. 否 \nC. 不一定\nD. 无法判断\n答案是：")

    two = load_subjects(data, CMMLU, shots=2)[0]
    prompter = Prompter(tok, CMMLU, 2, 2048)
    text = prompter.prompt(two, two.questions[0])
    assert text == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：肉牛屠宰后，胴体的哪个部位肉质较好\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿\n答案是：C\n\n"
        "题目：下列鸭品种中，产蛋量最高的品种是\nA. 高邮鸭\nB. 北京鸭\nC. 樱桃谷鸭\nD. 绍鸭\n答案是：D\n\n"
        "题目：土地是农业的基本生产资料吗\nA.  是\nB. 否 \nC. 不一定\nD. 无法判断\n答案是：")
    ids = prompter.ids(text)
    assert ids[0] == tok.bos_token_id and ids == tok(text)["input_ids"]     # BOS first, as the official call


def test_ceval_prompt_strings(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    data = _ceval_dir(tmp_path)
    question = "HTTP 的默认端口是\nA. 21\nB. 25\nC. 80\nD. 443\n答案："
    zero = load_subjects(data, CEVAL, shots=0)[0]
    assert Prompter(tok, CEVAL, 0, 2048).prompt(zero, zero.questions[0]) == question   # no header at 0 shots
    one = load_subjects(data, CEVAL, shots=1)[0]
    assert Prompter(tok, CEVAL, 1, 2048).prompt(one, one.questions[0]) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "计算机网络中，IP 地址有多少位？\nA. 16\nB. 32\nC. 48\nD. 64\n答案：B\n\n" + question)


# ------------------------------------------------------------------------------------------- truncation

def test_truncation_rule():
    count = lambda s: len(s) + 1          # noqa: E731  (a piece's length with its BOS)
    head, question = "H" * 10, "Q" * 10   # 11 + 11 = 22 fixed
    shots = ["a" * 4, "b" * 7, "c" * 7, "d" * 2]    # 5, 8, 8, 3 = 24
    assert fit_prompt(head, shots, question, count, 100) == head + "".join(shots) + question
    # room 46 - 22 = 24 <= 24: every shot of the greatest length (both 8s) goes, 8 < 24 stays
    assert fit_prompt(head, shots, question, count, 46) == head + "a" * 4 + "d" * 2 + question
    assert fit_prompt(head, shots, question, count, 47) == head + "".join(shots) + question
    # room 30 - 22 = 8: 8s go (8 >= 8), then 5 + 3 = 8 >= 8, the 5 goes, 3 < 8 stays
    assert fit_prompt(head, shots, question, count, 30) == head + "d" * 2 + question
    assert fit_prompt(head, shots, question, count, 25) == head + question          # room 3: all go
    assert fit_prompt(head, shots, question, count, 22) == head + question          # exactly fits
    assert fit_prompt(head, shots, question, count, 21) == question                 # header + question too long


def test_truncation_counts_each_piece_with_its_bos(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    subject = load_subjects(_cmmlu_dir(tmp_path), CMMLU, shots=0)[0]
    q = subject.questions[0]
    head, question = CMMLU.head(subject, 0), CMMLU.example(q, with_answer=False)
    fixed = len(tok(head)["input_ids"]) + len(tok(question)["input_ids"])        # each with its own BOS
    fits, short = Prompter(tok, CMMLU, 0, fixed), Prompter(tok, CMMLU, 0, fixed - 1)
    assert fits.prompt(subject, q) == head + question and fits.truncated == 0
    assert short.prompt(subject, q) == question and short.truncated == 1


# ------------------------------------------------------------------------------------ independent scorer

def _official_prompt(header, dev_rows, row, k, q_prefix, a_prefix):
    """The prompt built directly from CSV rows (question, A, B, C, D, answer), no truncation needed here."""
    def fmt(r, answer):
        text = q_prefix + r[0] + "".join(f"\n{letter}. {opt}" for letter, opt in zip("ABCD", r[1:5])) + a_prefix
        return text + (r[5] + "\n\n" if answer else "")
    return header + "".join(fmt(d, True) for d in dev_rows[:k]) + fmt(row, False)


def _loop_scorer(model_dir, prompts):
    """One prompt at a time through the full model: argmax of the bare letters' last logits."""
    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    preds = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            logits = model(input_ids=ids).logits[0, -1, letters]
            best = max(range(4), key=lambda i: (logits[i].item(), -i))      # first letter on ties
            preds.append("ABCD"[best])
    return preds


def _rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [r[1:] for r in list(csv.reader(f))[1:]]


def _read_out(out):
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return preds, json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_cmmlu_predictions_equal_the_independent_scorer(tmp_path, llama_varied, capsys):
    data = shared_path("data/eval/cmmlu")
    subjects, limit, shots = ["agronomy", "arts", "college_mathematics"], 10, 1
    out = tmp_path / "out"
    assert main(["eval", "--benchmark", "cmmlu", "--data", data, "--model", llama_varied, "--shots", shots,
                 "--subjects", ",".join(subjects), "--limit", limit, "--batch-size", 8, "--out", out]) == 0
    table = capsys.readouterr().out
    got, summary = _read_out(out)

    names = json.loads((data / "subjects.json").read_text(encoding="utf-8"))
    prompts, want = [], []
    for s in subjects:
        dev, test = _rows(data / "dev" / f"{s}.csv"), _rows(data / "test" / f"{s}.csv")[:limit]
        header = f"以下是关于{names[s]}的单项选择题，请直接给出正确答案的选项。\n\n"
        for i, row in enumerate(test):
            prompts.append(_official_prompt(header, dev, row, shots, "题目：", "\n答案是："))
            want.append({"subject": s, "index": i, "answer": row[5]})
    loop = _loop_scorer(llama_varied, prompts)
    assert [{k: g[k] for k in ("subject", "index", "answer")} for g in got] == want
    assert [g["pred"] for g in got] == loop
    assert len(set(loop)) >= 3                       # the model's answers vary, so the match means something

    per_subject = {s: sum(g["pred"] == g["answer"] for g in got if g["subject"] == s) / limit for s in subjects}
    assert summary["subjects"] == pytest.approx(per_subject)
    assert summary["accuracy"] == pytest.approx(sum(per_subject.values()) / 3)
    assert summary["accuracy_weighted"] == pytest.approx(sum(g["pred"] == g["answer"] for g in got) / len(got))
    # agronomy: Other; arts: Humanities; college_mathematics: STEM
    assert summary["categories"] == pytest.approx({"STEM": per_subject["college_mathematics"],
                                                   "Humanities": per_subject["arts"],
                                                   "Other": per_subject["agronomy"]})
    assert summary["questions"] == 30 and summary["questions_per_s"] > 0 and summary["truncated"] == 0
    assert f"{100 * summary['accuracy']:.2f}" in table and "college_mathematics" in table


def test_ceval_predictions_and_one_dir_per_model(tmp_path, tiny_varied, capsys):
    data = _ceval_dir(tmp_path / "ceval")
    out = tmp_path / "out"
    assert main(["eval", "--benchmark", "ceval", "--data", data, "--model", tiny_varied, "--model", tiny_varied,
                 "--shots", 1, "--batch-size", 2, "--out", out, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 2 and results[0]["subjects"] == results[1]["subjects"]
    header = "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
    prompts = [_official_prompt(header, CEVAL_ROWS, row, 1, "", "\n答案：") for row in CEVAL_ROWS[2:]]
    loop = _loop_scorer(tiny_varied, prompts)
    for sub in ("0-tiny", "1-tiny"):
        got, summary = _read_out(out / sub)
        assert [g["pred"] for g in got] == loop
        assert [g["answer"] for g in got] == ["C", "D", "A"] and [g["index"] for g in got] == [0, 1, 2]
        right = sum(p == a for p, a in zip(loop, "CDA")) / 3
        assert summary["accuracy"] == pytest.approx(right) and summary["categories"] == {"STEM": pytest.approx(right)}


# -------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case, where, message", [
    ("missing_column", "test/agronomy.csv:1", "missing column 'D'"),
    ("bad_answer", "test/agronomy.csv:3", "answer 'E' is not one of A, B, C, D"),
    ("empty_subject", "test/agronomy.csv", "no questions"),
    ("no_dev", "dev/agronomy.csv", "missing"),
])
def test_bad_data_is_one_line_naming_the_file_and_row(tmp_path, tiny_varied, capsys, case, where, message):
    data = tmp_path / "cmmlu"
    rows = [[0, "问题一", "甲", "乙", "丙", "丁", "A"], [1, "问题二", "甲", "乙", "丙", "丁", "B"]]
    _write_csv(data / "dev" / "agronomy.csv", CMMLU_HEADER, rows)
    if case == "missing_column":
        _write_csv(data / "test" / "agronomy.csv", ",Question,A,B,C,Answer", [r[:5] + r[6:] for r in rows])
    elif case == "bad_answer":
        _write_csv(data / "test" / "agronomy.csv", CMMLU_HEADER, rows[:1] + [rows[1][:6] + ["E"]])
    elif case == "empty_subject":
        _write_csv(data / "test" / "agronomy.csv", CMMLU_HEADER, [])
    else:
        _write_csv(data / "test" / "agronomy.csv", CMMLU_HEADER, rows)
        (data / "dev" / "agronomy.csv").unlink()
    out = tmp_path / "out"
    assert main(["eval", "--benchmark", "cmmlu", "--data", data, "--model", tiny_varied, "--shots", 1,
                 "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and where in err and message in err, err
    assert not out.exists()                          # nothing half-written


def test_benchmark_and_perplexity_flags(tmp_path, tiny_varied, capsys):
    data = _ceval_dir(tmp_path / "ceval")
    assert main(["eval", "--model", tiny_varied]) == 2                               # perplexity needs --text
    assert "--text is required" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "ceval", "--data", data, "--model", tiny_varied, "--shots", 6]) == 2
    assert "--shots 6" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "ceval", "--data", data, "--model", tiny_varied,
                 "--subjects", "astronomy"]) == 2
    assert "unknown ceval subject 'astronomy'" in capsys.readouterr().err
