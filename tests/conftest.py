"""Shared fixtures. Tests that need ../shared skip with a message when it is missing."""

import os
import random
import sys
from pathlib import Path

import pytest

from zhllama.hosts import free_port  # noqa: F401  (one home for it; tests import it from here)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ZHLLAMA_SHARED", REPO.parent / "shared"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_path(rel: str) -> Path:
    """A file under ../shared, or skip the test saying which file is missing."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"needs {p} (the shared data is not present here)")
    return p


@pytest.fixture
def llama_sp_model() -> Path:
    return shared_path("data/llama/tokenizer.model")


@pytest.fixture
def zh_news() -> Path:
    return shared_path("data/zh/news_train.txt")


@pytest.fixture
def zh_reviews() -> Path:
    return shared_path("data/zh/reviews_train.txt")


def adamw_steps(model, x, steps: int, lr: float = 1e-2):
    """A few AdamW (0.9, 0.95) steps of `model` on the batch `x`, the trainable parameters only; eval mode after."""
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def train_adapter(model, stage, out, tokenizer_dir, run_config=None, steps=2, seed=0, new_rows_from=None):
    """A few AdamW steps of `stage` on 8 lines of the bundled Chinese text, then the engine's save_adapter."""
    import torch

    from zhllama.modelio import load_tokenizer
    from zhllama.pretrain.adapters import apply_stage, save_adapter
    from zhllama.pretrain.presets import STAGES

    tok = load_tokenizer(tokenizer_dir)
    model = apply_stage(model, STAGES[stage], new_rows_from=new_rows_from)
    lines = (SAMPLES / "zh_sample.txt").read_text(encoding="utf-8").splitlines()[seed:seed + 8]
    x = torch.tensor([[tok.bos_token_id] + tok.encode(t, add_special_tokens=False)[:23] for t in lines
                      if len(tok.encode(t, add_special_tokens=False)) >= 23])
    adamw_steps(model, x, steps)
    save_adapter(model, out, tokenizer_dir=tokenizer_dir, run_config=run_config, require_trained=stage != "stage1")
    return out


# ----------------------------------------------------------------------------- subprocesses
# Variables a caller's shell may hold that would change what a launched run does: rank and world
# variables (a run must start its own world), the launcher's knobs, and the engine's test seam.
_LEAKY_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
              "GPUS_PER_NODE", "HOSTFILE", "CUDA_VISIBLE_DEVICES", "CONFIG", "DETACH", "DRY_RUN", "LAUNCHER_ARGS",
              "ZHLLAMA_CRASH", "ZHLLAMA_NAN_STEPS", "ZHLLAMA_NAN_WEIGHTS")


def subprocess_env(**extra) -> dict:
    """The environment for a `zhllama`, launcher or script subprocess: CPU ranks (gloo), one OpenMP
    thread per rank, offline, this interpreter first on PATH (the launch scripts call `python`,
    `deepspeed`), nothing of the above leaking in. `extra` is applied last (values made str; None
    removes a variable)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for k in _LEAKY_ENV:
        env.pop(k, None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def run_cli(*args):
    """Run the zhllama CLI in-process; returns (exit code, stdout, stderr) via capsys by the caller."""
    from zhllama.app.cli import main
    return main([str(a) for a in args])


@pytest.fixture
def zhllama_exe() -> str:
    """The installed console script (the same one users run)."""
    exe = Path(sys.executable).parent / "zhllama"
    if not exe.exists():
        pytest.skip("zhllama console script not installed (run scripts/setup.sh)")
    return str(exe)


# ----------------------------------------------------------------------------- tiny model fixtures
# A small LLaMA-style tokenizer trained on the bundled samples (Chinese + English) and a tiny LLaMA
# built from it: shared by the engine, SFT and export tests so they build it once per session.

SAMPLES = REPO / "zhllama" / "data"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from zhllama.modelio import load_tokenizer, save_tokenizer
    from zhllama.tiny import make_tiny_sp

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    text = (SAMPLES / "zh_sample.txt").read_text(encoding="utf-8") + \
        (SAMPLES / "en_sample.txt").read_text(encoding="utf-8")
    make_tiny_sp(out / "tokenizer.model", text=text, vocab_size=3000, seed_lines=1)
    save_tokenizer(load_tokenizer(out / "tokenizer.model"), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from zhllama.tiny import make_tiny_llama

    out = tmp_path_factory.mktemp("tiny_model") / "model"
    make_tiny_llama(tiny_tokenizer_dir / "tokenizer.model", out, seed=0)
    return out


def _pack_sample(tmp_path_factory, tokenizer_dir, sample: str, name: str) -> Path:
    """A bundled sample packed into 32-token blocks (5% validation) with the tiny tokenizer."""
    from zhllama.app.cli import main

    out = tmp_path_factory.mktemp(f"tiny_{name}") / name
    assert main(["data", "pack", "--tokenizer", tokenizer_dir, "--input", str(SAMPLES / sample),
                 "--block-size", "32", "--out", str(out), "--validation-ratio", "0.05", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The bundled Chinese sample packed into 32-token blocks (5% validation) with the tiny tokenizer."""
    return _pack_sample(tmp_path_factory, tiny_tokenizer_dir, "zh_sample.txt", "packed")

@pytest.fixture(scope="session")
def tiny_packed_en(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The bundled English sample packed like `tiny_packed`: the second source of a mixture."""
    return _pack_sample(tmp_path_factory, tiny_tokenizer_dir, "en_sample.txt", "en")


TINY_NEW_ROWS = 500  # rows of the tiny vocabulary `tiny_model_base_vocab` calls added by a merge


@pytest.fixture(scope="session")
def tiny_model_base_vocab(tmp_path_factory, tiny_model_dir) -> Path:
    """`tiny_model_dir` whose config.json records, as `zhllama vocab resize` does, that its last 500 rows were
    added by a merge (zhllama_base_vocab_size = vocab - 500): the rarest pieces of the tiny tokenizer, which
    occur in the Chinese sample and not in the English one. The engine splits the rows there."""
    import json
    import shutil

    from zhllama.modelio import BASE_VOCAB_KEY

    out = tmp_path_factory.mktemp("tiny_base_vocab") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config[BASE_VOCAB_KEY] = config["vocab_size"] - TINY_NEW_ROWS
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out

GROWN_PIECES = ["自然语言处理", "人工智能", "机器学习", "大模型"]


def grow_tiny(root: Path, tiny_model_dir: Path, tiny_tokenizer_dir: Path):
    """(tokenizer dir, resized model dir): the tiny tokenizer extended by GROWN_PIECES (as a merge would) and
    the tiny model resized to it (new rows: the mean)."""
    from zhllama.modelio import load_tokenizer, save_tokenizer
    from zhllama.tiny import extend_sp_model
    from zhllama.vocab.resize import resize_checkpoint

    big = root / "tok"
    big.mkdir()
    extend_sp_model(tiny_tokenizer_dir / "tokenizer.model", GROWN_PIECES, big / "tokenizer.model")
    save_tokenizer(load_tokenizer(big / "tokenizer.model"), big)
    resize_checkpoint(tiny_model_dir, big, root / "resized", init="mean")
    return big, root / "resized"


# ----------------------------------------------------------------------------- tiny SentencePiece pair
# Text made here and a small English "base" plus a small Chinese model trained on it: the vocab
# train, merge and report tests build theirs with these.

WORDS = ("我们 喜欢 北京 上海 学生 老师 今天 明天 天气 很好 公园 散步 电脑 手机 价格 便宜 质量 服务 酒店 房间 "
         "干净 早餐 经济 发展 政府 工作 人民 国家 社会 历史 文化 教育 科学 技术 研究 问题 方法 时间 地方 朋友 "
         "孩子 家庭 医院 银行 公司 市场 产品 客户 快递 包装 味道 外卖 东西 不错 满意 推荐 下次 还会 购买 "
         "一个 这个 那个 非常 比较 已经 可以 应该 需要 因为 所以 但是 如果 虽然 而且 还是 或者 就是").split()
PUNCT = "，。！？、；："
LATIN = ["iPhone", "USB", "Windows", "ok", "WiFi", "app", "CPU", "3D"]


def synth_chinese(n_lines: int, seed: int = 0) -> list:
    """Deterministic Chinese-like text: random word sequences with punctuation, digits and Latin words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(4, 14)):
            r = rng.random()
            if r < 0.06:
                parts.append(str(rng.randint(0, 2025)))
            elif r < 0.10:
                parts.append(" " + rng.choice(LATIN) + " ")
            else:
                parts.append(rng.choice(WORDS))
            if rng.random() < 0.15:
                parts.append(rng.choice(PUNCT))
        parts.append("。")
        lines.append("".join(parts))
    return lines


def write_lines(path: Path, lines) -> Path:
    """`lines` into `path` (UTF-8), each ended by a newline."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_sp_pair(d: Path, english, en_vocab: int, chinese, zh_vocab: int):
    """(base model, Chinese model): SentencePiece BPE models with LLaMA's settings trained in `d`."""
    from zhllama.vocab import train as vtrain

    vtrain.train([write_lines(d / "en.txt", english)], d / "base", vocab_size=en_vocab, threads=2)
    vtrain.train([write_lines(d / "zh.txt", chinese)], d / "zh", vocab_size=zh_vocab, threads=2)
    return d / "base" / "zh_sp.model", d / "zh" / "zh_sp.model"


def unreachable_by_sentencepiece(model_bytes: bytes, ids) -> list:
    """The ids among `ids` whose text, encoded alone by sentencepiece (no dummy prefix, "\u2581" as a space),
    is not exactly that piece: written here from sentencepiece's own API, independent of zhllama.spm."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    proto.normalizer_spec.add_dummy_prefix = False
    plain = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ids = list(ids)
    texts = [proto.pieces[i].piece.replace("\u2581", " ") for i in ids]
    return [i for i, enc in zip(ids, plain.encode(texts)) if enc != [i]]


def cli_error(capsys, *args) -> str:
    """Run `zhllama ARGS` expecting bad input: a non-zero exit and one line on stderr, returned."""
    rc = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    return err
