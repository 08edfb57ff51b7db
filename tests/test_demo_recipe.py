"""`zhllama demo --recipe cla2`: Chinese-LLaMA-Alpaca-2's choices on our recipe's budget.

The fast tests check the settings against the anchors' script (ymcui/Chinese-LLaMA-Alpaca-2,
scripts/training/run_pt.sh at f4edad3: lr 2e-4, LoRA r=64 alpha=128 dropout 0.05 on q,k,v,o,gate,up,down,
embed_tokens and lm_head in modules_to_save, warmup 0.05, weight decay 0.01) with the numbers written
out here, and the refusals. The slow test runs the recipe on the tiny demo after the quick demo of
test_demo.py's kind (the steps up to the vocabulary are copied from one and reused by the other) and
reads what really ran: the resize report, the adapter's LoRA shape, the resolved run config, the tokens.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import subprocess_env
from zhllama.app import demo as demo_mod
from zhllama.app.cli import main
from zhllama.app.demo.settings import STAGE_OF

SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("named", [False, True], ids=["tiny", "smollm2"])
def test_cla2_settings_are_the_anchors_choices_on_our_budget(named):
    ours = demo_mod.recipe_settings(named, quick=False)
    cla2 = demo_mod.recipe_settings(named, quick=False, recipe="cla2")
    assert demo_mod.RECIPES["cla2"] == ("data", "base", "vocab-train", "vocab-merge", "resize", "pack", "pretrain",
                                        "sft", "merge", "generate", "eval")
    assert "stage1" not in cla2 and "stage2" not in cla2
    assert cla2["resize"] == {"init": "hf-mean"}
    assert not cla2["pack"].get("english_share") and "english_source" not in cla2["pack"]
    assert cla2["pack"]["block_size"] == ours["pack"]["block_size"]
    p = cla2["pretrain"]
    # the same budget: as many optimizer steps as our stages 1 and 2, the same batch and block
    assert p["max_steps"] == ours["stage1"]["max_steps"] + ours["stage2"]["max_steps"]
    assert p["global_batch"] == ours["stage2"]["global_batch"] == ours["stage1"]["global_batch"]
    # lr 2e-4 scaled as ours is: our stage-2 lr / the 7B stage-2 preset's 1e-4, i.e. twice ours
    assert p["lr"] == pytest.approx(2 * ours["stage2"]["lr"])
    assert p["warmup_ratio"] == 0.05
    o = p["overrides"]
    assert (o["lora_r"], o["lora_alpha"], o["lora_dropout"], o["weight_decay"]) == (64, 128, 0.05, 0.01)
    assert set(o["lora_targets"]) == SEVEN and len(o["lora_targets"]) == 7
    # our SFT, without our per-row learning rates (the anchors train every embedding row alike)
    assert "overrides" not in cla2["sft"]
    assert cla2["sft"] == {k: v for k, v in ours["sft"].items() if k != "overrides"}
    assert cla2["data"] == ours["data"] and cla2["vocab-train"] == ours["vocab-train"]
    assert STAGE_OF["pretrain"] == "stage2"   # LoRA + embed_tokens + lm_head, the stage-2 preset


def test_cla2_refuses_english_and_our_stage_names(tmp_path, capsys):
    assert main(["demo", "--recipe", "cla2", "--english-share", "0.2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recipe cla2" in err[0] and "Chinese only" in err[0], err
    assert main(["demo", "--recipe", "cla2", "--force", "stage1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force stage1" in err[0] and "pretrain" in err[0], err
    assert not (tmp_path / "o" / "data").exists()


def _demo(out: Path, *extra):
    return subprocess.run([sys.executable, "-m", "zhllama.app.cli", "demo", "--quick", "--out", str(out), *extra],
                          cwd=str(out.parent), env=subprocess_env(OMP_NUM_THREADS=None), capture_output=True,
                          text=True, timeout=1500)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    ours = _demo(root / "ours", "--ranks", "1")
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-3000:]
    cla2_out = root / "cla2"
    cla2_out.mkdir()
    for step in ("data", "base", "vocab-train", "vocab-merge"):   # shared steps: reused, not redone
        shutil.copytree(root / "ours" / step, cla2_out / step)
    cla2 = _demo(cla2_out, "--ranks", "1", "--recipe", "cla2")
    assert cla2.returncode == 0, cla2.stdout[-3000:] + cla2.stderr[-3000:]
    return {"ours": json.loads((root / "ours" / "summary.json").read_text()),
            "cla2": json.loads((cla2_out / "summary.json").read_text()), "cla2_out": cla2_out,
            "cla2_stdout": cla2.stdout}


@pytest.mark.slow
def test_cla2_runs_the_anchors_recipe_on_the_same_tokens(both):
    out, summary, ours = both["cla2_out"], both["cla2"], both["ours"]
    for step in ("data", "base", "vocab-train", "vocab-merge"):
        assert f"] {step}: done earlier, reused" in both["cla2_stdout"]
    rows = {r["stage"]: r for r in summary["rows"]}
    assert list(rows) == ["base", "vocab-train", "vocab-merge", "resize", "pack", "pretrain", "sft", "merge",
                          "generate", "eval"]
    assert json.loads((out / "resize" / "model" / "resize_report.json").read_text())["init"] == "hf-mean"
    run = Path(summary["figures"]["pretrain"]["run"])
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (64, 128, 0.05)
    assert set(adapter["target_modules"]) == SEVEN
    assert "embed_tokens" in adapter["modules_to_save"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    # tiny demo, quick: ours trains stage 1 and stage 2 for 10 steps each at lr 1e-2 / 5e-3
    assert (cfg["max_steps"], cfg["lr"], cfg["warmup_ratio"], cfg["weight_decay"]) == (20, 0.01, 0.05, 0.01)
    assert cfg["init_adapters"] == []
    tokens = {name: sum(json.loads((Path(s["figures"][st]["run"]) / "summary.json").read_text())["total_steps"]
                        * cfg_of(s, st)["global_batch"] * cfg_of(s, st)["block_size"] for st in steps)
              for name, s, steps in (("ours", ours, ("stage1", "stage2")), ("cla2", summary, ("pretrain",)))}
    assert tokens["ours"] == tokens["cla2"] == 20 * 8 * 64
    sft_cfg = cfg_of(summary, "sft")
    assert sft_cfg["init_adapters"] == [str(run / "final")] and sft_cfg["lr"] == cfg_of(ours, "sft")["lr"]
    packed = json.loads((Path(summary["figures"]["pack"]["packed"]) / "manifest.json").read_text())
    assert "english" not in summary["figures"]["pack"] and packed   # no English mix in the pack
    assert rows["pretrain"]["bits_per_char"] < rows["resize"]["bits_per_char"]
    assert summary["figures"]["eval"]["zhllama_eval"]["bits_per_char"] == pytest.approx(rows["sft"]["bits_per_char"],
                                                                                        rel=1e-3)


def cfg_of(summary, step):
    return yaml.safe_load((Path(summary["figures"][step]["run"]) / "config.yaml").read_text())
