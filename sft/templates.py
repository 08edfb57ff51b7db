"""Prompt templates: one registry for training, `zhllama generate` and the chat/serve path.

Training (`zhllama.sft.examples`) and inference render prompts with the same `Template` methods, so
the text a model was trained on and the text it is prompted with cannot drift apart.

Built-in templates reproduce published prompts byte for byte:

- `alpaca`: Stanford Alpaca's `PROMPT_DICT` (train.py), one prompt with input and one without; the
  output follows "### Response:" directly.
- `chinese-alpaca`: Chinese-LLaMA-Alpaca v1 (scripts/training/build_dataset.py): the no-input
  Alpaca prompt ending in "### Response: " (with a trailing space); a non-empty input is folded into
  the instruction as `instruction + "\\n" + input`.
- `llama2-chat`: Chinese-LLaMA-Alpaca-2 (Llama-2 chat style) with its default system prompt; input
  folded as in v1.

A user template is a YAML or JSON file (see `Template.from_file` and docs/sft.md).

`Template.chat_template()` writes the same template as a Jinja chat template (the Hugging Face
`chat_template` that transformers, vLLM and llama.cpp render), so a merged model carries the prompt
it was trained with; `zhllama.sft.examples` tokenizes training conversations the way a client
tokenizes that rendered text (see its module doc and docs/sft.md, "Multi-turn ids").

Placeholders are `{instruction}`, `{input}` and `{system}`, substituted in a single pass over the
template text: values are never re-scanned, and any other braces in a template are literal text.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from zhllama.errors import ConfigError, InputError
from zhllama.inputfile import read_text
from zhllama.yamlio import load_yaml

SEAMS = ("continue", "standalone")
TEMPLATE_MAX_BYTES = 1_000_000  # a prompt template is a few hundred bytes; a larger file is a mistake
# {instruction}, {input}, {system} in a template's text (export/ollama.py rewrites them for Ollama).
PLACEHOLDER = re.compile(r"\{(instruction|input|system)\}")

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")
CHINESE_ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: ")
LLAMA2_CHAT_PROMPT = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction} [/INST]"
LLAMA2_DEFAULT_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"


@dataclass(frozen=True)
class Template:
    """How a conversation becomes text.

    The first user turn is rendered with `prompt_input` (when the record has an input and the template
    has such a prompt) or `prompt_no_input`; without `prompt_input`, a non-empty input is folded into
    the instruction as `instruction + input_separator + input`. Later user turns are rendered with
    `turn`. Every assistant response is followed by the EOS token; with `bos_each_turn` every later
    user turn starts with the BOS token (Llama-2 chat does this). `stop` lists strings that end a
    response at inference, besides EOS.

    `response_seam` says how a response is tokenized after its prompt: "continue" (as the text
    continues the prompt, no SentencePiece dummy prefix: the ids Stanford's train.py got by
    tokenizing prompt + output in one piece) or "standalone" (tokenized on its own, dummy prefix
    included: what Chinese-LLaMA-Alpaca v1 and v2 build_dataset.py do). See zhllama.sft.examples.
    """
    name: str
    prompt_no_input: str
    prompt_input: Optional[str] = None
    input_separator: str = "\n"
    system: Optional[str] = None
    turn: Optional[str] = None
    bos_each_turn: bool = False
    stop: Tuple[str, ...] = ()
    description: str = ""
    response_seam: str = "continue"
    # How `render_chat` spells the special tokens between turns (LLaMA's). Token ids are what
    # training and `zhllama.sft.examples.encode_chat_prompt` use; these only make the text readable.
    bos_text: str = "<s>"
    eos_text: str = "</s>"

    @property
    def response_join(self) -> str:
        """The text between a user turn and the reply to it in a rendered conversation: none for a
        "continue" seam; for "standalone", the space the reply's dummy prefix stands for, unless the
        prompts already end with a space (chinese-alpaca's "### Response: ")."""
        if self.response_seam == "continue":
            return ""
        ends = [f for f in (self.prompt_no_input, self.prompt_input, self.turn) if f is not None]
        return "" if all(f.endswith(" ") for f in ends) else " "

    @property
    def has_system(self) -> bool:
        """Whether the template has a `{system}` slot (Alpaca's prompts do not)."""
        return "{system}" in self.prompt_no_input or "{system}" in (self.prompt_input or "")

    # -- rendering -------------------------------------------------------------------------------
    def render_prompt(self, instruction: str, input: str = "", system: Optional[str] = None) -> str:
        """The exact text before the response of a single-turn example (no BOS: the tokenizer adds it)."""
        values = {"instruction": instruction, "input": input or "",
                  "system": self.system if system is None else system}
        values["system"] = values["system"] or ""
        if input and self.prompt_input is not None:
            return _fill(self.prompt_input, values)
        if input:
            values["instruction"] = instruction + self.input_separator + input
        return _fill(self.prompt_no_input, values)

    def render_turn(self, instruction: str) -> str:
        """The text of a later user turn (after the previous response and its EOS)."""
        if self.turn is None:
            raise ConfigError(f"template '{self.name}' has no 'turn' format, so it cannot render "
                              "multi-turn conversations; add one to the template file")
        return _fill(self.turn, {"instruction": instruction, "input": "", "system": ""})

    def segments(self, messages: Sequence[Dict[str, str]], system: Optional[str] = None,
                 input: str = "") -> List[Tuple[str, str]]:
        """The conversation as (kind, text) pieces in order: kind is "prompt" (first user turn),
        "turn" (a later user turn), or "response". This is the one place that decides what text
        goes where; training tokenizes these pieces, `render_chat` joins them."""
        _check_messages(messages)
        out = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                out.append(("response", m["content"]))
            elif i == 0:
                out.append(("prompt", self.render_prompt(m["content"], input, system)))
            else:
                out.append(("turn", self.render_turn(m["content"])))
        return out

    def render_chat(self, messages: Sequence[Dict[str, str]], system: Optional[str] = None) -> str:
        """The prompt for the next assistant turn of a conversation.

        `messages` is [{"role": "user"|"assistant", "content": str}, ...] alternating, starting and
        ending with a user turn. Between turns the EOS (and BOS, with `bos_each_turn`) tokens are
        written as `eos_text`/`bos_text`; to get the exact token ids training uses, call
        `zhllama.sft.examples.encode_chat_prompt` instead of tokenizing this text.
        """
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("render_chat needs messages ending with a user turn")
        text = []
        for kind, piece in self.segments(messages, system):
            if kind == "turn" and self.bos_each_turn:
                text.append(self.bos_text)
            if kind == "response":
                piece = self.response_join + piece + self.eos_text
            text.append(piece)
        return "".join(text)

    # -- the template as data and as a Jinja chat template -----------------------------------------
    def to_dict(self) -> dict:
        """The template's definition, as `from_dict` reads it back (recorded in SFT runs/adapters)."""
        return {"name": self.name, "prompt_no_input": self.prompt_no_input, "prompt_input": self.prompt_input,
                "input_separator": self.input_separator, "system": self.system, "turn": self.turn,
                "bos_each_turn": self.bos_each_turn, "stop": list(self.stop),
                "description": self.description, "response_seam": self.response_seam}

    def chat_template(self) -> str:
        """This template as a Jinja chat template (Hugging Face `chat_template`).

        Rendered with `add_generation_prompt=True` and tokenized as clients do (special tokens
        parsed, no extra BOS), it gives the ids `zhllama.sft.examples.encode_chat_prompt` gives, which
        are the ids training put before each response. Messages: an optional leading
        {"role": "system"} (its content fills `{system}`; ignored by templates without that slot, as in
        training), then user/assistant alternating. Alpaca's input goes in an `input` key of the
        first user message; clients that cannot send extra keys fold it into the content (docs/deploy.md).
        """
        def expr(fmt: str, values: Dict[str, str]) -> str:
            parts, pos = [], 0
            for m in PLACEHOLDER.finditer(fmt):
                if m.start() > pos:
                    parts.append(_jinja_str(fmt[pos:m.start()]))
                parts.append(values[m.group(1)])
                pos = m.end()
            if pos < len(fmt):
                parts.append(_jinja_str(fmt[pos:]))
            return "{{- " + (" ~ ".join(parts) or "''") + " -}}"

        first = {"instruction": "m['content']", "input": "inp", "system": "ns.system"}
        folded = dict(first, instruction="m['content'] ~ " + _jinja_str(self.input_separator))
        if self.prompt_input is not None:
            with_input = expr(self.prompt_input, first)
        else:
            with_input = expr(self.prompt_no_input, dict(folded, instruction=folded["instruction"] + " ~ inp"))
        turn = (expr(self.turn, {"instruction": "m['content']", "input": "''", "system": "''"})
                if self.turn is not None else
                "{{- raise_exception(" + _jinja_str(f"template {self.name} has no turn format: one user message only")
                + ") -}}")
        bos_turn = "{{- bos_token -}}" if self.bos_each_turn else ""
        lines = [
            "{#- zhllama SFT template " + _jinja_str(self.name).replace("#", "") + f" (response_seam {self.response_seam}) -#}}",
            "{%- set ns = namespace(system=" + _jinja_str(self.system or "") + ") -%}",
            "{%- set msgs = messages -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set ns.system = messages[0]['content'] -%}",
            "{%- set msgs = messages[1:] -%}",
            "{%- endif -%}",
            "{{- bos_token -}}",
            "{%- for m in msgs -%}",
            "{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}",
            "{{- raise_exception('messages must alternate user/assistant after an optional system message') -}}",
            "{%- endif -%}",
            "{%- if m['role'] == 'user' and loop.first -%}",
            "{%- set inp = m['input'] if m['input'] is defined and m['input'] else '' -%}",
            "{%- if inp -%}", with_input, "{%- else -%}", expr(self.prompt_no_input, first), "{%- endif -%}",
            "{%- elif m['role'] == 'user' -%}", bos_turn + turn,
            "{%- else -%}",
            "{{- " + (_jinja_str(self.response_join) + " ~ " if self.response_join else "")
            + "m['content'] ~ eos_token -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
        return "\n".join(line for line in lines if line) + "\n"

    # -- user templates --------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path) -> "Template":
        """A template from a YAML (.yaml/.yml) or JSON file with the keys:

        name (default: the file's stem), prompt_no_input (required), prompt_input, input_separator,
        system, turn, bos_each_turn, stop (a string or a list), description, response_seam
        ("continue" or "standalone").
        """
        path = Path(path)
        text = read_text(path, "template", max_bytes=TEMPLATE_MAX_BYTES)
        if path.suffix.lower() != ".json":
            return cls.from_dict(load_yaml(text, str(path), "template file"), source=str(path), default_name=path.stem)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InputError(path, f"not a valid template file: {str(e).splitlines()[0]}",
                             getattr(e, "lineno", None)) from None
        return cls.from_dict(data, source=str(path), default_name=path.stem)

    @classmethod
    def from_dict(cls, data, source: str = "<dict>", default_name: str = "custom") -> "Template":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a template must be a mapping of keys, not {type(data).__name__}")
        known = {"name", "prompt_no_input", "prompt_input", "input_separator", "system", "turn",
                 "bos_each_turn", "stop", "description", "response_seam"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown template key(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        if "prompt_no_input" not in data:
            raise ConfigError(f"{source}: template key 'prompt_no_input' is required")
        for key in ("name", "prompt_no_input", "prompt_input", "input_separator", "system", "turn",
                    "description"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ConfigError(f"{source}: template key '{key}' must be a string, "
                                  f"not {type(data[key]).__name__}")
        if "{instruction}" not in data["prompt_no_input"]:
            raise ConfigError(f"{source}: template key 'prompt_no_input' must contain {{instruction}}")
        if data.get("prompt_input") is not None:
            for slot in ("{instruction}", "{input}"):
                if slot not in data["prompt_input"]:
                    raise ConfigError(f"{source}: template key 'prompt_input' must contain {slot}")
        if data.get("turn") is not None and "{instruction}" not in data["turn"]:
            raise ConfigError(f"{source}: template key 'turn' must contain {{instruction}}")
        if not isinstance(data.get("bos_each_turn", False), bool):
            raise ConfigError(f"{source}: template key 'bos_each_turn' must be true or false")
        seam = data.get("response_seam", "continue")
        if seam not in SEAMS:
            raise ConfigError(f"{source}: template key 'response_seam' must be one of {', '.join(SEAMS)}")
        stop = data.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"{source}: template key 'stop' must be a string or a list of non-empty strings")
        return cls(name=data.get("name") or default_name, prompt_no_input=data["prompt_no_input"],
                   prompt_input=data.get("prompt_input"),
                   input_separator=data.get("input_separator", "\n"), system=data.get("system"),
                   turn=data.get("turn"), bos_each_turn=data.get("bos_each_turn", False),
                   stop=tuple(stop), description=data.get("description", ""), response_seam=seam)


def _jinja_str(text: str) -> str:
    """`text` as a Jinja string literal (JSON escapes are valid Jinja escapes; non-ASCII kept as is)."""
    return json.dumps(text, ensure_ascii=False)


def _fill(template: str, values: Dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _check_messages(messages) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one user message")
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': '{want}', 'content': str}} "
                             "(messages alternate user/assistant, starting with user)")


_BUILTIN = {
    "alpaca": Template(
        name="alpaca", prompt_input=ALPACA_PROMPT_INPUT, prompt_no_input=ALPACA_PROMPT_NO_INPUT,
        turn="\n\n### Instruction:\n{instruction}\n\n### Response:", stop=("### Instruction:",),
        description="Stanford Alpaca PROMPT_DICT (with and without input)"),
    "chinese-alpaca": Template(
        name="chinese-alpaca", prompt_no_input=CHINESE_ALPACA_PROMPT, input_separator="\n",
        turn="\n\n### Instruction:\n{instruction}\n\n### Response: ", stop=("### Instruction:",),
        response_seam="standalone", description="Chinese-LLaMA-Alpaca v1 (input folded into the instruction)"),
    "llama2-chat": Template(
        name="llama2-chat", prompt_no_input=LLAMA2_CHAT_PROMPT, input_separator="\n",
        system=LLAMA2_DEFAULT_SYSTEM, turn="[INST] {instruction} [/INST]", bos_each_turn=True,
        stop=("[INST]",), response_seam="standalone",
        description="Chinese-LLaMA-Alpaca-2 / Llama-2 chat, with a system prompt"),
}


def list_templates() -> List[str]:
    """Names of the built-in templates."""
    return sorted(_BUILTIN)


def get_template(name_or_path) -> Template:
    """A built-in template by name, a `Template` as is, or a user template from a YAML/JSON file."""
    if isinstance(name_or_path, Template):
        return name_or_path
    key = str(name_or_path)
    if key in _BUILTIN:
        return _BUILTIN[key]
    path = Path(key)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or os.path.lexists(path):
        if not os.path.lexists(path):
            raise InputError(path, "template file not found")
        return Template.from_file(path)     # a FIFO, a broken link, a directory: one line saying which
    raise ConfigError(f"unknown template '{key}' (built-in: {', '.join(list_templates())}; "
                      "or the path of a .yaml/.json template file)")
