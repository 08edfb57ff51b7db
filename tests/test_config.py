"""The run config (pretrain/config.py): value types read from the RunConfig annotations, errors that
name the key and where it came from, and the stage-preset override keys listed once."""

import dataclasses

import pytest

from zhllama.errors import ConfigError
from zhllama.export.model_card import HYPER
from zhllama.pretrain import checkpoint
from zhllama.pretrain.config import RANGES, RunConfig, load_config
from zhllama.pretrain.presets import OVERRIDE_KEYS, STAGES, StagePreset

BASE = ["model=m", "out=o", "data=[d]"]


def test_list_of_str_keys_take_lists_and_single_values():
    cfg = load_config(None, [*BASE[:2], "data=[a, b/c]", "init_adapters=runs/stage1/final",
                             "lora_targets=[q_proj, v_proj]", "stage=stage2"])
    assert cfg.data == ["a", "b/c"]
    assert cfg.init_adapters == ["runs/stage1/final"]  # one value: a list of one
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.preset().lora_targets == ("q_proj", "v_proj")
    assert load_config(None, [*BASE[:2], "data=[2024]"]).data == ["2024"]  # YAML read a number: still a path


def test_list_of_float_items_are_numbers():
    cfg = load_config(None, [*BASE, "betas=[0.9, 1e-3]"])  # YAML 1.1 reads 1e-3 as a string
    assert cfg.betas == [0.9, 0.001] and cfg.preset().betas == (0.9, 0.001)
    with pytest.raises(ConfigError, match=r"command line: key 'betas' must be a number, got 'x'"):
        load_config(None, [*BASE, "betas=[0.9, x]"])
    with pytest.raises(ConfigError, match="key 'data' must be a list"):
        load_config(None, [*BASE[:2], "data={a: 1}"])


def test_optional_int_takes_null_or_an_integer():
    assert load_config(None, [*BASE, "max_steps=null"]).max_steps is None
    assert load_config(None, [*BASE, "max_steps=12"]).max_steps == 12
    assert load_config(None, [*BASE, "global_batch=16.0"]).global_batch == 16  # a whole float is an int
    with pytest.raises(ConfigError, match=r"key 'max_steps' must be an integer, got 1\.5"):
        load_config(None, [*BASE, "max_steps=1.5"])
    with pytest.raises(ConfigError, match="key 'micro_batch' may not be null"):  # int, not Optional[int]
        load_config(None, [*BASE, "micro_batch=null"])


@pytest.mark.parametrize("text, want", [("true", True), ("false", False), ("yes", True), ("off", False),
                                        ("'false'", False), ("'True'", True)])
def test_bool_keys_take_yaml_booleans_and_their_quoted_words(text, want):
    assert load_config(None, [*BASE, f"resume={text}"]).resume is want


@pytest.mark.parametrize("item, message", [
    ("resume=maybe", "key 'resume' must be true or false, got 'maybe'"),
    ("resume=1", "key 'resume' must be true or false, got 1"),
    ("micro_batch=two", "key 'micro_batch' must be an integer, got 'two'"),
    ("micro_batch=true", "key 'micro_batch' must be an integer, got True"),
    ("lr=fast", "key 'lr' must be a number, got 'fast'"),
    ("template=[a]", "key 'template' must be a string, got ['a']"),
    ("field_map=[a]", "key 'field_map' must be a mapping, got ['a']"),
])
def test_a_wrong_type_names_the_key(item, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BASE, item])
    assert str(e.value) == f"command line: {message}"


def test_a_wrong_type_in_a_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nout: o\ndata: [d]\nsave_every: often\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: key 'save_every' must be an integer, got 'often'"
    path.write_text("model: m\nout: o\ndata: [d]\nlerning_rate: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{path}: unknown key 'lerning_rate'"):
        load_config(path)


def test_every_field_type_has_a_parser():
    """A new RunConfig field of a type _coerce cannot parse fails here, not on a user's run."""
    cfg = RunConfig(model="m", out="o", data=["d"])
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        if value is not None:
            assert load_config(None, [*BASE, f"{f.name}={value!r}" if isinstance(value, str) else
                                      f"{f.name}={value}"]).to_dict()[f.name] == value


def test_override_keys_are_listed_once_and_every_reader_uses_them():
    preset_fields = {f.name for f in dataclasses.fields(StagePreset)}
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(OVERRIDE_KEYS) <= preset_fields & run_fields
    assert set(OVERRIDE_KEYS) - set(RANGES) == {"betas", "lora_targets"}  # the validator covers each
    assert HYPER == OVERRIDE_KEYS  # the model card
    assert set(OVERRIDE_KEYS) <= set(checkpoint.RESUME_KEYS)  # a changed hyperparameter refuses a resume
    # Every override key reaches the preset.
    values = {"lr": 3e-4, "global_batch": 32, "block_size": 64, "warmup_ratio": 0.1, "weight_decay": 0.01,
              "betas": [0.8, 0.9], "grad_clip": 0.5, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
              "lora_targets": ["q_proj"]}
    assert set(values) == set(OVERRIDE_KEYS)
    p = load_config(None, [*BASE, "stage=stage2", *(f"{k}={v}" for k, v in values.items())]).preset()
    for key, value in values.items():
        assert getattr(p, key) == (tuple(value) if isinstance(value, list) else value), key
        assert getattr(STAGES["stage2"], key) != getattr(p, key), key  # really changed from the preset's


def test_unset_override_keys_keep_the_stage_preset():
    assert load_config(None, [*BASE, "stage=sft"]).preset() == STAGES["sft"]


def test_train_help_lists_the_override_keys():
    import argparse

    from zhllama.pretrain import train
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    help_text = " ".join(p.format_help().split())
    assert ", ".join(OVERRIDE_KEYS) in help_text
