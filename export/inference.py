"""A loaded checkpoint ready to answer prompts: the model, its tokenizer and chat template.

`zhllama serve` and `zhllama generate` share it. It knows nothing about HTTP: `RequestError` says what
was wrong with a request (and which HTTP status fits) and the server turns it into an answer.

The model is not thread-safe: `generate` holds a lock, so callers may share one `InferenceModel`
between threads but generations run one at a time.
"""

import threading
from pathlib import Path

from zhllama.errors import ConfigError
from zhllama.modelio import load_for_inference
from zhllama.pretrain.rope import context_length
from zhllama.sft.examples import encode_chat_prompt
from zhllama.sft.templates import get_template
from zhllama.textenc import encode_text


# The longest context a model may claim: twice the 1M-token models of 2025. A config saying more (or 0,
# or nothing usable) would leave the prompt unbounded: the server refuses it and asks for --max-context.
MAX_CONTEXT = 1 << 21


def usable_context(value, where: str) -> int:
    """`value` as a context length in tokens (1..MAX_CONTEXT), or a ConfigError (one line, exit 2) naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONTEXT:
        raise ConfigError(f"{where} is {value!r}, not a context length (1..{MAX_CONTEXT} tokens): the server "
                          f"bounds every prompt by it; pass --max-context N (the tokens a request may use)")
    return value


class RequestError(Exception):
    """A request the model cannot serve, with the HTTP status and OpenAI error fields that fit it."""

    def __init__(self, message, status=400, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def longest_piece_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` can stand for (at least 1).

    A text longer than max_positions * this many characters cannot fit the context, whatever it says,
    so the server refuses it before tokenizing it (tokenizing megabytes takes gigabytes). Byte-fallback
    pieces such as "<0x0A>" count by their spelling, which only loosens the bound."""
    vocab = tokenizer.get_vocab()
    return max([len(piece) for piece in vocab] + [1])


class InferenceModel:
    """A model, its tokenizer and template; `generate` runs one request at a time (a lock)."""

    def __init__(self, model, tokenizer, template, name: str, max_new_tokens: int = 512, max_context=None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.name = name
        self.max_new_tokens = max_new_tokens
        # The tokens a request may use, prompt and completion together (default: the model's context,
        # max_position_embeddings x factor for linear/dynamic RoPE scaling).
        self.max_positions = max_context if max_context is not None else context_length(model.config)
        self.max_prompt_chars = (self.max_positions * longest_piece_chars(tokenizer)
                                 if self.max_positions else None)
        self.lock = threading.Lock()
        self.requests = 0

    # -- prompts -----------------------------------------------------------------------------

    def check_prompt_chars(self, n_chars: int, param: str) -> None:
        """Refuse, before tokenizing, a prompt too long in characters to fit the context in tokens."""
        if self.max_prompt_chars and n_chars > self.max_prompt_chars:
            raise RequestError(f"the prompt is {n_chars} characters; this model takes at most "
                               f"{self.max_positions} tokens (at most {self.max_prompt_chars} characters "
                               f"with this tokenizer)", param=param, code="context_length_exceeded")

    def chat_prompt_chars(self, messages) -> int:
        """The characters the tokenizer would be given for `messages`: the prompt as the template
        renders it (every turn with the template's own text, system messages in its system slot), plus
        one per segment for the BOS/EOS tokens between turns. Counting the content alone would let
        thousands of empty messages through as "nothing", each rendered into a full turn."""
        system, turns = _split_system(messages)
        try:
            segments = self.template.segments(turns, system=system)
        except (ValueError, ConfigError) as e:   # roles out of order; a template without a 'turn' format
            raise RequestError(f"messages: {e}", param="messages")
        return sum(len(text) + 1 for _, text in segments) + 1

    def check_chat_prompt(self, messages) -> None:
        """Refuse, before tokenizing, a conversation whose rendered prompt cannot fit the context."""
        self.check_prompt_chars(self.chat_prompt_chars(messages), "messages")

    def chat_prompt_ids(self, messages) -> list:
        """The ids the SFT template puts before the assistant's next turn (system messages joined)."""

        self.check_chat_prompt(messages)
        system, turns = _split_system(messages)
        try:
            return encode_chat_prompt(self.tokenizer, self.template, turns, system=system)
        except (ValueError, ConfigError) as e:
            raise RequestError(f"messages: {e}", param="messages")

    def text_prompt_ids(self, prompt: str) -> list:
        """BOS (by id) + the prompt as plain text: a "</s>" in it is text, never a control token."""
        self.check_prompt_chars(len(prompt), "prompt")
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + encode_text(self.tokenizer, prompt)

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt_ids, max_tokens, temperature, top_p, stop, seed=None, on_text=None,
                 template_stop=True):
        """Generate a continuation. `on_text(piece)` receives text as it is produced (streaming); if
        it raises (the client went away), generation is cancelled and the exception propagates.

        Stop strings (the request's, and with `template_stop` the template's: a chat model's next
        "### Instruction:") end the text before the string; text that could be the start of a stop
        string is held back until it is known not to be one.
        Returns (text, finish_reason, prompt_tokens, completion_tokens)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        n_prompt = len(prompt_ids)
        budget = max_tokens if max_tokens is not None else self.max_new_tokens
        budget = min(budget, self.max_new_tokens)
        if self.max_positions:
            if n_prompt >= self.max_positions:
                raise RequestError(f"the prompt is {n_prompt} tokens; this model takes at most "
                                   f"{self.max_positions}", code="context_length_exceeded")
            budget = min(budget, self.max_positions - n_prompt)
        stops = [s for s in list(stop or []) + (list(self.template.stop) if template_stop else []) if s]
        cancel = threading.Event()

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        eos = self.tokenizer.eos_token_id
        kwargs = dict(max_new_tokens=budget, streamer=streamer, eos_token_id=eos,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
                      stopping_criteria=StoppingCriteriaList([_Cancel()]))
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        result = {}

        def work():
            try:
                with torch.no_grad():
                    ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)
                    result["out"] = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            except BaseException as e:          # reported to the caller, never a hung stream
                result["error"] = e
            finally:
                streamer.end()

        with self.lock:
            self.requests += 1
            if seed is not None:
                torch.manual_seed(int(seed))
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text, emitted, hit = "", 0, False
            hold = max((len(s) for s in stops), default=1) - 1
            try:
                for piece in streamer:
                    # A stop string not found before must end in the new piece: search only from
                    # `hold` characters back, so the scan stays linear in the text's length.
                    start = max(0, len(text) - hold)
                    text += piece
                    cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text, hit = text[:cut], True
                        cancel.set()
                        break
                    safe = len(text) - hold
                    if on_text is not None and safe > emitted:
                        on_text(text[emitted:safe])
                        emitted = safe
                if on_text is not None and len(text) > emitted:
                    on_text(text[emitted:])
            finally:
                cancel.set()                     # the client went away, or a stop string was hit
                thread.join()
        if "error" in result:
            raise result["error"]
        n_out = result["out"].shape[1] - n_prompt
        ended_by_eos = n_out > 0 and int(result["out"][0, -1]) == eos
        finish = "stop" if hit or ended_by_eos or n_out < budget else "length"
        return text, finish, n_prompt, n_out


def _split_system(messages):
    """(the system messages joined, or None; the other turns) of chat `messages`."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system") or None
    return system, [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]


def load_inference_model(model_dir, tokenizer=None, template="alpaca", name=None, device="auto",
                         dtype="auto", max_new_tokens=512, max_context=None) -> InferenceModel:
    """Load a merged checkpoint (and tokenizer, default: the same directory) for generation;
    `max_context` caps the tokens of a request (default: the model's max_position_embeddings)."""

    template = get_template(template)
    model, tok = load_for_inference(model_dir, tokenizer, device=device, dtype=dtype,
                                    context_given=max_context is not None)
    return InferenceModel(model, tok, template, name or Path(model_dir).resolve().name, max_new_tokens,
                          max_context)
