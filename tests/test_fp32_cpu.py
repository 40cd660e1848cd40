"""The fp32 CPU path (a CPU without native bf16: train.precision auto is fp32 there), on every CPU: the pieces
loralab.decisions picks for it give plain PEFT's losses and gradients, and `loralab plan --calibrate` measures
this CPU's matmul peaks once per CPU model and ISA limit."""

import json
import os

import pytest
import torch
from conftest import resolve_switches

from loralab import devices
from loralab.config import LoraSection, ModelConfig, TrainConfig
from loralab.cpu import catalogue, fused_lora, fused_mlp, fused_norm
from loralab.cpu.speed_path import Switched, speed_path
from loralab.devices import DeviceFacts
from loralab.loss import response_loss_sum
from loralab.models.loading import add_lora, load_model
from loralab.models.tiny import TINYLLAMA_CONFIG
from loralab.packing import pack_examples
from loralab.planning import measure as plan
from loralab.precision import choose_precision

AVX2_CPU = DeviceFacts("cpu", "AMD EPYC 7B12", 16 * 2**30, native_bf16=False)
FP32_PIECES = catalogue.training_pieces("fp32", native_bf16=False)


def _lora_model(model_dir):
    torch.manual_seed(0)
    model = add_lora(load_model(ModelConfig(name_or_path=str(model_dir)), "fp32", "cpu"), LoraSection(lora_dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero, which would hide a wrong gradient through A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def _examples(vocab, lengths):
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


def _loss_and_grads(model, examples, **kwargs):
    model.zero_grad()
    total, count = 0.0, 0
    for ex in examples:  # one example per row: the plain reference
        s, n = response_loss_sum(model, pack_examples([ex]), **kwargs)
        s.backward()
        total, count = total + s.item(), count + n
    return total, count, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_an_avx2_cpu_trains_in_fp32_on_the_pieces_measured_for_it():
    assert choose_precision(AVX2_CPU) == "fp32"
    assert catalogue.training_pieces("fp32", native_bf16=False) is catalogue.TRAINING[(False, "fp32")]
    # fp32 on a CPU with native bf16 (forced) takes the fp32 measurement: its matmuls take the same MKL path
    assert catalogue.training_pieces("fp32", native_bf16=True) == FP32_PIECES
    assert catalogue.training_pieces("bf16", native_bf16=True) is catalogue.TRAINING[(True, "bf16")]


def test_the_fp32_speed_path_gives_plain_pefts_losses_and_grads(tiny_model_dir):
    """Every piece the fp32 row switches on, a packed row of three examples, against PEFT + transformers one by one
    with the model's own head: the same loss and LoRA gradients within fp32 rounding."""
    model = _lora_model(tiny_model_dir)
    examples = _examples(model.config.vocab_size, [23, 41, 12])
    plain_loss, plain_count, plain_grads = _loss_and_grads(model, examples, fused_head=False)
    with speed_path(model, FP32_PIECES.row_tokens, pieces=FP32_PIECES) as switched:
        assert bool(switched.fused_lora_layers) is FP32_PIECES.fused_lora
        assert bool(switched.fused_rms_norms) is FP32_PIECES.fused_norm
        assert switched.per_example_attention is FP32_PIECES.per_example_attention
        assert switched.onednn_weights == 0  # not asked for (tests/test_onednn_weights.py covers fp32 with it)
        model.zero_grad()
        s, count = response_loss_sum(model, pack_examples(examples), fused_head=FP32_PIECES.head_loss)
        s.backward()
        fast_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert count == plain_count
    torch.testing.assert_close(s.item(), plain_loss, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_pieces_switched_off_leave_pefts_and_transformers_forwards(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    none = catalogue.CpuPieces(False, False, False, False, False, 256, fused_mlp=False)
    with speed_path(model, 256, pieces=none) as switched:
        assert switched == Switched(False, 0, 0, None, 0)
        patched = {getattr(m.__dict__.get("forward"), "__func__", None) for m in model.modules()}
        assert fused_lora._fused_forward not in patched and fused_norm._fused_forward not in patched
        assert fused_mlp._fused_forward not in patched
        assert model.config._attn_implementation == "sdpa"


def test_an_isa_limited_cpu_has_no_native_bf16(monkeypatch):
    """oneDNN runs every bf16 matmul: when it says no (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512-BF16 CPU), bf16 is
    emulated and slow, whatever /proc/cpuinfo lists."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert devices.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert devices.cpu_has_native_bf16() is True


def test_calibrated_peaks_are_measured_once_per_cpu_and_isa_limit(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in devices.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    measured = []
    monkeypatch.setattr(plan, "idle_matmul_peak", lambda p: measured.append(p) or 123e9)
    first = plan.cpu_profile(calibrate=True, facts=AVX2_CPU)
    assert measured == ["fp32"] and first.peak_flops == {"fp32": 123e9} and "measured just now" in first.description
    second = plan.cpu_profile(calibrate=True, facts=AVX2_CPU)
    assert measured == ["fp32"] and second.peak_flops == {"fp32": 123e9}  # from the cache: instant
    assert "cached in" in second.description and "matmul peaks of this CPU" in second.basis
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # another ISA limit is another CPU as far as speed goes
    plan.cpu_profile(calibrate=True, facts=AVX2_CPU)
    assert measured == ["fp32", "fp32"]
    cache = json.loads(plan.peaks_cache_file().read_text())
    assert len(cache) == 2 and all(k.startswith("AMD EPYC 7B12 | ") for k in cache)


def test_a_plan_measures_the_cpu_once_and_calibrate_measures_it_again(monkeypatch):
    measured = []
    monkeypatch.setattr(plan, "idle_matmul_peak", lambda p: measured.append(p) or 456e9)
    first = plan.resolve_profile("cpu")  # what `loralab plan` does by default
    assert measured and first.peak_flops == dict.fromkeys(measured, 456e9) and "measured just now" in first.description
    count = len(measured)
    assert plan.resolve_profile("cpu").peak_flops == first.peak_flops and len(measured) == count  # cached
    plan.resolve_profile("cpu", fresh=True)  # `loralab plan --calibrate`
    assert len(measured) == 2 * count
    reference = plan.cpu_profile(calibrate=False)  # a train's memory decisions: nothing measured
    assert len(measured) == 2 * count and reference.peak_flops != first.peak_flops


def test_a_damaged_peaks_cache_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    plan.peaks_cache_file().parent.mkdir(parents=True)
    plan.peaks_cache_file().write_text("{not json")
    monkeypatch.setattr(plan, "idle_matmul_peak", lambda p: 99e9)
    assert plan.cpu_profile(calibrate=True, facts=AVX2_CPU).peak_flops == {"fp32": 99e9}
    assert json.loads(plan.peaks_cache_file().read_text())


@pytest.mark.parametrize("precision,native", [("fp32", False), ("bf16", True)])
def test_the_plan_uses_the_pieces_of_the_cpu_kind_and_precision(precision, native):
    profile = plan.cpu_profile(facts=DeviceFacts("cpu", "AMD EPYC", 16 * 2**30, native_bf16=native))
    on = catalogue.training_pieces(precision, native)
    switches = resolve_switches({"model_type": "llama", **TINYLLAMA_CONFIG}, LoraSection(), TrainConfig(), [300] * 8,
                                profile, precision)
    assert switches.cpu_pieces == on and switches.per_example_attention is on.per_example_attention


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not devices.cpu_has_native_bf16(), reason="needs native bf16 matmuls on this CPU"))])
def test_a_checkpointed_cpu_run_tunes_the_allocator_as_its_pieces_say(tmp_path, tiny_model_dir, alpaca_path,
                                                                     monkeypatch, precision):
    """`loralab train`'s trainer with gradient checkpointing hands it to the allocator: lean in fp32 (the heap kept
    2.5 GB more there), the heap kept in bf16 (19% faster there): CpuPieces.lean_when_checkpointing."""
    from loralab.config import config_from_dict
    from loralab.cpu import allocator
    from loralab.files import read_jsonl
    from loralab.runs.layout import RunDir
    from loralab.stages import prepare, train

    asked = []
    monkeypatch.setattr(allocator, "tune_allocator", lambda rows, checkpointing=False, *_: asked.append(checkpointing))
    cfg = config_from_dict({
        "name": "ckpt", "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(alpaca_path), "num_examples": 12, "eval_size": 0, "max_length": 128},
        "train": {"max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "warmup_steps": 0,
                  "logging_steps": 1, "save_steps": 1, "device": "cpu", "precision": precision,
                  "gradient_checkpointing": True},
    })
    prepare.run(cfg)
    examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(RunDir(cfg).train_file)]
    switches = train.decide(cfg, examples)
    assert switches.gradient_checkpointing and switches.cpu_pieces is not None
    trainer = train.build_trainer(cfg, train.build_model(cfg, switches), examples, tmp_path / "ckpt", [], switches)
    trainer.train()
    assert asked == [precision == "fp32"]


def test_the_command_line_caps_onednns_primitive_cache_unless_the_user_set_it(monkeypatch, tmp_path, capsys):
    from loralab import cli
    from loralab.cpu import allocator

    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2  # set before anything else, even a failing command
    assert os.environ["LRU_CACHE_CAPACITY"] == str(allocator.PRIMITIVE_CACHE_ENTRIES)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    cli.main(["train", str(tmp_path / "missing.yaml")])
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
