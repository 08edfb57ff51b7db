"""Generate text with a checkpoint, prompted exactly as the SFT stage trained it.

The prompt ids come from the SFT template registry (`zhllama.sft.examples.encode_chat_prompt`): the very
ids training put before a response, never a re-tokenization of rendered text. Generation (streaming,
stop strings such as a chat model's next "### Instruction:", sampling) is the engine `zhllama serve`
uses, so the command line and the server answer alike.

Modes:
  --prompt P [--prompt P2 ...]   batch: each answer streams to stdout (with --json: one JSON line each)
  no --prompt, stdin a pipe      batch: one prompt per non-empty stdin line
  no --prompt, a terminal        interactive: a multi-turn chat when the template has a turn format;
                                 /reset clears the history, /exit (or Ctrl-D) quits

examples:
  zhllama generate --model merged/ --template chinese-alpaca --prompt "用一句话介绍北京。"
  zhllama generate --model merged/ --no-template --prompt "今天天气" --greedy --max-new-tokens 32
  cat questions.txt | zhllama generate --model merged/ --json > answers.jsonl
"""

import json
import sys
import time
from pathlib import Path

from zhllama.argtypes import SEED, float_range, int_range
from zhllama.errors import UserError
from zhllama.export.inference import load_inference_model
from zhllama.log import get_logger
from zhllama.sft.examples import encode_chat_prompt

log = get_logger("zhllama.generate")


class Generator:
    """A loaded model + template: `answer(messages)` streams one response to `on_text`."""

    def __init__(self, engine, use_template=True, system=None, input="", stops=(), sampling=None):
        self.engine, self.use_template = engine, use_template
        self.system, self.input, self.stops = system, input, list(stops)
        self.sampling = dict(sampling or {})

    def prompt_ids(self, messages):
        if not self.use_template:
            return self.engine.text_prompt_ids("".join(m["content"] for m in messages if m["role"] == "user"))
        try:
            return encode_chat_prompt(self.engine.tokenizer, self.engine.template, messages, system=self.system,
                                      input=self.input)
        except ValueError as e:
            raise UserError(f"template {self.engine.template.name}: {e}") from None

    def answer(self, messages, on_text=None) -> dict:
        """Generate the next assistant turn of `messages`; returns text, finish reason, token counts, speed."""
        ids = self.prompt_ids(messages)
        strip = self.use_template and self.engine.template.response_seam == "standalone"
        started = [False]

        def emit(piece):           # a "standalone" seam leaves the dummy-prefix space before the answer
            if strip and not started[0]:
                piece = piece.lstrip(" ")
            if piece:
                started[0] = True
                if on_text is not None:
                    on_text(piece)

        t0 = time.perf_counter()
        text, finish, n_in, n_out = self.engine.generate(ids, stop=self.stops, on_text=emit,
                                                         template_stop=self.use_template, **self.sampling)
        dt = time.perf_counter() - t0
        if strip:
            text = text.lstrip(" ")
        return {"text": text, "finish_reason": finish, "prompt_tokens": n_in, "completion_tokens": n_out,
                "seconds": round(dt, 3), "tokens_per_s": round(n_out / dt, 2) if dt > 0 else None}


def _stdout_piece(piece):
    sys.stdout.write(piece)
    sys.stdout.flush()


def run_batch(gen: Generator, prompts, as_json=False) -> None:
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        if as_json:
            out = gen.answer(messages)
            print(json.dumps({"prompt": prompt, "response": out["text"], **{k: v for k, v in out.items() if k != "text"}},
                             ensure_ascii=False), flush=True)
            continue
        if len(prompts) > 1:
            print(f">>> {prompt}", flush=True)
        out = gen.answer(messages, on_text=_stdout_piece)
        print("\n" if len(prompts) > 1 and i < len(prompts) - 1 else "", flush=True)
        log.info("%d prompt + %d generated tokens, %.1f tokens/s, finish: %s", out["prompt_tokens"],
                 out["completion_tokens"], out["tokens_per_s"] or 0.0, out["finish_reason"])


def run_interactive(gen: Generator, read=input) -> None:
    """A REPL. Multi-turn when the template can render later turns; otherwise each line stands alone."""
    multi = gen.use_template and gen.engine.template.turn is not None
    print(f"zhllama generate: template {gen.engine.template.name if gen.use_template else 'none'}"
          f"{' (multi-turn; /reset clears the history)' if multi else ''}; /exit or Ctrl-D quits", file=sys.stderr)
    history = []
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            continue
        messages = (history if multi else []) + [{"role": "user", "content": line}]
        out = gen.answer(messages, on_text=_stdout_piece)
        print(flush=True)
        if multi:
            history = messages + [{"role": "assistant", "content": out["text"]}]


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint dir (a merged model, or any HF LLaMA dir)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the model dir)")
    parser.add_argument("--template", default="alpaca",
                        help="SFT prompt template: alpaca, chinese-alpaca, llama2-chat or a .yaml/.json file "
                             "(default alpaca); use the one the model was fine-tuned with")
    parser.add_argument("--no-template", action="store_true",
                        help="raw continuation of the prompt text (for pretrained, not fine-tuned, models)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--input", default="", help="the template's input field for every prompt (Alpaca 'input')")
    parser.add_argument("--system", default=None, help="system prompt (templates with a {system} slot)")
    parser.add_argument("--max-new-tokens", type=int_range(1, 1 << 20),
                        default=256, help="most tokens per answer (default 256)")
    parser.add_argument("--temperature", type=float_range(0, 5),
                        default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--top-p", type=float_range(0, 1, above_low=True),
                        default=0.9, help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (deterministic; ignores temperature)")
    parser.add_argument("--seed", type=SEED, default=None, help="seed for sampling, set before each answer")
    parser.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    parser.add_argument("--json", action="store_true", help="batch mode: one JSON line per prompt, no streaming")


def run(args) -> int:
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: not a directory")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.greedy and not (0.0 < args.temperature <= 5.0 and 0.0 < args.top_p <= 1.0):
        raise UserError(f"--temperature must be in (0, 5] and --top-p in (0, 1] (got {args.temperature}, "
                        f"{args.top_p}); use --greedy for deterministic output")
    engine = load_inference_model(args.model, args.tokenizer, args.template, device=args.device,
                                  dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    sampling = {"max_tokens": args.max_new_tokens, "temperature": 0.0 if args.greedy else args.temperature,
                "top_p": args.top_p, "seed": args.seed}
    gen = Generator(engine, use_template=not args.no_template, system=args.system, input=args.input,
                    stops=args.stop, sampling=sampling)
    prompts = list(args.prompt)
    if not prompts and not sys.stdin.isatty():
        prompts = [line.strip() for line in sys.stdin if line.strip()]
        if not prompts:
            raise UserError("no --prompt and nothing on stdin")
    if prompts:
        run_batch(gen, prompts, as_json=args.json)
    else:
        run_interactive(gen)
    return 0
