"""Records -> token ids and labels, and the prompt ids inference must use.

The conversation is cut into pieces by `Template.segments` (first prompt, later user turns,
responses). Labels are -100 on every prompt and user-turn token and equal to the ids on every
response token and the EOS that ends each response.

What a model sees at inference through any client is the template's text (`Template.chat_template`,
shipped with a merged model) tokenized by that client: Hugging Face's tokenizer.json, vLLM and
llama.cpp (and Ollama) all split the text at special tokens and tokenize each part as a fresh
SentencePiece sequence, dummy prefix included. Training tokenizes the same way:

- the first user turn: BOS + tokenize(prompt); a later user turn: a fresh sequence too, after BOS
  with `bos_each_turn` (Llama-2 chat) or right after the previous EOS otherwise;
- an earlier reply (one that later turns follow) is tokenized together with the user turn before it,
  `tokenize(turn + template.response_join + reply)`, exactly as that rendered text is tokenized when a
  client sends the conversation back; its labels are the ids past the prompt's own ids (a token that
  spans the seam counts as reply);
- the last reply follows the generation prompt, tokenize(prompt) exactly (what a client sends
  before asking for it), and is tokenized by the template's `response_seam`, + EOS.

So for every template, `encode_chat_prompt` (generate/serve), the rendered chat template tokenized
by a client, and the ids training put before each reply are the same ids (tests/test_chat_template.py).
Single-turn examples are unchanged by this: prompt + last reply.

The seam of the last reply. SentencePiece tokenizes a text on its own with a "dummy prefix": "Hello"
alone is "▁Hello", a space that is in neither the prompt nor the response. Published recipes differ
here, and each built-in template reproduces its source's ids:

- "continue" (alpaca, and the default for user templates): the response is tokenized as it
  continues the prompt, without the dummy prefix. We tokenize `anchor + text` and drop the anchor's
  ids (checked to be an unchanged prefix), which gives the ids the tokenizer assigns the text
  mid-sentence. The joined ids decode to exactly prompt + response, and equal Stanford's train.py
  ids (it tokenized prompt + output in one piece) wherever no token spans the seam.
- "standalone" (chinese-alpaca, llama2-chat): the response is tokenized alone, dummy prefix
  included, exactly as Chinese-LLaMA-Alpaca v1/v2 build_dataset.py do; the joined ids decode to
  prompt + " " + response (for Llama-2 chat that is Meta's "[/INST] answer" spacing).

`decode_response` turns generated ids back into the response text.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from zhllama.log import get_logger
from zhllama.textenc import encode_text

from .records import Record
from .templates import Template, get_template

log = get_logger("zhllama.sft.examples")

IGNORE_INDEX = -100
# Tried in order; the first whose ids stay an unchanged prefix of anchor + text is used.
_ANCHORS = ("\n", "。", "\t", "#")
_anchor_cache: Dict[int, Dict[str, List[int]]] = {}
_warned = set()


def encode(tokenizer, text: str) -> List[int]:
    """Ids of `text` as the start of a sequence, without special tokens (a dummy prefix, if the
    tokenizer uses one, is included). A literal "</s>" in the text stays text (zhllama.textenc):
    BOS/EOS come only from `_pieces`, by id."""
    return encode_text(tokenizer, text)


def encode_continuation(tokenizer, text: str) -> List[int]:
    """Ids of `text` as it continues earlier text: no SentencePiece dummy prefix."""
    if not text:
        return []
    cache = _anchor_cache.setdefault(id(tokenizer), {})
    for anchor in _ANCHORS:
        if anchor not in cache:
            cache[anchor] = encode(tokenizer, anchor)
        prefix = cache[anchor]
        ids = encode(tokenizer, anchor + text)
        if ids[:len(prefix)] == prefix:
            return ids[len(prefix):]
    key = (id(tokenizer), text[:1])
    if key not in _warned:
        _warned.add(key)
        log.warning("could not tokenize %r as a continuation (every anchor merged with it); "
                    "using its stand-alone tokenization", text[:20])
    return encode(tokenizer, text)


def _special_ids(tokenizer):
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; SFT needs one to end every response")
    return tokenizer.bos_token_id, eos


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _pieces(tokenizer, template: Template, messages, system=None, input="") -> List[tuple]:
    """(ids, kind) per piece of the conversation; kind is prompt / turn / response (module doc)."""
    bos, eos = _special_ids(tokenizer)
    head = [bos] if bos is not None else []
    segs = template.segments(messages, system=system, input=input)
    out = []
    for i, (kind, text) in enumerate(segs):
        if kind == "response":
            continue  # tokenized with the user turn before it
        start = head if (kind == "prompt" or template.bos_each_turn) else []
        prompt = encode_text(tokenizer, text)
        reply = segs[i + 1][1] if i + 1 < len(segs) else None
        if reply is not None and i + 2 < len(segs):  # an earlier reply, as the rendered text tokenizes
            whole = encode_text(tokenizer, text + template.response_join + reply)
            k = _common_prefix(whole, prompt)
            out += [(start + whole[:k], kind), (whole[k:] + [eos], "response")]
            continue
        out.append((start + prompt, kind))
        if reply is not None:  # the last reply, right after the generation prompt
            ids = (encode_text(tokenizer, reply) if template.response_seam == "standalone"
                   else encode_continuation(tokenizer, reply))
            out.append((ids + [eos], "response"))
    return out


def encode_chat_prompt(tokenizer, template, messages: Sequence[Dict[str, str]],
                       system: Optional[str] = None, input: str = "") -> List[int]:
    """The ids to feed a model for its next assistant turn: the same ids training put before that
    turn's response. `messages` alternate user/assistant and end with a user message. Use this in
    generate/serve instead of tokenizing `Template.render_chat`'s text."""
    template = get_template(template)
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("encode_chat_prompt needs messages ending with a user turn")
    return [i for ids, _ in _pieces(tokenizer, template, messages, system, input) for i in ids]


def encode_prompt(tokenizer, template, instruction: str, input: str = "",
                  system: Optional[str] = None) -> List[int]:
    """Single-turn `encode_chat_prompt`: BOS + tokenize(template.render_prompt(...))."""
    return encode_chat_prompt(tokenizer, template, [{"role": "user", "content": instruction}],
                              system=system, input=input)


@dataclass
class Tokenized:
    """An example, or why there is none. `truncated`: the sequence was cut at max_length."""
    example: Optional[Dict[str, List[int]]]
    dropped: Optional[str] = None
    truncated: bool = False


def tokenize_record(record: Record, tokenizer, template, max_length: int = 512) -> Tokenized:
    """`build_example` with the reason when an example is dropped."""
    template = get_template(template)
    pieces = _pieces(tokenizer, template, record.messages(), record.system, record.input)
    prompt_len = len(pieces[0][0])
    if prompt_len >= max_length:
        return Tokenized(None, f"prompt is {prompt_len} tokens, max_length {max_length} leaves "
                               "no response token")
    input_ids, labels = [], []
    for ids, kind in pieces:
        input_ids.extend(ids)
        labels.extend(ids if kind == "response" else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_length
    if truncated:
        # Cut from the right (the end of the last response that fits); a user turn left without
        # any of its response is removed too, since it trains nothing.
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        while labels and labels[-1] == IGNORE_INDEX:
            labels.pop()
            input_ids.pop()
    if not any(lab != IGNORE_INDEX for lab in labels):  # cannot happen for prompt_len < max_length
        return Tokenized(None, "no response token left after truncation")
    return Tokenized({"input_ids": input_ids, "labels": labels}, truncated=truncated)


def build_example(record: Record, tokenizer, template, max_length: int = 512):
    """dict(input_ids, labels) as lists of ints, or None when no response token is left within
    `max_length` (the caller counts it; `tokenize_record` says why). Labels are -100 on every
    prompt/user-turn token; the response ids and the EOS after each response are trained."""
    return tokenize_record(record, tokenizer, template, max_length).example


def decode_response(tokenizer, template, ids: Sequence[int]) -> str:
    """The text of generated response ids (after the prompt): special tokens skipped, and with a
    "standalone" seam the dummy-prefix space a tokenizer may leave at the start removed."""
    template = get_template(template)
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    if template.response_seam == "standalone" and text.startswith(" "):
        text = text[1:]
    return text
