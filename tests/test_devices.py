"""Every device users have, simulated by monkeypatching what torch.cuda / torch.backends.mps report and the CPU's
bf16 probe: one precision rule (loralab.decisions), a plan for each, the auto switches and the Trainer's arguments,
and `loralab train` with the default config past its decision stage."""

from types import SimpleNamespace

import pytest
import torch
import yaml

from loralab import devices
from loralab.cli import main
from loralab.config import config_from_dict
from loralab.cpu import catalogue
from loralab.errors import LoralabError
from loralab.planning import measure, profiles
from loralab.precision import choose_precision, loss_scaling, supported_precisions
from loralab.stages import prepare, train
from loralab.training import trainer as training_trainer

GiB = 2**30
# name as torch.cuda reports it, compute capability, memory (GiB), SMs, the precision "auto" must pick
GPUS = {
    "T4": ("Tesla T4", (7, 5), 15, 40, "fp16"),
    "V100": ("Tesla V100-SXM2-16GB", (7, 0), 16, 80, "fp16"),
    "RTX 3090": ("NVIDIA GeForce RTX 3090", (8, 6), 24, 82, "bf16"),
    "RTX 4090": ("NVIDIA GeForce RTX 4090", (8, 9), 24, 128, "bf16"),
    "L4": ("NVIDIA L4", (8, 9), 22, 58, "bf16"),
    "A10G": ("NVIDIA A10G", (8, 6), 22, 80, "bf16"),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), 80, 108, "bf16"),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 80, 132, "bf16"),
    "H200": ("NVIDIA H200", (9, 0), 141, 132, "bf16"),
    "unknown GPU": ("NVIDIA RTX PRO 6000 Blackwell", (12, 0), 96, 188, "bf16"),
}
OTHERS = {  # kind, native bf16, the precision "auto" must pick
    "M2 Mac": ("mps", True, "bf16"),
    "old Mac": ("mps", False, "fp32"),
    "AVX2 CPU": ("cpu", False, "fp32"),
    "AVX-512-BF16 CPU": ("cpu", True, "bf16"),
}
DEVICES = list(GPUS) + list(OTHERS)
CARD_KEYS = {"T4": "t4", "V100": "v100", "RTX 3090": "rtx3090", "RTX 4090": "rtx4090", "L4": "l4", "A10G": "a10g",
             "A100": "a100-80gb", "H100": "h100", "H200": "h200", "unknown GPU": None}


def simulate(monkeypatch, device: str) -> str:
    """Make this process see ``device``; return the precision "auto" must pick there."""
    kind, bf16, expected = ("cuda", None, GPUS[device][4]) if device in GPUS else OTHERS[device]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: kind == "cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: kind == "mps")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: bool(bf16) if kind == "cpu" else True)
    monkeypatch.setattr(devices, "mps_supports_bf16", lambda: bool(bf16))
    if kind == "cuda":
        name, cc, memory, sms, _ = GPUS[device]
        props = SimpleNamespace(name=name, major=cc[0], minor=cc[1], total_memory=memory * GiB,
                                multi_processor_count=sms)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: props)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: cc)
    return expected


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir, alpaca_path):
    """A default config (only the model and the data named) with its data prepared."""
    root = tmp_path_factory.mktemp("devices")
    raw = {"name": "default", "output_dir": str(root / "runs"), "model": {"name_or_path": str(tiny_model_dir)},
           "data": {"path": str(alpaca_path), "num_examples": 64, "eval_size": 8}}
    cfg = config_from_dict(raw)
    prepare.run(cfg)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return cfg, path


@pytest.mark.parametrize("device", DEVICES)
def test_one_precision_rule_for_every_device(monkeypatch, device):
    expected = simulate(monkeypatch, device)
    facts = devices.probe(devices.detect_device("auto"))
    assert choose_precision(facts) == expected
    assert loss_scaling(expected) is (expected == "fp16")  # T4 and V100: fp16 with the loss scaler
    profile = measure.profile_for(facts)
    assert profile.default_precision == expected and set(profile.peak_flops) == set(supported_precisions(facts))
    if facts.kind == "cuda":
        assert profiles.gpu_card(facts) == CARD_KEYS[device]
        assert ("not in loralab's table" in profile.description) is (CARD_KEYS[device] is None)
        assert profile.memory_bytes == GPUS[device][2] * GiB
    if not facts.native_bf16:
        with pytest.raises(LoralabError, match="no native bf16|cannot compute in bf16"):
            choose_precision(facts, "bf16")
    if facts.kind == "cpu":
        with pytest.raises(LoralabError, match="fp16 training needs a GPU"):
            choose_precision(facts, "fp16")


@pytest.mark.parametrize("device", DEVICES)
def test_plan_switches_and_trainer_arguments_on_every_device(monkeypatch, device, prepared, tmp_path, capsys):
    expected = simulate(monkeypatch, device)
    cfg, path = prepared
    assert main(["plan", str(path), "--device", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"precision {expected}" in out and "fits" in out
    if device == "unknown GPU":
        assert "not in loralab's table" in out
    if device == "AVX2 CPU":  # the plan measures this CPU's matmul peaks; its other constants are the reference CPU's
        assert "matmul peaks of this CPU" in out and "from the reference CPU" in out and "NOT this CPU" not in out
    if device == "AVX-512-BF16 CPU" and profiles.is_reference_cpu(devices.probe("cpu")):
        assert "NOT this CPU" not in out

    facts = devices.probe(devices.detect_device("auto"))
    examples = prepare_examples(cfg)
    switches = train.decide(cfg, examples)  # as `loralab train` decides: this device, its oneDNN, config.json
    lengths = [len(e["input_ids"]) for e in examples]
    on_cpu = facts.kind == "cpu"
    assert switches.precision == expected and switches.device == facts.kind
    assert (switches.cpu_pieces is not None) is on_cpu  # no CPU-only kernels on a GPU or a Mac
    # On a CPU the measured pieces for its kind and precision (the fp32 row on an AVX2 CPU)
    pieces = catalogue.TRAINING[(facts.native_bf16, expected)] if on_cpu else None
    assert switches.cpu_pieces == pieces
    # a tiny model's 2,048-token rows keep few activations: on a CPU they are fast, and "auto" rows that long
    assert switches.row_tokens == (catalogue.LONG_ROW_TOKENS if on_cpu else max(lengths))
    assert switches.fast_row_tokens == (catalogue.LONG_ROW_TOKENS if on_cpu else catalogue.LEAN_ALLOCATOR_ROW_TOKENS)
    assert switches.gradient_checkpointing is False  # a tiny model fits everywhere
    assert switches.onednn_weights is (on_cpu and expected in ("bf16", "fp32") and devices_have_onednn())
    assert switches.liger_kernels is False and switches.torch_compile is False
    args = training_trainer.training_argument_values(cfg, tmp_path, switches)
    assert args["fp16"] is (expected == "fp16") and args["bf16"] is False and args["use_cpu"] is on_cpu
    if on_cpu:  # TrainingArguments itself asks torch which devices exist: only a CPU is real here
        assert training_trainer.training_arguments(cfg, tmp_path, switches).fp16 is False


class PastDecisions(Exception):
    pass


@pytest.mark.parametrize("device", DEVICES)
def test_train_with_the_default_config_gets_past_the_decisions_on_every_device(monkeypatch, device, prepared):
    expected = simulate(monkeypatch, device)
    cfg, _ = prepared
    seen = []

    def stop(cfg_, switches):
        seen.append(switches)
        raise PastDecisions

    monkeypatch.setattr(train, "build_model", stop)
    with pytest.raises(PastDecisions):
        train.run(cfg, force=True)
    assert seen[0].precision == expected


def prepare_examples(cfg):
    from loralab.files import read_jsonl
    from loralab.runs.layout import RunDir

    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(RunDir(cfg).train_file)]


def devices_have_onednn() -> bool:
    from loralab.cpu.onednn_weights import onednn_weights_available

    return onednn_weights_available(torch.bfloat16)
