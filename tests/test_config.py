from pathlib import Path

import pytest

from loralab.config import ConfigError, config_from_dict, load_config
from loralab.errors import LoralabError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.lora.r > 0


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 1


def test_reference_config_is_the_reference_experiment():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tinyllama-alpaca.yaml")
    assert cfg.model.name_or_path == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert cfg.data.path == "tatsu-lab/alpaca" and cfg.data.num_examples == 1000
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (8, 16, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    t = cfg.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.max_steps) == (1, 8, 500)
    assert (t.learning_rate, t.warmup_steps) == (2e-4, 50)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_valid_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "name: x\nlora:\n  rank: 8\n"))
    msg = str(err.value)
    assert "lora.rank" in msg and "r, lora_alpha, lora_dropout, target_modules" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="'optimizer'.*valid keys.*train"):
        load_config(_write(tmp_path, "name: x\noptimizer: {}\n"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: x\ntrain:\n  max_steps: ten\n", "'train.max_steps' must be an integer"),
        ("name: x\ntrain:\n  precision: fp8\n", "'train.precision' must be one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("name: x\nlora:\n  target_modules: q_proj\n", "'lora.target_modules' must be a list of a string"),
        ("name: x\ntrain:\n  learning_rate: true\n", "'train.learning_rate' must be a number"),
        ("name: x\ntrain:\n  max_steps: 0\n", "'train.max_steps' must be positive"),
        ("model: {}\n", "missing required key 'name'"),
    ],
)
def test_wrong_values_are_named(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert fragment in str(err.value)


def test_overrides_take_precedence_and_are_typed(tmp_path):
    cfg = load_config(
        _write(tmp_path, "name: x\ntrain:\n  max_steps: 7\n"),
        ["train.max_steps=3", "train.learning_rate=1e-3", "lora.target_modules=[q_proj]", "data.num_examples=null"],
    )
    assert cfg.train.max_steps == 3 and cfg.train.learning_rate == 1e-3
    assert cfg.lora.target_modules == ["q_proj"] and cfg.data.num_examples is None
    assert cfg.train.warmup_steps == 50  # untouched default


def test_bad_override_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.max_step'"):
        load_config(_write(tmp_path, "name: x\n"), ["train.max_step=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(_write(tmp_path, "name: x\n"), ["train.max_steps"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: [x\n"))


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (True, True), (False, False)])
def test_gradient_checkpointing_takes_auto_or_a_bool(value, expected):
    cfg = config_from_dict({"name": "x", "train": {"gradient_checkpointing": value}})
    assert cfg.train.gradient_checkpointing == expected


def test_gradient_checkpointing_rejects_other_values():
    with pytest.raises(LoralabError, match="gradient_checkpointing"):
        config_from_dict({"name": "x", "train": {"gradient_checkpointing": "sometimes"}})
