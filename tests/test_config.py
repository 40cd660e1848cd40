from pathlib import Path

import pytest

from loralab.config import ConfigError, config_from_dict, load_config, run_warnings
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


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_1k.json"


def _short(**train):
    return config_from_dict({"name": "x", "train": {"max_steps": 20, "warmup_steps": 2, "logging_steps": 2, **train},
                             "data": {"eval_size": 50}})


def test_run_warnings_name_each_setting_that_makes_a_run_too_short_to_judge():
    assert run_warnings(_short()) == []
    warmup = run_warnings(_short(warmup_steps=50))
    assert len(warmup) == 1 and warmup[0].startswith("train.warmup_steps 50 >= train.max_steps 20")
    assert "stops at 7.6e-05" in warmup[0]  # 2e-4 x 19 / 50: the rate at the last step
    points = run_warnings(_short(logging_steps=10))
    assert points == ["train.logging_steps 10 logs 2 loss points in train.max_steps 20, too few to show a trend; "
                      "set train.logging_steps to at most 4"]
    assert "raise train.max_steps to 5" in run_warnings(_short(max_steps=3, warmup_steps=0, logging_steps=1))[0]
    small = config_from_dict({"name": "x", "data": {"eval_size": 50}, "eval": {"num_examples": 4}})
    assert run_warnings(small) == ["4 held-out examples (data.eval_size, eval.num_examples): BLEU, ROUGE and the "
                                   "held-out loss on fewer than 10 say little; hold out at least 10"]


def test_the_cli_prints_each_warning_as_one_line_and_python_issues_them_as_warnings(tmp_path, capsys):
    from loralab import cli
    from loralab.config import ConfigWarning

    path = tmp_path / "short.yaml"
    path.write_text("name: short\ntrain: {max_steps: 20, warmup_steps: 50}\n")
    with pytest.warns(ConfigWarning, match="train.warmup_steps 50 >= train.max_steps 20"):
        load_config(path)
    assert cli.main(["plan", str(path), "--device", "a100"]) == 2  # no model here: the warnings come first anyway
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("loralab: warning: train.warmup_steps 50 >= train.max_steps 20")
    assert out[1].startswith("loralab: warning: train.logging_steps 10 logs 2 loss points")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(path, warn=False)  # what reads a finished run's config says nothing


@pytest.mark.skipif(not SHARED_DATA.is_file(), reason="needs ../shared/data/alpaca_en_1k.json")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_match_the_shipped_data_and_warn_of_nothing(path):
    import json

    from loralab.data import split_sizes

    cfg = load_config(path, warn=False)
    assert run_warnings(cfg) == []
    if cfg.data.path.endswith("alpaca_en_1k.json"):
        records = len(json.loads(SHARED_DATA.read_text()))
        assert split_sizes(records, cfg.data.num_examples, cfg.data.eval_size, cfg.data.path) == []


def test_the_quick_recipe_is_scaled_to_its_steps():
    """configs/smollm2-quick.yaml: warm-up a tenth of the steps, at least 5 points of the training and of the
    held-out loss, a held-out set big enough to mean something and short answers (a few minutes on a CPU)."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smollm2-quick.yaml", warn=False)
    t = cfg.train
    assert t.max_steps <= 100 and t.warmup_steps <= t.max_steps // 10
    assert t.max_steps // t.logging_steps >= 5 and t.max_steps // t.eval_loss_steps + 1 >= 5
    assert 10 <= cfg.data.eval_size <= 30 and cfg.eval.max_new_tokens <= 64
    qkvo = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (8, 16, qkvo)
