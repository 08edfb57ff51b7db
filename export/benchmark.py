"""CMMLU and C-Eval accuracy, scored the way the benchmarks' own scripts score a base model.

A question becomes a prompt (a header naming the subject, k solved dev examples, the question ending
in "答案是：" for CMMLU or "答案：" for C-Eval), tokenized with BOS first. The prediction is the letter
among A-D whose next-token logit is highest after the prompt; the letters' ids are those of the bare
pieces "A".."D" (`convert_tokens_to_ids("A")`, not "▁A"), as in the official scripts; the first
letter wins a tie. No text is generated, so the figure is deterministic.

Prompts (CMMLU, haonan-li/CMMLU src/mp_utils.py; C-Eval, hkust-nlp/ceval evaluators/llama.py):

  CMMLU   以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n
          题目：{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案是：{answer}\\n\\n   (x k)
          题目：{question}\\nA. ...\\nD. {D}\\n答案是：
  C-Eval  以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n   (only when k > 0)
          {question}\\nA. {A}\\nB. ...\\nD. {D}\\n答案：{answer}\\n\\n             (x k)
          {question}\\nA. ...\\nD. {D}\\n答案：

Truncation (CMMLU's rule, applied to both): each piece is measured on its own with its BOS; when
header + question exceed --max-length only the question is sent; otherwise, while the kept shots'
total is at least the room left, every shot of the greatest length is dropped.

Accuracy: per subject, fraction of its questions right; overall and per category, the unweighted mean
of the subjects' accuracies (the official figure); also the question-weighted mean.
"""

import contextlib
import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from zhllama.errors import InputError, UserError
from zhllama.fsutil import atomic_write_json, atomic_write_text
from zhllama.inputfile import check_input_file
from zhllama.log import get_logger
from zhllama.modelio import load_for_inference
from zhllama.outlock import output_lock
from zhllama.textenc import encode_text

log = get_logger("zhllama.eval")

LETTERS = ("A", "B", "C", "D")
MAX_SHOTS = 5


@dataclass
class Question:
    index: int          # 0-based data row in the subject's file
    question: str
    options: Tuple[str, str, str, str]
    answer: str


@dataclass
class Subject:
    name: str
    zh_name: str
    categories: Tuple[str, ...]
    test_file: Path
    questions: List[Question]
    dev: List[Question] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- formats

@dataclass(frozen=True)
class Format:
    """What differs between the benchmarks: file layout, column names, prompt wording, subjects.

    The two formats are data, in benchmarks.json next to this file. Subject tables come from the
    benchmarks' official repositories (CMMLU: src/categories.py, where a subject can be in two
    categories, e.g. a Social Science subject that is also "China specific"; C-Eval:
    subject_mapping.json, one category each): subject -> (Chinese name used in the prompt, categories).
    """
    name: str
    subjects: Dict[str, Tuple[str, Tuple[str, ...]]]
    categories: Tuple[str, ...]
    question_col: str
    answer_col: str
    eval_split: str
    file_name_template: str                    # "{subject}", "{split}" -> file name under DIR/split/
    header_template: str                       # "{zh_name}" -> header sentence
    question_prefix: str
    answer_prefix: str
    header_without_shots: bool                 # CMMLU keeps the header at 0 shots, C-Eval does not

    @classmethod
    def from_table(cls, name: str, table: dict) -> "Format":
        subjects = {s: (zh, tuple(cats)) for s, (zh, cats) in table.pop("subjects").items()}
        return cls(name=name, subjects=subjects, categories=tuple(table.pop("categories")),
                   file_name_template=table.pop("file_name"), header_template=table.pop("header"), **table)

    def file_name(self, subject: str, split: str) -> str:
        return self.file_name_template.format(subject=subject, split=split)

    def header(self, zh_name: str) -> str:
        return self.header_template.format(zh_name=zh_name)

    def example(self, q: Question, with_answer: bool) -> str:
        text = self.question_prefix + q.question
        for letter, option in zip(LETTERS, q.options):
            text += f"\n{letter}. {option}"
        text += self.answer_prefix
        return text + (q.answer + "\n\n" if with_answer else "")

    def head(self, subject: Subject, shots: int) -> str:
        return self.header(subject.zh_name) if shots > 0 or self.header_without_shots else ""


FORMATS = {name: Format.from_table(name, table)
           for name, table in json.loads((Path(__file__).parent / "benchmarks.json").read_text("utf-8")).items()}
CMMLU, CEVAL = FORMATS["cmmlu"], FORMATS["ceval"]


# ---------------------------------------------------------------------------------------------- data

def read_questions(path: Path, fmt: Format) -> List[Question]:
    """Rows of a CMMLU/C-Eval CSV, fields exactly as written; a bad row is an InputError naming it."""
    cols = (fmt.question_col, *LETTERS, fmt.answer_col)
    check_input_file(path, "benchmark CSV")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:   # utf-8-sig: a BOM is not the header
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise InputError(path, "empty file (no header)")
            missing = [c for c in cols if c not in header]
            if missing:
                raise InputError(path, f"missing column {missing[0]!r} (header: {','.join(header)})", line=1)
            where = [header.index(c) for c in cols]
            out = []
            for row in reader:
                if not any(row):
                    continue
                line = reader.line_num
                if len(row) <= max(where):
                    raise InputError(path, f"row {len(out)}: {len(row)} fields, expected {len(header)}", line=line)
                q, a, b, c, d, answer = (row[i] for i in where)
                if answer not in LETTERS:
                    raise InputError(path, f"row {len(out)}: answer {answer!r} is not one of A, B, C, D",
                                     line=line)
                out.append(Question(len(out), q, (a, b, c, d), answer))
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise InputError(path, f"bad CSV: {e}") from e
    except OSError as e:
        raise InputError(path, f"cannot read: {e}") from e
    return out


def load_subjects(data_dir, fmt: Format, shots: int, only: Optional[Sequence[str]] = None,
                  limit: Optional[int] = None) -> List[Subject]:
    """Every subject with an eval file under DIR/<split>/ (or `only`), checked before any model loads."""
    data_dir = Path(data_dir)
    split_dir = data_dir / fmt.eval_split
    if not split_dir.is_dir():
        raise UserError(f"--data {data_dir}: no {fmt.eval_split}/ folder (a {fmt.name} data dir holds dev/ and "
                        f"{fmt.eval_split}/)")
    suffix = fmt.file_name("", fmt.eval_split)
    found = sorted(p.name[:-len(suffix)] for p in split_dir.glob("*" + suffix))
    names = list(only) if only else found
    if not names:
        raise UserError(f"{split_dir}: no *{suffix} files")
    subjects = []
    for name in names:
        test_file = split_dir / fmt.file_name(name, fmt.eval_split)
        if name not in fmt.subjects:
            raise UserError(f"{test_file}: unknown {fmt.name} subject {name!r}")
        if not os.path.lexists(test_file):      # anything else there (a FIFO, a broken link) is named below
            raise UserError(f"--subjects {name}: no {test_file}")
        questions = read_questions(test_file, fmt)
        if not questions:
            raise InputError(test_file, "no questions (empty subject)")
        dev = []
        if shots > 0:
            dev_file = data_dir / "dev" / fmt.file_name(name, "dev")
            if not os.path.lexists(dev_file):
                raise InputError(dev_file, f"missing: subject {name} needs its dev examples for --shots {shots}")
            dev = read_questions(dev_file, fmt)
            if len(dev) < shots:
                raise InputError(dev_file, f"{len(dev)} examples, --shots {shots} needs {shots}")
        zh, cats = fmt.subjects[name]
        subjects.append(Subject(name, zh, cats, test_file, questions[:limit] if limit else questions, dev[:shots]))
    return subjects


# -------------------------------------------------------------------------------------------- prompts

def fit_prompt(head: str, shots: Sequence[str], question: str, count: Callable[[str], int], max_length: int) -> str:
    """The official CMMLU truncation (see the module docstring); `count` measures one piece with its BOS."""
    fixed = count(head) + count(question)
    if fixed > max_length:
        return question
    kept = [(s, count(s)) for s in shots]
    while kept and sum(n for _, n in kept) >= max_length - fixed:
        longest = max(n for _, n in kept)
        kept = [(s, n) for s, n in kept if n != longest]
    return head + "".join(s for s, _ in kept) + question


class Prompter:
    """Prompt strings and ids for one tokenizer; the per-subject pieces are measured once."""

    def __init__(self, tokenizer, fmt: Format, shots: int, max_length: int):
        self.tok, self.fmt, self.shots, self.max_length = tokenizer, fmt, shots, max_length
        self._encode = lambda text: encode_text(tokenizer, text)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._lengths: Dict[str, int] = {}
        self.truncated = 0            # prompts that lost dev examples or the header to --max-length

    def count(self, text: str) -> int:
        if text not in self._lengths:     # the header and the shots repeat for every question of a subject
            self._lengths[text] = len(self.bos) + len(self._encode(text))
        return self._lengths[text]

    def prompt(self, subject: Subject, q: Question) -> str:
        shots = [self.fmt.example(d, with_answer=True) for d in subject.dev[:self.shots]]
        question = self.fmt.example(q, with_answer=False)
        head = self.fmt.head(subject, self.shots)
        text = fit_prompt(head, shots, question, self.count, self.max_length)
        if len(text) < len(head) + sum(map(len, shots)) + len(question):
            self.truncated += 1
        return text

    def ids(self, text: str) -> List[int]:
        return self.bos + self._encode(text)


def letter_ids(tokenizer) -> List[int]:
    """Ids of the bare pieces "A".."D" (what the official scripts take), or an error saying they are missing."""
    ids = [tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]
    unk = tokenizer.unk_token_id
    bad = [letter for letter, i in zip(LETTERS, ids) if i is None or (unk is not None and i == unk)]
    if bad:
        raise UserError(f"the tokenizer has no piece {bad[0]!r}: the official protocol reads the logits of "
                        f"the bare pieces A, B, C, D")
    return ids


# -------------------------------------------------------------------------------------------- scoring

def predict(model, prompts: List[List[int]], choice_ids: List[int], batch_size: int = 8, pad_id: int = 0,
            progress: Optional[Callable[[int], None]] = None) -> List[str]:
    """For each prompt (ids), the letter whose next-token logit is highest (first letter on ties).

    Batched with right padding: under causal attention a prompt's last position never sees the padding
    after it. Only that position goes through lm_head, so memory does not grow with the vocabulary x length.
    """
    import torch

    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    choice = torch.tensor(choice_ids, device=device)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    preds: List[Optional[str]] = [None] * len(prompts)
    for k in range(0, len(order), batch_size):
        rows = order[k:k + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
            mask[r, :len(prompts[i])] = 1
        last = torch.tensor([len(prompts[i]) - 1 for i in rows], device=device)
        with torch.no_grad():
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]
            logits = head(hidden[torch.arange(len(rows), device=device), last])[:, choice].float()
        for r, i in enumerate(rows):
            preds[i] = LETTERS[int(torch.argmax(logits[r]))]   # argmax returns the first maximum
        if progress is not None:
            progress(len(rows))
    return preds


def summarize(subjects: List[Subject], preds: Dict[str, List[str]], fmt: Format) -> dict:
    """Per-subject, per-category and overall accuracy (fractions 0..1)."""
    acc, counts = {}, {}
    for s in subjects:
        right = sum(p == q.answer for p, q in zip(preds[s.name], s.questions))
        acc[s.name], counts[s.name] = right / len(s.questions), len(s.questions)
    cats = {}
    for cat in fmt.categories:
        members = [acc[s.name] for s in subjects if cat in s.categories]
        if members:
            cats[cat] = sum(members) / len(members)
    total = sum(counts.values())
    return {
        "accuracy": sum(acc.values()) / len(acc),
        "accuracy_weighted": sum(acc[n] * counts[n] for n in acc) / total,
        "questions": total, "categories": cats, "subjects": acc, "counts": counts,
    }


def evaluate_model(model, tokenizer, subjects: List[Subject], fmt: Format, shots: int, max_length: int,
                   batch_size: int = 8) -> Tuple[dict, Dict[str, List[str]]]:
    """(summary, predictions per subject) of one model."""
    prompter = Prompter(tokenizer, fmt, shots, max_length)
    choice_ids = letter_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    t0 = time.perf_counter()      # questions/s counts building and tokenizing the prompts too
    items = [(s.name, prompter.ids(prompter.prompt(s, q))) for s in subjects for q in s.questions]
    progress = _Progress(f"{fmt.name} questions", len(items), t0)
    flat = predict(model, [ids for _, ids in items], choice_ids, batch_size, pad, progress)
    seconds = time.perf_counter() - t0
    preds: Dict[str, List[str]] = {s.name: [] for s in subjects}
    for (name, _), p in zip(items, flat):
        preds[name].append(p)
    summary = summarize(subjects, preds, fmt)
    if prompter.truncated:
        log.warning("%d of %d prompts exceeded --max-length %d and lost dev examples (or the header)",
                    prompter.truncated, len(items), max_length)
    summary.update(truncated=prompter.truncated, seconds=round(seconds, 3), questions_per_s=round(len(items) / seconds, 2) if seconds else None)
    return summary, preds


class _Progress:
    """A log line every few seconds: questions done, of how many, and the rate."""

    def __init__(self, what: str, total: int, start: float, every: float = 10.0):
        self.what, self.total, self.start, self.every = what, total, start, every
        self.done, self.last = 0, start

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s: %d/%d, %.1f questions/s", self.what, self.done, self.total,
                     self.done / max(now - self.start, 1e-9))


# ------------------------------------------------------------------------------------------------ CLI

def _write_outputs(out_dir: Path, subjects: List[Subject], preds: Dict[str, List[str]], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"subject": s.name, "index": q.index, "pred": p, "answer": q.answer}, ensure_ascii=False)
             for s in subjects for q, p in zip(s.questions, preds[s.name])]
    atomic_write_text(out_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(out_dir / "summary.json", summary)


def _out_dirs(out: Path, models: List[str]) -> List[Path]:
    """DIR itself for one model; DIR/<model dir name> (numbered when names repeat) for several."""
    if len(models) == 1:
        return [out]
    names = [Path(m).resolve().name or "model" for m in models]
    return [out / (n if names.count(n) == 1 else f"{k}-{n}") for k, n in enumerate(names)]


def print_table(r: dict) -> None:
    print(f"{r['benchmark']} {r['shots']}-shot  {r['model']}")
    print(f"  {'overall (mean of subjects)':<44} {100 * r['accuracy']:>6.2f}  {r['questions']:>6,}")
    print(f"  {'overall (mean of questions)':<44} {100 * r['accuracy_weighted']:>6.2f}")
    for cat, a in r["categories"].items():
        print(f"  {cat:<44} {100 * a:>6.2f}")
    for name, a in r["subjects"].items():
        print(f"    {name:<42} {100 * a:>6.2f}  {r['counts'][name]:>6,}")
    print(f"  {r['questions_per_s'] or 0:,.1f} questions/s")


def run_benchmark(args) -> int:
    fmt = FORMATS[args.benchmark]
    if args.text:
        raise UserError("--text is for perplexity; with --benchmark give --data DIR")
    if not args.data:
        raise UserError(f"--benchmark {fmt.name} needs --data DIR (the folder holding dev/ and {fmt.eval_split}/)")
    if not 0 <= args.shots <= MAX_SHOTS:
        raise UserError(f"--shots {args.shots}: expected 0..{MAX_SHOTS}")
    if args.tokenizer and len(args.model) > 1:
        raise UserError("--tokenizer applies to one --model; each of several models uses its own tokenizer")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be positive")
    # One writer per --out, taken before any work: two runs would leave one's predictions beside the
    # other's summary.
    lock = output_lock(args.out, "zhllama eval --benchmark", "results folder") if args.out else contextlib.nullcontext()
    with lock:
        max_length = args.max_length or 2048
        only = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        subjects = load_subjects(args.data, fmt, args.shots, only, args.limit)
        for m in args.model:
            if not Path(m).is_dir():
                raise UserError(f"--model {m}: not a directory")
        out_dirs = _out_dirs(Path(args.out), args.model) if args.out else [None] * len(args.model)
        log.info("%s: %d subjects, %d questions, %d-shot", fmt.name, len(subjects),
                 sum(len(s.questions) for s in subjects), args.shots)
        results = []
        for model_dir, out_dir in zip(args.model, out_dirs):
            model, tok = load_for_inference(model_dir, args.tokenizer, args.device, args.dtype)
            summary, preds = evaluate_model(model, tok, subjects, fmt, args.shots, max_length, args.batch_size)
            r = {"benchmark": fmt.name, "model": str(model_dir), "shots": args.shots, "max_length": max_length,
                 **summary}
            log.info("%s: %s accuracy %.2f%% (%d questions, %.1f questions/s)", model_dir, fmt.name,
                     100 * r["accuracy"], r["questions"], r["questions_per_s"] or 0.0)
            if out_dir is not None:
                _write_outputs(out_dir, subjects, preds, r)
            results.append(r)
            del model
    if args.json:
        print(json.dumps({"results": results}, ensure_ascii=False, indent=2))
    else:
        for r in results:
            print_table(r)
    return 0
