"""Alpaca-style self-instruct against any OpenAI-compatible endpoint, in Chinese or English.

Stanford's algorithm: each request shows the model 3 seed tasks sampled from the human-written seeds
and asks it to continue the numbered list up to 20 tasks; the answer is split into tasks, filtered
(length, a blacklist of things a text model cannot do, "Write a program", a leading punctuation mark
or a foreign first character), and a task whose instruction has ROUGE-L > 0.7 with any instruction
already in the pool (seeds + kept) is dropped. Here every filter is language-aware: ROUGE-L on jieba
words for Chinese (Stanford's tokenizer sees no tokens in Chinese, so every pair scored 0), lengths in
characters for Chinese, the blacklist in both languages, and the similarity check uses an exact index
instead of an all-pairs scan, so it stays fast at a 50k pool.

The output is JSON lines ({"instruction", "input", "output"}), appended and fsynced after every batch
of requests with its committed length in OUT.state.json: a crash loses at most the batch in flight,
and running the same command again resumes (seed sampling continues where it stopped).

example:
  zhllama serve --model merged/ --port 8000 &
  zhllama selfinstruct --seed-tasks seed_tasks_zh.jsonl --out regen_zh.jsonl \\
      --api-base http://127.0.0.1:8000/v1 --model merged --num 1000 --lang zh
"""

import json
import os
import random
import re
import string
import time
import unicodedata
from collections import Counter
from pathlib import Path

from zhllama.argtypes import SEED, float_range, int_range
from zhllama.corpus import read_json_records
from zhllama.errors import InputError, UserError
from zhllama.fsutil import atomic_write_json, sha256_file
from zhllama.inputfile import add_max_line_argument, max_line_bytes
from zhllama.log import get_logger
from zhllama.outlock import output_lock
from zhllama.sft.api_client import add_client_arguments, client_from_args
from zhllama.sft.records import MAX_RECORD_BYTES, MAX_RECORD_MB
from zhllama.sft.rouge import SimilarityIndex

log = get_logger(__name__)

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"

# Stanford's list (matched as whole words, any case) and its Chinese counterpart (substrings).
BLACKLIST_EN = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
                "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
BLACKLIST_ZH = ["图片", "图像", "图画", "图表", "照片", "相片", "画出", "画一", "绘制", "绘图", "作图",
                "曲线图", "柱状图", "饼图", "折线图", "地图", "文件", "视频", "音频", "录音", "音乐",
                "流程图", "示意图", "思维导图", "前往"]
PROGRAM_PREFIXES = ("Write a program", "编写一个程序", "写一个程序", "编写程序", "写一段程序", "编写一段程序")
_BLACKLIST_EN_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST_EN) + r")\b", re.I)

# Length limits: Stanford keeps 4..150 whitespace words; Chinese has no spaces, so characters
# (whitespace excluded). The shortest BELLE seed instruction has 5 characters.
LIMITS = {"en": (4, 150), "zh": (5, 300)}

# A seed task is an example in every request: a field longer than this is a mistake, not an example.
SEED_FIELD_CHARS = 20_000

NO_INPUT = {"en": "<noinput>", "zh": "<无输入>"}
FIELD_NAMES = {"en": ("Instruction", "Input", "Output"), "zh": ("指令", "输入", "输出")}
_FIELD_OF = {"instruction": "instruction", "input": "input", "output": "output",
             "指令": "instruction", "输入": "input", "输出": "output"}
# "4. Instruction:", "4、指令：", "**4. Output:**" ...
_MARKER = re.compile(r"(?:\*{1,2}\s*)?(?<![\w])(\d{1,3})\s*[.．、)]\s*(?:\*\*)?\s*(instruction|input|output|指令|输入|输出)"
                     r"\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?", re.I)
_SEPARATOR = re.compile(r"(?:^|\n)\s*#{2,}")   # "###" ends a task; what follows it is not part of it


# -- seeds and prompts --------------------------------------------------------------------------

def load_seed_tasks(path, max_record: int = MAX_RECORD_BYTES) -> list:
    """Seed tasks (JSON lines, or one JSON array) as [{"instruction", "input", "output"}], using
    each task's first instance as Stanford does. A malformed line, a record longer than `max_record`
    bytes or a field longer than SEED_FIELD_CHARS is an error naming file:line."""
    path = Path(path)
    items = read_json_records(path, "seed-task file", max_record)
    seeds = []
    for lineno, obj in items:
        if not isinstance(obj, dict):
            raise InputError(path, "expected a JSON object with 'instruction' and 'instances'", lineno)
        inst = obj.get("instruction")
        if not isinstance(inst, str) or not inst.strip():
            raise InputError(path, "key 'instruction' is missing or empty", lineno)
        instances = obj.get("instances")
        if instances is None and "output" in obj:        # Alpaca records are accepted too
            instances = [{"input": obj.get("input", ""), "output": obj["output"]}]
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise InputError(path, "key 'instances' must be a non-empty list of {input, output}", lineno)
        first = instances[0]
        inp, out = first.get("input", ""), first.get("output")
        if not isinstance(inp, str) or not isinstance(out, str):
            raise InputError(path, "instances[0] needs string 'input' and 'output'", lineno)
        for name, value in (("instruction", inst), ("input", inp), ("output", out)):
            if len(value) > SEED_FIELD_CHARS:
                raise InputError(path, f"'{name}' has {len(value):,} characters; a seed task is shown in "
                                       f"every request, so each field is limited to {SEED_FIELD_CHARS:,}", lineno)
        seeds.append({"instruction": inst, "input": inp, "output": out})
    if not seeds:
        raise InputError(path, "no seed tasks in the file")
    return seeds


def load_prompt(name: str) -> str:
    try:
        return (PROMPT_DIR / name).read_text("utf-8")
    except FileNotFoundError:
        raise UserError(f"{PROMPT_DIR / name}: prompt file missing from the installation "
                        f"(package data of zhllama.sft); reinstall zhllama")


def encode_prompt(examples, lang: str, num_tasks: int = 20, header: str = None) -> str:
    """The request text: the header, the examples numbered 1..k, then "k+1. Instruction:"."""
    header = load_prompt(f"selfinstruct_{lang}.txt") if header is None else header
    name_i, name_in, name_out = FIELD_NAMES[lang]
    colon = "：" if lang == "zh" else ":"
    parts = [header.replace("{num_tasks}", str(num_tasks)).rstrip() + "\n"]
    for idx, task in enumerate(examples, 1):
        inst = re.sub(r"\s+", " ", task["instruction"]).strip().rstrip(":：")
        inp = task["input"] if task["input"].strip() else NO_INPUT[lang]
        parts.append(f"###\n{idx}. {name_i}{colon} {inst}\n{idx}. {name_in}{colon}\n{inp}\n"
                     f"{idx}. {name_out}{colon}\n{task['output']}\n")
    parts.append(f"###\n{len(examples) + 1}. {name_i}{colon}")
    return "".join(parts)


# -- parsing a model's answer -------------------------------------------------------------------

def parse_response(text: str, finish_reason: str = "stop"):
    """Split an answer into tasks. Returns (tasks, counts of what was dropped and why).

    Tolerates stray text before/after the list, markdown bold, Chinese or English field names and
    colons, and an answer that continues right after the prompt's last "N. Instruction:". A last task
    cut off by the length limit (finish_reason "length") is dropped, as Stanford does; a task without
    an output is dropped as incomplete.
    """
    counts = Counter()
    markers = list(_MARKER.finditer(text or ""))
    if not markers:
        counts["unparsable"] += 1
        return [], counts
    first_field = _FIELD_OF[markers[0].group(2).lower()]
    if first_field != "instruction":
        # The answer continues the prompt's "k. Instruction:": the text before the first marker is
        # that instruction.
        text = f"{markers[0].group(1)}. Instruction: {text}"
        markers = list(_MARKER.finditer(text))

    items = []   # [number, {field: text}]
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        value = _SEPARATOR.split(text[m.end():end], maxsplit=1)[0].strip()
        number, field = int(m.group(1)), _FIELD_OF[m.group(2).lower()]
        if field == "instruction":
            items.append([number, {"instruction": value}])
        elif items and items[-1][0] == number and field not in items[-1][1]:
            items[-1][1][field] = value
        else:
            counts["unparsable"] += 1       # a field with no matching instruction before it
    if items and finish_reason == "length":
        items.pop()
        counts["truncated"] += 1
    tasks = []
    for _, fields in items:
        if "output" not in fields or not fields["instruction"]:
            counts["incomplete"] += 1
            continue
        inp = fields.get("input", "")
        if inp.strip().lower() in ("<noinput>", "<无输入>", "无输入", "<no input>", "无"):
            inp = ""
        tasks.append({"instruction": fields["instruction"], "input": inp, "output": fields["output"]})
    return tasks, counts


# -- filters ------------------------------------------------------------------------------------

def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FFFF


def chinese_share(text: str) -> float:
    """CJK characters / (CJK characters + Latin words): 'mostly Chinese' without penalising an
    English term or two inside a Chinese instruction."""
    cjk = sum(_is_cjk(ch) for ch in text)
    latin_words = len(re.findall(r"[A-Za-z]+", text))
    return cjk / (cjk + latin_words) if cjk + latin_words else 0.0


def _starts_with_punctuation(text: str) -> bool:
    ch = text[0]
    return ch in string.punctuation or unicodedata.category(ch)[0] in "PS"


def filter_reason(task: dict, lang: str):
    """Why a parsed task is rejected before the similarity check, or None to keep it."""
    inst = task["instruction"].strip()
    if not inst:
        return "too_short"
    size = len(inst.split()) if lang == "en" else sum(not ch.isspace() for ch in inst)
    lo, hi = LIMITS[lang]
    if size < lo:
        return "too_short"
    if size > hi:
        return "too_long"
    if _BLACKLIST_EN_RE.search(inst) or any(w in inst for w in BLACKLIST_ZH):
        return "blacklist"
    if inst.startswith(PROGRAM_PREFIXES):
        return "write_a_program"
    if _starts_with_punctuation(inst):
        return "punctuation"
    if lang == "en" and not inst[0].isascii():
        return "wrong_language"
    if lang == "zh" and chinese_share(inst) < 0.5:
        return "wrong_language"
    return None


# -- resumable output ---------------------------------------------------------------------------

class ResumableJsonl:
    """JSON lines appended in committed batches; OUT.state.json records the committed length.

    On open, bytes past the committed length (a batch being written when the process died) are cut
    off, so the file always ends on a complete batch. The state file is replaced atomically.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + ".state.json")
        self.previous = self.path.with_name(self.path.name + ".previous")
        self.previous_state = self.state_path.with_name(self.state_path.name + ".previous")

    def open(self, fingerprint: dict, overwrite: bool = False):
        """(records already committed, saved state). Refuses a file made with other settings."""
        if overwrite:
            self._set_aside()
        if not self.path.exists():
            if self.state_path.exists():
                self.state_path.unlink()
            return [], {"fingerprint": fingerprint}
        state = {}
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(self.state_path, f"unreadable resume state ({e}); delete it to resume "
                                 f"from {self.path.name} alone")
            old = state.get("fingerprint", {})
            diff = [k for k in fingerprint if k in old and old[k] != fingerprint[k]]
            if diff:
                raise UserError(f"{self.path}: made with a different {', '.join(diff)}; use another "
                                f"--out or pass --overwrite to start again")
        data = self.path.read_bytes()
        committed = state.get("bytes")
        if committed is None:                    # no state: keep complete lines only
            committed = data.rfind(b"\n") + 1
        if committed > len(data):
            raise InputError(self.path, f"shorter ({len(data)} bytes) than its resume state says "
                             f"({committed}); was it edited? Pass --overwrite to start again")
        if committed < len(data):
            log.warning("%s: dropping %d bytes of an unfinished batch", self.path, len(data) - committed)
            with open(self.path, "r+b") as f:
                f.truncate(committed)
        records = []
        for lineno, line in enumerate(data[:committed].decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(self.path, f"invalid JSON ({e.msg}); cannot resume", lineno)
        state["fingerprint"] = fingerprint
        state["bytes"] = committed
        return records, state

    def _set_aside(self) -> None:
        """--overwrite keeps the old output until the new run ends (API calls cost money): it moves to
        OUT.previous with its state. A .previous already there was set aside by an --overwrite run that
        did not finish; it stays, and that run's unfinished output is what goes."""
        if self.previous.exists():
            for p in (self.path, self.state_path):
                p.unlink(missing_ok=True)
            log.info("%s: keeping %s (set aside by an earlier --overwrite that did not finish)",
                     self.path, self.previous.name)
            return
        if self.path.exists():
            os.replace(self.path, self.previous)
            log.info("%s: the old output is kept as %s until this run finishes", self.path, self.previous.name)
        if self.state_path.exists():
            os.replace(self.state_path, self.previous_state)

    def finish(self) -> None:
        """The run reached its end: the output --overwrite set aside is no longer needed."""
        for p in (self.previous, self.previous_state):
            p.unlink(missing_ok=True)

    def kept_aside(self) -> str:
        """For a failure message: where the output --overwrite replaced still is, if anywhere."""
        return f" (the output --overwrite replaced is kept in {self.previous})" if self.previous.exists() else ""

    def commit(self, records, state: dict) -> None:
        """Append `records`, fsync, then record the new length (and `state`) atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            for r in records:
                f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            state["bytes"] = f.tell()
        atomic_write_json(self.state_path, state)


# -- the generation loop ------------------------------------------------------------------------

def _summary(counts: Counter) -> str:
    rejected = {k: v for k, v in counts.items() if k not in ("kept", "request_failed")}
    parts = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1]))
    return (f"kept {counts['kept']}, rejected {sum(rejected.values())}" + (f" ({parts})" if parts else "")
            + f", failed requests {counts['request_failed']}")


def generate(seeds, out, client, *, num, lang="zh", api="chat", num_prompt_instructions=3,
             num_tasks=20, batch_size=5, threshold=0.7, temperature=1.0, top_p=1.0, max_tokens=3072,
             seed=0, max_requests=0, patience=20, fingerprint=None, overwrite=False):
    """Generate until `out` holds `num` instructions. Returns (kept records, counts)."""
    if len(seeds) < num_prompt_instructions:
        raise UserError(f"need at least {num_prompt_instructions} seed tasks, got {len(seeds)}")
    writer = ResumableJsonl(out)
    kept, state = writer.open(dict(fingerprint or {}, lang=lang), overwrite=overwrite)
    counts = Counter(state.get("counts", {}))
    counts["kept"] = len(kept)
    batches = state.get("batches", 0)

    index = SimilarityIndex(lang, threshold)
    for task in seeds + kept:
        index.add(task["instruction"])
    header = load_prompt(f"selfinstruct_{lang}.txt")
    stop = [f"{num_tasks + 1}. {FIELD_NAMES[lang][0]}", f"{num_tasks + 1}. Instruction"]
    params = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop, api=api)

    if len(kept) >= num:
        log.info("%s already holds %d instructions (asked for %d): nothing to do", out, len(kept), num)
    log.info("pool: %d seeds + %d kept; target %d", len(seeds), len(kept), num)
    start, requests, idle_batches = time.perf_counter(), 0, 0
    while len(kept) < num:
        if max_requests and requests >= max_requests:
            log.warning("stopping: --max-requests %d reached", max_requests)
            break
        n_req = min(batch_size, max_requests - requests) if max_requests else batch_size
        rng = random.Random(f"{seed}:{batches}")      # resumable: batch b samples the same seeds
        prompts = [encode_prompt(rng.sample(seeds, num_prompt_instructions), lang, num_tasks, header)
                   for _ in range(n_req)]
        results = client.map(lambda p: client.generate(p, **params), prompts)
        requests += n_req
        new, errors = [], []
        for res in results:
            if isinstance(res, Exception):
                counts["request_failed"] += 1
                errors.append(res)
                continue
            tasks, dropped = parse_response(res.text, res.finish_reason)
            counts.update(dropped)
            for task in tasks:
                if len(kept) + len(new) >= num:
                    break
                reason = filter_reason(task, lang)
                if reason is None:
                    tokens = index.tokenize(task["instruction"])
                    if index.nearest_tokens(tokens, first=True)[0] is not None:
                        reason = "similar"
                    else:
                        index.add_tokens(tokens)
                        new.append(task)
                        continue
                counts[reason] += 1
        batches += 1
        counts["kept"] += len(new)
        state.update(counts=dict(counts), batches=batches, requests_total=state.get("requests_total", 0) + n_req)
        writer.commit(new, state)
        kept.extend(new)
        elapsed = time.perf_counter() - start
        log.info("batch %d: %d/%d kept | %s | %s | %.2f req/s", batches, len(kept), num, _summary(counts),
                 client.stats_line(), requests / max(elapsed, 1e-9))
        if len(errors) == n_req:
            first = errors[0]
            raise UserError(f"every request of batch {batches} failed; first error: {first}. "
                            f"{len(kept)} instructions are safe in {out}; run the same command again to resume"
                            + writer.kept_aside())
        idle_batches = 0 if new else idle_batches + 1
        if patience and idle_batches >= patience:
            log.warning("stopping: the last %d batches kept nothing (%s); is the model following the "
                        "prompt format?", idle_batches, _summary(counts))
            break
    writer.finish()
    return kept, counts


def add_arguments(parser):
    parser.add_argument("--seed-tasks", required=True, help="seed tasks, JSON lines with 'instruction' "
                        "and 'instances' [{input, output}] (Stanford's / BELLE's seed_tasks format)")
    parser.add_argument("--out", required=True, help="output JSON lines; resumed when it exists")
    add_max_line_argument(parser, "seed task (a JSON line or array element)", "--max-record-mb", MAX_RECORD_MB)
    add_client_arguments(parser)
    parser.add_argument("--num", type=int_range(1, 10 ** 7),
                        required=True, help="number of instructions to end with")
    parser.add_argument("--lang", choices=["zh", "en"], default="zh", help="language of the tasks (default zh)")
    parser.add_argument("--num-prompt-instructions", type=int_range(1, 100),
                        default=3, help="seed examples per request (3)")
    parser.add_argument("--num-tasks", type=int_range(1, 1000),
                        default=20, help="length of the list the model completes (20)")
    parser.add_argument("--batch-size", type=int_range(1, 10 ** 4),
                        default=5, help="requests per batch; a batch is written "
                        "at once, so a crash loses at most one batch (5)")
    parser.add_argument("--threshold", type=float_range(0, 1),
                        default=0.7, help="drop instructions with ROUGE-L above this (0.7)")
    parser.add_argument("--temperature", type=float_range(0, 2), default=1.0)
    parser.add_argument("--top-p", type=float_range(0, 1, above_low=True), default=1.0)
    parser.add_argument("--max-tokens", type=int_range(1, 1 << 20), default=3072)
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the example sampling")
    parser.add_argument("--max-requests", type=int_range(0, 10 ** 9),
                        default=0, help="stop after this many requests (0 = no limit)")
    parser.add_argument("--patience", type=int_range(1, 10 ** 6),
                        default=20, help="stop after this many batches in a row "
                        "keep nothing (0 = never)")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming --out (the "
                        "old output is kept as OUT.previous until the new run finishes)")


def run(args):
    with output_lock(args.out, "zhllama selfinstruct", "output file"):   # it appends: one writer only
        return _run(args)


def _run(args):
    if args.num < 1 or args.batch_size < 1 or args.num_prompt_instructions < 1:
        raise UserError("--num, --batch-size and --num-prompt-instructions must be >= 1")
    if args.num_tasks <= args.num_prompt_instructions:
        raise UserError("--num-tasks must be larger than --num-prompt-instructions")
    seeds = load_seed_tasks(args.seed_tasks, max_line_bytes(args, "max_record_mb"))
    client = client_from_args(args, seed=args.seed)
    kept, counts = generate(
        seeds, args.out, client, num=args.num, lang=args.lang, api=args.api,
        num_prompt_instructions=args.num_prompt_instructions, num_tasks=args.num_tasks,
        batch_size=args.batch_size, threshold=args.threshold, temperature=args.temperature,
        top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed, max_requests=args.max_requests,
        patience=args.patience, fingerprint={"seed_tasks_sha256": sha256_file(args.seed_tasks)},
        overwrite=args.overwrite)
    print(f"{args.out}: {len(kept)} instructions ({_summary(counts)}; {client.stats_line()})")
    return 0
