"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing already written lost."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import write_config

from loralab import cli


def _fails_cleanly(capsys, argv, fragment):
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("loralab: error:") and fragment in err, err
    assert "Traceback" not in err


def test_missing_config_file(capsys, tmp_path):
    _fails_cleanly(capsys, ["prepare", str(tmp_path / "none.yaml")], "config file not found")


def test_unknown_config_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ntrain:\n  max_stepz: 3\n")
    _fails_cleanly(capsys, ["prepare", str(cfg)], "unknown config key 'train.max_stepz'; valid keys in train:")


def test_missing_data_file(capsys, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(tmp_path / "nope.json")})
    _fails_cleanly(capsys, ["prepare", str(cfg)], "data file not found")


@pytest.mark.parametrize(
    "records, fragment",
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "record 1: missing 'output'"),
        ([{"instruction": "a", "output": 5}], "record 0: field 'output' must be a string"),
        ([], "holds no records"),
        ({"not": "a list"}, "must hold a JSON list"),
    ],
)
def test_malformed_records(capsys, tmp_path, tiny_model_dir, records, fragment):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)}, data={"path": str(data)})
    _fails_cleanly(capsys, ["prepare", str(cfg)], fragment)


def test_invalid_json_lines(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)}, data={"path": str(data)})
    _fails_cleanly(capsys, ["prepare", str(cfg)], "line 2: not valid JSON")


def test_nothing_left_after_filtering(capsys, tmp_path, tiny_model_dir, alpaca_path):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path), "max_length": 8})
    _fails_cleanly(capsys, ["prepare", str(cfg)], "no training examples left")


def test_missing_model_path(capsys, tmp_path, alpaca_path):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tmp_path / "no-model")},
                       data={"path": str(alpaca_path)})
    _fails_cleanly(capsys, ["prepare", str(cfg)], "does not exist")


def test_unreachable_hub_model(capsys, tmp_path, alpaca_path):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"},
                       data={"path": str(alpaca_path)})
    _fails_cleanly(capsys, ["prepare", str(cfg)], "set model.name_or_path: DIR")


def test_unreachable_hub_dataset(capsys, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": "tatsu-lab/alpaca"})
    _fails_cleanly(capsys, ["prepare", str(cfg)], "set data.path to that file")


def test_impossible_precision(capsys, tmp_path, tiny_model_dir, alpaca_path):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path)})
    assert cli.main(["prepare", str(cfg)]) == 0
    capsys.readouterr()
    _fails_cleanly(capsys, ["train", str(cfg), "--set", "train.precision=fp16"], "fp16 training needs a GPU")


def test_failed_prepare_keeps_earlier_outputs(capsys, tmp_path, tiny_model_dir, alpaca_path):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path)})
    assert cli.main(["prepare", str(cfg)]) == 0
    train_file = tmp_path / "runs" / "t" / "data" / "train.jsonl"
    before = train_file.read_bytes()
    _fails_cleanly(capsys, ["prepare", str(cfg), "--set", "data.max_length=8"], "no training examples left")
    assert train_file.read_bytes() == before


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loralab", "prepare", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
        timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"loralab: error: config file not found: {tmp_path / 'missing.yaml'}"]


@pytest.mark.parametrize("section,key", [("model", "name_or_path"), ("data", "path")])
def test_unreachable_hub_fails_fast_without_retry_noise(tmp_path, tiny_model_dir, alpaca_path, section, key):
    # Online mode with an endpoint nobody listens on: huggingface_hub alone would retry with backoff.
    model = "TinyLlama/TinyLlama-1.1B-Chat-v1.0" if section == "model" else str(tiny_model_dir)
    data = "tatsu-lab/alpaca" if section == "data" else str(alpaca_path)
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": model}, data={"path": data})
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "loralab", "prepare", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert time.monotonic() - started < 60
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is unreachable and it is not in the local cache" in lines[0], proc.stderr
    assert f"{section}.{key}" in lines[0]


@pytest.mark.parametrize("key", ["liger_kernels", "torch_compile"])
def test_cuda_only_switches_on_a_cpu_fail_before_loading_the_model(capsys, tmp_path, tiny_model_dir, alpaca_path, key):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path)}, train={key: True})
    assert cli.main(["prepare", str(cfg)]) == 0
    capsys.readouterr()
    _fails_cleanly(capsys, ["train", str(cfg)],
                   f"train.{key} is for CUDA GPUs and this run trains on cpu; set train.{key}: false")
    assert not (tmp_path / "runs" / "t" / "adapter").exists()


def test_cuda_switches_reach_the_trainer_and_liger_needs_its_package(monkeypatch, tmp_path):
    import importlib.util

    from loralab import decisions
    from loralab.config import config_from_dict
    from loralab.errors import LoralabError
    from loralab.switches import Switches
    from loralab.training import trainer as training_trainer

    cfg = config_from_dict({"name": "x", "train": {"liger_kernels": True, "torch_compile": True}})
    switches = Switches("cuda", "bf16", 512, 512, False, False, True, True)
    args = training_trainer.training_arguments(cfg, tmp_path, switches)
    assert args.use_liger_kernel and args.torch_compile
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    with pytest.raises(LoralabError, match="pip install liger-kernel"):
        decisions.check_switches(cfg, "cuda")
    # no package needed
    decisions.check_switches(config_from_dict({"name": "x", "train": {"torch_compile": True}}), "cuda")
