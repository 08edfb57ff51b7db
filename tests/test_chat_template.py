"""The SFT template as a Jinja chat template (issue 14): what any client renders and tokenizes is what
training put before each reply.

For every built-in template and two user templates, on single-turn (with and without input), system
and multi-turn conversations: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`
gives the ids `encode_chat_prompt` gives (generate/serve) and the ids training placed before the last
reply (labels -100), on a tiny tokenizer and on the real LLaMA / Chinese-LLaMA-2 tokenizers when
../shared has them.
"""

import jinja2
import pytest

from conftest import shared_path
from zhllama.hf_tokenizer import hf_tokenizer_from_proto
from zhllama.modelio import load_tokenizer
from zhllama.sft.examples import IGNORE_INDEX, build_example, encode_chat_prompt
from zhllama.sft.records import Record, Turn
from zhllama.sft.templates import Template, get_template, list_templates

USER_CONTINUE = {  # a user template with every slot: input prompt, system, turn; "continue" seam
    "name": "my-chat", "system": "你是助手。",
    "prompt_no_input": "<|system|>{system}\n<|user|>{instruction}\n<|assistant|>",
    "prompt_input": "<|system|>{system}\n<|user|>{instruction}\n<|input|>{input}\n<|assistant|>",
    "turn": "\n<|user|>{instruction}\n<|assistant|>", "stop": ["<|user|>"]}
USER_STANDALONE = {  # no input prompt (input folded), no system slot, "standalone" seam, BOS each turn
    "name": "my-qa", "prompt_no_input": "问：{instruction}\n答：", "turn": "问：{instruction}\n答：",
    "input_separator": "\n\n", "response_seam": "standalone", "bos_each_turn": True}
TEMPLATES = list_templates() + ["user-continue", "user-standalone"]


def _template(name) -> Template:
    return {"user-continue": Template.from_dict(USER_CONTINUE),
            "user-standalone": Template.from_dict(USER_STANDALONE)}.get(name) or get_template(name)


def user(text, **kw):
    return {"role": "user", "content": text, **kw}


def assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "single": [user("用一句话介绍北京。")],
    "single-input": [user("请把下面的句子翻译成英文。", input="今天天气很好。")],
    "system": [{"role": "system", "content": "You answer briefly. 请简短回答。"}, user("Name three colors.")],
    "multi-turn": [user("你好"), assistant("你好！有什么可以帮你？"), user("Name three colors."),
                   assistant("1. Red, yellow and blue."), user("请把上面的答案翻译成中文。")],
    "multi-turn-system-input": [{"role": "system", "content": "请用中文回答。"},
                                user("翻译这句话。", input="I like tea."), assistant("我喜欢茶。"),
                                user("再翻译一句：I like coffee."), assistant(" 我喜欢咖啡。"), user("谢谢！")],
}


def _record(messages, reply="好的。") -> Record:
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    msgs = [m for m in messages if m["role"] != "system"] + [assistant(reply)]
    turns = [Turn(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])]
    return Record(turns=turns, system=system, input=msgs[0].get("input", ""), source="test:1")


def _split(messages):
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    return msgs, system, next((m.get("input", "") for m in messages if m["role"] == "user"), "")


def _chat_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _training_prompt(tok, template, messages):
    """The ids training put before the last reply of `messages` + a reply (all -100 there)."""
    ex = build_example(_record(messages), tok, template, max_length=4096)
    ids, labels = ex["input_ids"], ex["labels"]
    p = max(i for i, lab in enumerate(labels) if lab == IGNORE_INDEX) + 1
    assert all(lab != IGNORE_INDEX for lab in labels[p:])
    return ids[:p]


def _check(tok, name, conv):
    template = _template(name)
    messages = CONVERSATIONS[conv]
    if template.turn is None and sum(m["role"] == "user" for m in messages) > 1:
        pytest.skip(f"template {name} has no turn format")
    tok.chat_template = template.chat_template()
    msgs, system, inp = _split(messages)
    want = encode_chat_prompt(tok, template, msgs, system=system, input=inp)
    assert _chat_ids(tok, messages) == want
    assert _training_prompt(tok, template, messages) == want
    # and the text is the registry's text (render_chat), after the BOS
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not inp:
        assert text == tok.bos_token + template.render_chat(msgs, system=system)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_apply_chat_template_ids_equal_training_prompt_ids(tiny, name, conv):
    _check(tiny, name, conv)


@pytest.mark.parametrize("model", ["data/llama/tokenizer.model", "data/anchors/chinese_llama2_tokenizer.model"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_same_on_real_llama_tokenizers(model, name):
    tok = hf_tokenizer_from_proto(shared_path(model))
    for conv in CONVERSATIONS:
        _check(tok, name, conv)


def test_rendered_reply_seam_is_the_issue_case(tiny):
    """Issue 14, 4: after chinese-alpaca's "### Response: " an earlier reply appears in the training ids
    exactly as the rendered conversation tokenizes, not as a stand-alone "▁" + "▁我…"."""
    t = get_template("chinese-alpaca")
    tiny.chat_template = t.chat_template()
    msgs = [user("你好"), assistant("我是助手。"), user("再见")]
    ids = _chat_ids(tiny, msgs)
    section = tiny(t.render_prompt("你好") + "我是助手。", add_special_tokens=False)["input_ids"]
    assert ids[1:1 + len(section)] == section
    assert _training_prompt(tiny, t, msgs) == ids


def test_template_round_trips_through_its_recorded_definition():
    for name in TEMPLATES:
        t = _template(name)
        assert Template.from_dict(t.to_dict()) == t
        assert Template.from_dict(t.to_dict()).chat_template() == t.chat_template()


def test_bad_message_order_is_refused(tiny):
    tiny.chat_template = get_template("alpaca").chat_template()
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        tiny.apply_chat_template([user("a"), user("b")], add_generation_prompt=True, tokenize=False)
