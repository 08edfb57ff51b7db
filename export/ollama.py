"""An Ollama Modelfile for a merged model: the SFT template as Ollama's Go template.

Ollama does not read Hugging Face Jinja templates; its TEMPLATE is a Go text/template over
`.Messages` (role, content) and `.System`. This writes the same text `Template.render_chat` and the
Jinja chat template render: the first user message through the template's prompt, later ones through
its `turn`, each reply after `response_join` and followed by EOS. Alpaca's input has no place in
Ollama's messages: fold it into the user message (docs/deploy.md).
"""

import json

from zhllama.sft.templates import PLACEHOLDER, Template


def _go_text(text: str) -> str:
    """Literal text in a Go template: only "{{" is special."""
    return text.replace("{{", '{{ "{{" }}')


def _go(fmt: str, values: dict) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], _go_text(fmt))


def go_template(t: Template, bos: str = "<s>", eos: str = "</s>") -> str:
    content = "{{ $m.Content }}"
    first = _go(t.prompt_no_input, {"instruction": content, "input": "", "system": "{{ $.System }}"})
    turn = _go(t.turn, {"instruction": content, "input": "", "system": ""}) if t.turn is not None else first
    bos_turn = bos if t.bos_each_turn else ""
    return ("{{- $first := true }}{{- range $i, $m := .Messages }}"
            '{{- if eq $m.Role "user" }}{{ if $first }}' + first + "{{ $first = false }}{{ else }}"
            + bos_turn + turn + "{{ end }}"
            '{{- else if eq $m.Role "assistant" }}' + _go_text(t.response_join) + "{{ $m.Content }}" + eos
            + "{{ end }}{{ end }}")


def modelfile(t: Template, source: str = ".", eos: str = "</s>") -> str:
    """The Modelfile text: FROM `source` (the merged dir, or a GGUF converted from it), the template,
    its default system prompt and stop strings."""
    lines = [f"# Ollama Modelfile written by `zhllama merge --ollama-modelfile` (SFT template '{t.name}')",
             f"# Build: ollama create NAME -f Modelfile   (docs/deploy.md)", f"FROM {source}",
             f'TEMPLATE """{go_template(t, eos=eos)}"""']
    if t.has_system:
        lines.append(f'SYSTEM """{t.system or ""}"""')
    for stop in (eos, *t.stop):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
