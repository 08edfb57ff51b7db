"""Records -> token ids and labels, and the prompt ids inference must use.

The conversation is cut into pieces by `Template.segments` (first prompt, later user turns,
responses). Each piece is tokenized on its own and the ids are joined, never re-tokenized at a seam,
so the loss mask is exact: labels are -100 on every prompt and user-turn token and equal to the ids
on every response token and the EOS that ends each response.

Tokenization of each piece:

- first prompt: BOS + tokenize(prompt): exactly what `encode_chat_prompt` gives at inference;
- a response: tokenize(response) + EOS, where the template's `response_seam` picks how;
- a later user turn: BOS + tokenize(turn) with `bos_each_turn` (a fresh sequence, as Llama-2 chat
  does), otherwise tokenized as a continuation.

The seam. SentencePiece tokenizes a text on its own with a "dummy prefix": "Hello" alone is
"▁Hello", a space that is in neither the prompt nor the response. Published recipes differ here,
and each built-in template reproduces its source's ids:

- "continue" (alpaca, and the default for user templates): the response is tokenized as it
  continues the prompt, without the dummy prefix. We tokenize `anchor + text` and drop the anchor's
  ids (checked to be an unchanged prefix), which gives the ids the tokenizer assigns the text
  mid-sentence. The joined ids decode to exactly prompt + response, and equal Stanford's train.py
  ids (it tokenized prompt + output in one piece) wherever no token spans the seam.
- "standalone" (chinese-alpaca, llama2-chat): the response is tokenized alone, dummy prefix
  included, exactly as Chinese-LLaMA-Alpaca v1/v2 build_dataset.py do; the joined ids decode to
  prompt + " " + response (for Llama-2 chat that is Meta's "[/INST] answer" spacing).

Either way the prompt ids are those inference uses (`encode_chat_prompt`), and `decode_response`
turns generated ids back into the response text.
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


def _pieces(tokenizer, template: Template, messages, system=None, input="") -> List[tuple]:
    """(ids, kind) per piece of the conversation; kind is prompt / turn / response."""
    bos, eos = _special_ids(tokenizer)
    head = [bos] if bos is not None else []
    out = []
    for kind, text in template.segments(messages, system=system, input=input):
        if kind == "prompt":
            ids = head + encode(tokenizer, text)
        elif kind == "turn":
            ids = (head + encode(tokenizer, text)) if template.bos_each_turn else encode_continuation(tokenizer, text)
        elif template.response_seam == "standalone":
            ids = encode(tokenizer, text) + [eos]
        else:
            ids = encode_continuation(tokenizer, text) + [eos]
        out.append((ids, kind))
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
