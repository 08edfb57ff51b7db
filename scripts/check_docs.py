"""Check (or, with --write, regenerate) the figures in README.md, README_zh.md and docs/*.md that come
from a command, so that no document states a figure the code no longer prints.

    python scripts/check_docs.py            # exit 1 and one line per stale figure or bad claim
    python scripts/check_docs.py --write    # regenerate every generated block from `zhllama plan`
    python scripts/check_docs.py --write --demo runs/demo   # also the demo table, from that run

Generated blocks sit between an opening marker and `<!-- /check_docs -->`; the opening marker says
what produces the block (an HTML comment: invisible when the markdown is rendered):

  <!-- check_docs: zhllama plan ARGS -->
      a fenced block holding what `zhllama plan ARGS` prints
  <!-- check_docs: plan-table
  columns: a | b | ...
  cells: {trainable_pct:.2f}% | {memory[with_checkpointing][total_gib]:.1f} | ...
  row: ARGS
  row: ARGS -->
      a markdown table, one row per `row:` (each cell formatted from `zhllama plan ARGS --json`)
  <!-- check_docs: plan-column
  column: NAME
  cell: FORMAT
  args: ARGS with {row}, the row's first cell -->
      a hand-written markdown table whose column NAME is filled from `zhllama plan ARGS --json`
  <!-- check_docs: demo-table -->
      a fenced block holding the table `zhllama demo` printed (checked only with --demo DIR)

Also checked, with nothing to regenerate: every "Python X+" / "Python X 以上" / "Python >= X" claim
equals pyproject.toml's requires-python floor; every section of docs/benchmarks.md that holds figures
names the command that produced them, and every `python bench/...` script and `zhllama ...` command it
names exists. tests/test_docs.py runs the check in the suite (so CI does).
"""

import argparse
import contextlib
import functools
import io
import json
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- check_docs: (?P<spec>.*?)-->\n(?P<body>.*?)<!-- /check_docs -->", re.S)
PYTHON_CLAIM = re.compile(r"Python (?:>= ?)?(\d+\.\d+)(?:\+| 以上| or later| or newer)")


# ----------------------------------------------------------------------------------------- zhllama plan

def plan_output(args: str, as_json: bool = False):
    """What `zhllama plan ARGS [--json]` prints (run in-process), as text or parsed JSON."""
    out = _printed(tuple(shlex.split(args)) + (("--json",) if as_json else ()))
    return json.loads(out) if as_json else out.rstrip("\n")


@functools.lru_cache(maxsize=None)
def _printed(argv: tuple) -> str:
    """stdout of `zhllama plan ARGV`; each plan is computed once (several documents quote the same one)."""
    from zhllama.app.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", *argv])
    if code != 0:
        raise SystemExit(f"check_docs: `zhllama plan {shlex.join(argv)}` exited {code}")
    return out.getvalue()


def _fields(spec: str) -> dict:
    """`key: value` lines of a block's opening marker; `row:` may repeat (a list)."""
    fields = {"row": []}
    for line in spec.splitlines()[1:]:
        key, _, value = line.strip().partition(":")
        if key == "row":
            fields["row"].append(value.strip())
        elif key:
            fields[key] = value.strip()
    return fields


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(rows) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def plan_table(spec: str) -> str:
    f = _fields(spec)
    columns, cells = _cells(f["columns"]), _cells(f["cells"])
    if len(columns) != len(cells):
        raise SystemExit(f"check_docs: plan-table has {len(columns)} columns but {len(cells)} cell formats")
    body = [[c.format(**plan_output(args, as_json=True)) for c in cells] for args in f["row"]]
    return _table([columns, ["---"] * len(columns), *body])


def plan_column(spec: str, table: str) -> str:
    f = _fields(spec)
    lines = table.strip("\n").splitlines()
    head = _cells(lines[0])
    col = head.index(f["column"])
    out = [lines[0], lines[1]]
    for line in lines[2:]:
        cells = _cells(line)
        row = cells[0].strip("`")
        cells[col] = f["cell"].format(**plan_output(f["args"].format(row=row), as_json=True))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- blocks

def regenerate(spec: str, body: str, demo_dir) -> str:
    """The body a block should have, or `body` itself when it cannot be produced here (demo-table
    without --demo)."""
    spec = spec.strip()
    if spec.startswith("zhllama plan "):
        return "```\n$ " + spec + "\n" + plan_output(spec[len("zhllama plan "):]) + "\n```\n"
    if spec.startswith("plan-table"):
        return plan_table(spec) + "\n"
    if spec.startswith("plan-column"):
        return plan_column(spec, body) + "\n"
    if spec.startswith("demo-table"):
        if demo_dir is None:
            return body
        from zhllama.app.demo.report import format_table
        rows = json.loads((Path(demo_dir) / "summary.json").read_text(encoding="utf-8"))["rows"]
        return "```\n" + format_table(rows) + "\n```\n"
    raise SystemExit(f"check_docs: unknown block '{spec.splitlines()[0]}'")


def check_blocks(text: str, where: str, demo_dir):
    """(new text, problems): every generated block of `text` regenerated, and one line per stale block."""
    problems = []

    def fix(m):
        spec, body = m.group("spec"), m.group("body")
        new = regenerate(spec, body, demo_dir)
        if new != body:
            line = text[:m.start()].count("\n") + 1
            old, now = body.splitlines(), new.splitlines()
            first = next((i for i, (a, b) in enumerate(zip(old, now)) if a != b), min(len(old), len(now)))
            problems.append(f"{where}:{line + 1 + first}: stale figures in the block of `{spec.splitlines()[0].strip()}`"
                            f": has {old[first] if first < len(old) else '(nothing)'!r}, "
                            f"the command prints {now[first] if first < len(now) else '(nothing)'!r}")
        return f"<!-- check_docs: {spec}-->\n{new}<!-- /check_docs -->"

    return BLOCK.sub(fix, text), problems


# ------------------------------------------------------------------------------------------ the claims

def python_floor(root: Path) -> str:
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^requires-python\s*=\s*">=\s*(\d+\.\d+)', text, re.M)
    if not m:
        raise SystemExit("check_docs: pyproject.toml has no requires-python = \">=X.Y\"")
    return m.group(1)


def check_python_claims(text: str, where: str, floor: str) -> list:
    return [f"{where}:{text[:m.start()].count(chr(10)) + 1}: says Python {m.group(1)}+ but pyproject.toml "
            f"requires Python >= {floor}" for m in PYTHON_CLAIM.finditer(text) if m.group(1) != floor]


# a command in backticks, after any VAR=value assignments (`CI=true bash ...`, `ZHLLAMA_SHARED=... bash ...`)
ENV_ASSIGNMENTS = r"(?:[A-Z][A-Z0-9_]*=\S+ )*"
COMMAND = re.compile(r"`(" + ENV_ASSIGNMENTS + r"(?:bash [^`]+|python bench/[^`]+|zhllama [^`]+))`")


def check_benchmark_commands(text: str, where: str) -> list:
    """Each `## ` section with a table or a number with a unit names a command; the commands exist."""
    from zhllama.app.cli import COMMANDS

    problems = []
    figure = re.compile(r"^\|.*\d.*\|$|\d[\d,.]* ?(s|ms|min|GB|GiB|MB|MiB|tok/s|req/s|x|%)\b", re.M)
    for m in re.finditer(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        title, body = m.group(1), m.group(2)
        line = text[:m.start()].count("\n") + 1
        commands = [c.group(1) for c in COMMAND.finditer(title + "\n" + body)]
        if figure.search(body) and not commands:
            problems.append(f"{where}:{line}: section '{title}' gives figures but names no command that produced them")
        for c in commands:
            words = re.sub("^" + ENV_ASSIGNMENTS, "", c).split()
            if words[0] == "python" and not (REPO / words[1]).is_file():
                problems.append(f"{where}:{line}: section '{title}' names `{c}`, but {words[1]} does not exist")
            if words[0] == "bash" and not (REPO / words[1]).is_file():
                problems.append(f"{where}:{line}: section '{title}' names `{c}`, but {words[1]} does not exist")
            if words[0] == "zhllama" and not any(" ".join(words[1:3]).startswith(k) for k in COMMANDS):
                problems.append(f"{where}:{line}: section '{title}' names `{c}`, not a zhllama command")
    return problems


# ------------------------------------------------------------------------------------------------- main

def check(write: bool = False, demo_dir=None, root: Path = REPO) -> list:
    """Every problem found, one line each; with `write`, generated blocks are rewritten first."""
    problems, floor = [], python_floor(root)
    docs = ["README.md", "README_zh.md", *sorted(f"docs/{p.name}" for p in (root / "docs").glob("*.md"))]
    for rel in docs:
        path = root / rel
        text = path.read_text(encoding="utf-8")
        new, stale = check_blocks(text, rel, demo_dir)
        if write and new != text:
            path.write_text(new, encoding="utf-8")
            print(f"check_docs: rewrote {len(stale)} block(s) of {rel}")
        else:
            problems += stale
        problems += check_python_claims(text, rel, floor)
        if rel == "docs/benchmarks.md":
            problems += check_benchmark_commands(text, rel)
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="regenerate the generated blocks in place")
    p.add_argument("--demo", metavar="DIR", help="a `zhllama demo` output dir: check (or write) the demo table too")
    args = p.parse_args(argv)
    problems = check(write=args.write, demo_dir=args.demo)
    for line in problems:
        print(line)
    if problems:
        print(f"check_docs: {len(problems)} problem(s); `python scripts/check_docs.py --write` regenerates "
              "generated blocks", file=sys.stderr)
        return 1
    print("check_docs: every generated figure is current and every claim checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
