"""Prompt templates render byte-identically to the published prompts; user templates load from files.

The reference strings below are spelled out literally (copied from Stanford Alpaca train.py
PROMPT_DICT, Chinese-LLaMA-Alpaca and Chinese-LLaMA-Alpaca-2 scripts/training/build_dataset.py),
not built from the module's own constants.
"""

import json

import pytest

from zhllama.errors import ConfigError, InputError, UserError
from zhllama.sft.templates import Template, get_template, list_templates

STANFORD_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:")
STANFORD_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\nName three colors.\n\n### Response:")
CHINESE_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n列出三种颜色。\n\n### Response: ")
CHINESE_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n把下面的句子翻译成英文。\n今天天气很好。\n\n### Response: ")
LLAMA2_NO_INPUT = (
    "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
    "列出三种颜色。 [/INST]")
LLAMA2_WITH_INPUT_CUSTOM_SYSTEM = (
    "[INST] <<SYS>>\n你是翻译。\n<</SYS>>\n\n把下面的句子翻译成英文。\n今天天气很好。 [/INST]")


def test_alpaca_matches_stanford_prompt_dict():
    t = get_template("alpaca")
    assert t.render_prompt("Translate to French.", "Good morning") == STANFORD_PROMPT_INPUT
    assert t.render_prompt("Name three colors.") == STANFORD_PROMPT_NO_INPUT
    assert t.render_prompt("Name three colors.", "") == STANFORD_PROMPT_NO_INPUT
    # Stanford's format_map on the same literal template gives the same bytes
    stanford = ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
    assert t.render_prompt("x {y} z") == stanford.format_map({"instruction": "x {y} z"})


def test_chinese_alpaca_matches_v1_build_dataset():
    t = get_template("chinese-alpaca")
    assert t.render_prompt("列出三种颜色。") == CHINESE_ALPACA_NO_INPUT
    assert t.render_prompt("把下面的句子翻译成英文。", "今天天气很好。") == CHINESE_ALPACA_WITH_INPUT
    assert t.render_prompt("列出三种颜色。").endswith("### Response: ")  # the trailing space


def test_llama2_chat_matches_v2_with_system_prompt():
    t = get_template("llama2-chat")
    assert t.render_prompt("列出三种颜色。") == LLAMA2_NO_INPUT
    assert t.render_prompt("把下面的句子翻译成英文。", "今天天气很好。", system="你是翻译。") \
        == LLAMA2_WITH_INPUT_CUSTOM_SYSTEM
    assert t.system == "You are a helpful assistant. 你是一个乐于助人的助手。"


def test_values_are_not_rescanned_for_placeholders():
    t = get_template("alpaca")
    out = t.render_prompt("say {input} and {system}", "in {instruction}")
    assert "### Instruction:\nsay {input} and {system}\n\n### Input:\nin {instruction}\n\n" in out


@pytest.mark.parametrize("name", ["alpaca", "chinese-alpaca", "llama2-chat"])
def test_render_chat_single_turn_equals_render_prompt(name):
    t = get_template(name)
    assert t.render_chat([{"role": "user", "content": "你好"}]) == t.render_prompt("你好")
    assert t.render_chat([{"role": "user", "content": "hi"}], system="S") == t.render_prompt("hi", system="S")


def test_render_chat_multi_turn_literal():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "再见"}]
    assert get_template("llama2-chat").render_chat(msgs) == (
        "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
        "Hi [/INST] Hello!</s><s>[INST] 再见 [/INST]")
    assert get_template("alpaca").render_chat(msgs) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nHi\n\n### Response:Hello!</s>"
        "\n\n### Instruction:\n再见\n\n### Response:")


def test_render_chat_rejects_bad_message_lists():
    t = get_template("alpaca")
    with pytest.raises(ValueError, match="ending with a user turn"):
        t.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="alternate"):
        t.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_registry_lists_builtins_and_refuses_unknown_names():
    assert list_templates() == ["alpaca", "chinese-alpaca", "llama2-chat"]
    with pytest.raises(ConfigError, match="unknown template 'vicuna'.*alpaca, chinese-alpaca, llama2-chat"):
        get_template("vicuna")
    assert get_template(get_template("alpaca")).name == "alpaca"


def test_builtin_stop_strings_and_seams():
    assert get_template("alpaca").stop == ("### Instruction:",)
    assert get_template("llama2-chat").stop == ("[INST]",)
    assert get_template("alpaca").response_seam == "continue"
    assert get_template("chinese-alpaca").response_seam == "standalone"


USER_YAML = """\
name: zh-qa
description: question / answer in Chinese
system: 你是一个助手。
prompt_no_input: "{system}\\n问：{instruction}\\n答："
prompt_input: "{system}\\n问：{instruction}\\n材料：{input}\\n答："
turn: "\\n问：{instruction}\\n答："
stop: "问："
"""


def test_user_template_from_yaml(tmp_path):
    f = tmp_path / "zh-qa.yaml"
    f.write_text(USER_YAML, encoding="utf-8")
    t = get_template(str(f))
    assert t.name == "zh-qa" and t.stop == ("问：",) and t.has_system
    assert t.render_prompt("一加一等于几？") == "你是一个助手。\n问：一加一等于几？\n答："
    assert t.render_prompt("总结", "材料内容", system="S") == "S\n问：总结\n材料：材料内容\n答："
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    assert t.render_chat(msgs) == "你是一个助手。\n问：a\n答：b</s>\n问：c\n答："


def test_user_template_from_json_defaults_name_to_stem(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"prompt_no_input": "Q: {instruction}\nA:", "response_seam": "standalone"}))
    t = get_template(f)
    assert t.name == "mine" and t.render_prompt("x", "y") == "Q: x\ny\nA:"
    assert t.response_seam == "standalone" and not t.has_system
    with pytest.raises(ConfigError, match="no 'turn' format"):
        t.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}])


@pytest.mark.parametrize("body, message", [
    ({"prompt_input": "{instruction} {input}"}, "'prompt_no_input' is required"),
    ({"prompt_no_input": "no slot"}, "must contain {instruction}"),
    ({"prompt_no_input": "{instruction}", "prompt_input": "{instruction}"}, "must contain {input}"),
    ({"prompt_no_input": "{instruction}", "stopp": "x"}, "unknown template key\\(s\\) stopp"),
    ({"prompt_no_input": "{instruction}", "bos_each_turn": "yes"}, "'bos_each_turn' must be true or false"),
    ({"prompt_no_input": "{instruction}", "response_seam": "glue"}, "'response_seam' must be one of"),
    ({"prompt_no_input": 3}, "'prompt_no_input' must be a string"),
])
def test_bad_user_templates_name_the_file_and_key(tmp_path, body, message):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=message) as e:
        get_template(f)
    assert str(f) in str(e.value)


def test_unparsable_or_missing_template_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\nprompt_no_input: [unclosed\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"broken.yaml:\d+: not a valid template file"):
        get_template(f)
    with pytest.raises(UserError, match="template file not found"):
        get_template(tmp_path / "nope.yaml")
