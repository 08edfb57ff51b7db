"""SFT tokenization: labels -100 exactly on the prompt (every template, with and without input,
multi-turn), the ids the published recipes produce, truncation and dropping, the dataset, collate,
and packing without attention across examples.

Expected ids are computed independently with the `sentencepiece` library (not through the code under
test) wherever possible.
"""

import io
import json
import logging

import pytest
import sentencepiece as spm
import torch

from conftest import shared_path
from zhllama.modelio import load_tokenizer
from zhllama.sft.dataset import SFTDataset, collate, default_pad_id, pack_examples
from zhllama.sft.examples import (IGNORE_INDEX, build_example, decode_response, encode_chat_prompt,
                                  encode_prompt, tokenize_record)
from zhllama.sft.records import Record, Turn
from zhllama.sft.templates import get_template
from zhllama.tiny import TINY_TEXT, make_tiny_sp

TEMPLATES = ["alpaca", "chinese-alpaca", "llama2-chat"]
# Of the 175 Stanford seed tasks, those where no token of the LLaMA tokenizer spans the prompt/response seam
# in whole-text tokenization (counted once from ../shared/data/sft/seed_tasks_alpaca_en.jsonl; a property of
# the data and the tokenizer, not of zhllama)
SEAMLESS_SEED_TASKS = 162
SFT_TEXT = TINY_TEXT + """Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction: ### Input: ### Response: [INST] <<SYS>> <</SYS>> [/INST] You are a helpful assistant.
你是一个乐于助人的助手。请把下面的句子翻译成英文。列出三种颜色：红色、黄色、蓝色。
Translate the sentence into English. Name three colors: red, yellow and blue.
"""

EXAMPLES = [  # (instruction, input, output)
    ("Name three colors.", "", "Red, yellow and blue."),
    ("请把下面的句子翻译成英文。", "今天天气很好。", "The weather is good today."),
    ("列出三种颜色。", "", "红色、黄色、蓝色。"),
    ("Translate the sentence into English.", "我们学习自然语言处理。", "We study natural language processing."),
]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(HF tokenizer, sentencepiece processor) of a tiny English + Chinese BPE model."""
    f = make_tiny_sp(tmp_path_factory.mktemp("sft_tok") / "tokenizer.model", text=SFT_TEXT, vocab_size=700)
    return load_tokenizer(f), spm.SentencePieceProcessor(model_file=str(f))


@pytest.fixture(scope="session")
def llama():
    f = shared_path("data/llama/tokenizer.model")
    return load_tokenizer(f), spm.SentencePieceProcessor(model_file=str(f))


def single(ins, inp, out, system=None):
    return Record(turns=[Turn(ins, out)], input=inp, system=system, source="test:1")


def assert_single_turn_masked(tok, sp, name, ins, inp, out):
    t = get_template(name)
    ex = build_example(single(ins, inp, out), tok, name)
    ids, labels = ex["input_ids"], ex["labels"]
    prompt = [sp.bos_id()] + sp.encode(t.render_prompt(ins, inp))  # independent of the code under test
    p = len(prompt)
    assert ids[:p] == prompt
    assert encode_prompt(tok, name, ins, inp) == prompt  # inference uses the same ids
    assert labels[:p] == [IGNORE_INDEX] * p
    assert labels[p:] == ids[p:] and all(x != IGNORE_INDEX for x in labels[p:])
    assert ids[-1] == sp.eos_id() and sp.eos_id() not in ids[:-1]
    # the seam: joined ids decode to prompt + response ("continue") or prompt + " " + response
    sep = " " if t.response_seam == "standalone" else ""
    assert sp.decode(ids[1:-1]) == t.render_prompt(ins, inp) + sep + out
    if t.response_seam == "standalone":
        assert ids[p:-1] == sp.encode(out)
    assert decode_response(tok, name, ids[p:]) == out


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("k", range(len(EXAMPLES)))
def test_labels_mask_exactly_the_prompt(tiny, name, k):
    assert_single_turn_masked(*tiny, name, *EXAMPLES[k])


CONVERSATION = [("你好", "你好！有什么可以帮你？"), ("Name three colors.", "Red, yellow and blue."),
                ("请把下面的句子翻译成英文。", "Please translate.")]


@pytest.mark.parametrize("name", TEMPLATES)
def test_multi_turn_masks_every_user_turn(tiny, name):
    """Every reply (and its EOS) is trained, nothing else; the ids before the last reply are what
    inference feeds (earlier replies tokenized with their user turn, as a client tokenizes the
    rendered conversation: sft/examples.py)."""
    tok, sp = tiny
    t = get_template(name)
    rec = Record(turns=[Turn(u, a) for u, a in CONVERSATION], system=None)
    ex = build_example(rec, tok, name, max_length=4096)
    ids, labels = ex["input_ids"], ex["labels"]
    msgs = [m for u, a in CONVERSATION for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    prefix = encode_chat_prompt(tok, name, msgs[:-1])  # what inference feeds before the last answer
    assert ids[:len(prefix)] == prefix
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
            if i == sp.eos_id():
                runs.append(cur)
                cur = []
        else:
            assert not cur, "a trained run must end with EOS"
    assert cur == [] and len(runs) == len(CONVERSATION)
    for run, (_, answer) in zip(runs, CONVERSATION):
        assert sp.decode(run[:-1]).strip() == answer
    # the rendered conversation (the chat template's text) is what the ids decode to, turn by turn
    sep = t.response_join
    for k, (user, answer) in enumerate(CONVERSATION[:-1]):
        text = t.render_prompt(user) if k == 0 else t.render_turn(user)
        assert text + sep + answer in sp.decode(ids)
    if t.bos_each_turn:
        assert ids.count(sp.bos_id()) == len(CONVERSATION)
    else:
        assert ids.count(sp.bos_id()) == 1


def test_stanford_ids_equal_whole_text_tokenization(tiny):
    """Stanford's train.py tokenized prompt + output + EOS in one piece and masked the prompt length."""
    tok, sp = tiny
    t = get_template("alpaca")
    for ins, inp, out in EXAMPLES:
        prompt = t.render_prompt(ins, inp)
        whole = [sp.bos_id()] + sp.encode(prompt + out) + [sp.eos_id()]
        ex = build_example(single(ins, inp, out), tok, "alpaca")
        assert ex["input_ids"] == whole


@pytest.mark.parametrize("name", ["chinese-alpaca", "llama2-chat"])
def test_chinese_llama_alpaca_ids_equal_their_build_dataset(tiny, name):
    """Their build_dataset.py: tokenizer(source) and tokenizer(f"{output}{eos_token}",
    add_special_tokens=False), joined; labels -100 on the source."""
    tok, sp = tiny
    t = get_template(name)
    for ins, inp, out in EXAMPLES:
        instruction = ins + "\n" + inp if inp else ins
        source = t.render_prompt(instruction)  # their PROMPT_TEMPLATE.format_map(...)
        s = [sp.bos_id()] + sp.encode(source)
        target = tok.encode(f"{out}{tok.eos_token}", add_special_tokens=False)
        ex = build_example(single(ins, inp, out), tok, name)
        assert ex["input_ids"] == s + target
        assert ex["labels"] == [IGNORE_INDEX] * len(s) + target


def test_truncation_cuts_the_response_never_the_prompt(tiny):
    tok, sp = tiny
    ins, inp = EXAMPLES[1][:2]
    long_out = "We study natural language processing. " * 40
    p = len(encode_prompt(tok, "alpaca", ins, inp))
    rec = single(ins, inp, long_out)
    r = tokenize_record(rec, tok, "alpaca", max_length=p + 10)
    ids, labels = r.example["input_ids"], r.example["labels"]
    assert r.truncated and len(ids) == p + 10
    assert ids[:p] == encode_prompt(tok, "alpaca", ins, inp) and labels[:p] == [IGNORE_INDEX] * p
    assert labels[p:] == ids[p:] and sp.eos_id() not in ids  # cut response: no EOS taught
    one = build_example(rec, tok, "alpaca", max_length=p + 1)
    assert sum(x != IGNORE_INDEX for x in one["labels"]) == 1
    for m in (p, p - 5):
        assert build_example(rec, tok, "alpaca", max_length=m) is None
        assert f"prompt is {p} tokens" in tokenize_record(rec, tok, "alpaca", max_length=m).dropped
    short = tokenize_record(single(ins, inp, "Yes."), tok, "alpaca", max_length=512)
    assert not short.truncated


def test_multi_turn_truncation_drops_an_unanswered_user_turn(tiny):
    tok, sp = tiny
    rec = Record(turns=[Turn(u, a) for u, a in CONVERSATION])
    full = build_example(rec, tok, "llama2-chat", max_length=4096)["input_ids"]
    first_eos = full.index(sp.eos_id())
    second_answer = encode_chat_prompt(tok, "llama2-chat", rec.messages()[:3])
    cut = len(second_answer) - 2  # inside the second user turn
    ex = build_example(rec, tok, "llama2-chat", max_length=cut)
    assert ex["input_ids"] == full[:first_eos + 1]
    assert ex["labels"][-1] == sp.eos_id()


def test_continuation_falls_back_when_the_anchor_merges(tmp_path):
    """A tokenizer with a "\\n\\n" piece merges the "\\n" anchor with a response starting with "\\n";
    the next anchor is used and the seam still decodes exactly."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SFT_TEXT.splitlines() * 20), model_writer=buf, model_type="bpe",
        vocab_size=600, byte_fallback=True, user_defined_symbols=["\n\n"], hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    f = tmp_path / "tokenizer.model"
    f.write_bytes(buf.getvalue())
    tok, sp = load_tokenizer(f), spm.SentencePieceProcessor(model_file=str(f))
    assert len(sp.encode("\n\n")) == 2 and sp.id_to_piece(sp.encode("\n\n")[1]) == "\n\n"
    out = "\nRed, yellow and blue."
    ex = build_example(single("Name three colors.", "", out), tok, "alpaca")
    prompt = get_template("alpaca").render_prompt("Name three colors.")
    assert sp.decode(ex["input_ids"][1:-1]) == prompt + out


@pytest.fixture
def sft_files(tmp_path):
    good = [{"instruction": i, "input": n, "output": o} for i, n, o in EXAMPLES]
    f = tmp_path / "train.jsonl"
    rows = good + [{"instruction": "Name three colors. " * 60, "output": "Red."},  # prompt too long
                   {"instruction": "no output"}]  # bad record
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return f, len(good)


def test_dataset_counts_and_logs_dropped_examples(tiny, sft_files, caplog):
    tok, sp = tiny
    f, n_good = sft_files
    with caplog.at_level(logging.INFO):
        ds = SFTDataset([str(f)], tok, "chinese-alpaca", max_length=128)
    assert len(ds) == n_good
    assert dict(ds.stats.skipped) == {"missing_field": 1}
    assert dict(ds.stats.dropped) == {"no_response_token": 1}
    assert ds.stats.first_dropped[0].startswith(f"{f}:{n_good + 1}: prompt is ")
    assert f"{f}:{n_good + 1}: prompt is " in caplog.text and "dropped 1" in caplog.text
    assert f"{f}:{n_good + 2}: missing field 'output'" in caplog.text
    item = ds[0]
    assert set(item) == {"input_ids", "labels"} and item["input_ids"].dtype == torch.long
    direct = build_example(single(*EXAMPLES[0]), tok, "chinese-alpaca", max_length=128)
    assert item["input_ids"].tolist() == direct["input_ids"] and item["labels"].tolist() == direct["labels"]
    stats = ds.stats.as_dict()
    assert stats["examples"] == n_good and stats["tokens"] == sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    json.dumps(stats)  # JSON-ready for the run directory


def test_collate_right_pads_with_masked_labels(tiny, sft_files):
    tok, sp = tiny
    ds = SFTDataset([str(sft_files[0])], tok, "alpaca", max_length=128)
    items = [ds[i] for i in range(len(ds))]
    lengths = [len(x["input_ids"]) for x in items]
    pad = default_pad_id(tok)
    assert pad == sp.eos_id()  # LLaMA has no pad token: EOS, masked by the lengths
    batch = collate(items, pad)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (len(items), max(lengths))
    for row, (x, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], x["input_ids"])
        assert torch.equal(batch["labels"][row, :n], x["labels"])
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert collate(items, pad, pad_to_multiple_of=64)["input_ids"].shape[1] % 64 == 0


@pytest.mark.slow
def test_packing_keeps_attention_within_each_example(tiny, sft_files):
    from transformers import LlamaForCausalLM

    from zhllama.tiny import tiny_llama_config

    tok, sp = tiny
    plain = SFTDataset([str(sft_files[0])], tok, "alpaca", max_length=300)
    packed = SFTDataset([str(sft_files[0])], tok, "alpaca", max_length=300, pack=True)
    assert len(packed) < len(plain)
    seq = packed[0]
    starts = [i for i, p in enumerate(seq["position_ids"].tolist()) if p == 0]
    assert len(starts) >= 2 and all(seq["labels"][s] == IGNORE_INDEX for s in starts)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=32, num_heads=2,
                                               intermediate_size=64)).eval()
    batch = collate([packed[0], plain[0]], default_pad_id(tok))
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache HF skips the packed-sequence mask
        packed_logits = model(**batch, use_cache=False).logits[0]
        bounds = starts + [len(seq["input_ids"])]
        for k in range(len(starts)):
            alone = plain[k]["input_ids"]
            assert torch.equal(seq["input_ids"][bounds[k]:bounds[k + 1]], alone)
            ref = model(input_ids=alone[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[bounds[k]:bounds[k + 1]], ref, atol=1e-5, rtol=1e-4)
    # order and content preserved
    flat = [x for item in pack_examples([{k: v.tolist() for k, v in plain[i].items()} for i in range(len(plain))],
                                        300) for x in item["input_ids"]]
    assert flat == [x for i in range(len(plain)) for x in plain[i]["input_ids"].tolist()]


def test_real_llama_tokenizer_stanford_seam_and_belle_smoke(llama):
    tok, sp = llama
    seeds = shared_path("data/sft/seed_tasks_alpaca_en.jsonl")
    t = get_template("alpaca")
    same = 0
    for line in seeds.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        inst = task["instances"][0]
        ins, inp, out = task["instruction"], inst["input"], inst["output"]
        ids = build_example(single(ins, inp, out), tok, "alpaca", max_length=4096)["input_ids"]
        prompt = t.render_prompt(ins, inp)
        # Stanford tokenized with the HF tokenizer (which differs from sentencepiece on runs of
        # spaces, e.g. "  Car": HF "▁▁","Car", sentencepiece "▁","▁Car"), so compare with HF here.
        p = [sp.bos_id()] + tok.encode(prompt, add_special_tokens=False)
        whole = [sp.bos_id()] + tok.encode(prompt + out, add_special_tokens=False) + [sp.eos_id()]
        assert ids[:len(p)] == p
        assert sp.decode(ids[1:-1]) == prompt + out
        # Where no token spans the seam in Stanford's whole-text tokenization, the ids are Stanford's;
        # where one does, they differ (the response is tokenized on its own, as training must).
        seamless = whole[:len(p)] == p
        assert (ids == whole) == seamless, ins
        same += seamless
    assert same == SEAMLESS_SEED_TASKS

    belle = shared_path("data/sft/belle_eval_set_zh.json")
    ds = SFTDataset([str(belle)], tok, "chinese-alpaca", field_map="instruction=question,output=std_answer")
    rows = [json.loads(ln) for ln in belle.read_text(encoding="utf-8").splitlines() if ln.strip()]
    answered = [r for r in rows if r["std_answer"].strip()]
    assert (len(rows), len(answered)) == (1000, 631)     # what README.md says of the set
    too_long = sum(len(encode_prompt(tok, "chinese-alpaca", r["question"])) >= 512 for r in answered)
    assert len(ds) == len(answered) - too_long
    assert sum(ds.stats.dropped.values()) == too_long
    assert max(len(ds[i]["input_ids"]) for i in range(len(ds))) <= 512
