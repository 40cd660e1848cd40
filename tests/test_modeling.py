import pytest
import torch
from transformers import LlamaConfig

from loralab.config import LoraSection, ModelConfig
from loralab.errors import LoralabError
from loralab import modeling
from loralab.tiny import TINYLLAMA_CONFIG


def test_tinyllama_parameter_counts_are_exact():
    counts = modeling.count_parameters_from_config(LlamaConfig(**TINYLLAMA_CONFIG), LoraSection())
    assert counts.trainable == 2_252_800
    assert counts.total == 1_100_048_384
    assert str(counts) == "trainable params: 2,252,800 of 1,100,048,384 (0.20%)"


def test_lora_rank_scales_trainable_count():
    counts = modeling.count_parameters_from_config(LlamaConfig(**TINYLLAMA_CONFIG), LoraSection(r=16))
    assert counts.trainable == 2 * 2_252_800


def test_precision_policy_cpu(monkeypatch):
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: True)
    assert modeling.choose_precision("cpu") == "bf16"
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: False)
    assert modeling.choose_precision("cpu") == "fp32"
    with pytest.raises(LoralabError, match="no native bf16"):
        modeling.choose_precision("cpu", "bf16")
    with pytest.raises(LoralabError, match="fp16 training needs a GPU"):
        modeling.choose_precision("cpu", "fp16")


def test_precision_policy_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 can claim
    assert modeling.choose_precision("cuda") == "fp16"
    with pytest.raises(LoralabError, match="Tesla T4 has no native bf16"):
        modeling.choose_precision("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    assert modeling.choose_precision("cuda") == "bf16"
    assert modeling.choose_precision("cuda", "fp32") == "fp32"


def test_missing_local_model_path(tmp_path):
    with pytest.raises(LoralabError, match="does not exist"):
        modeling.resolve_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(LoralabError, match="not a model folder"):
        modeling.resolve_model_source(ModelConfig(name_or_path=str(tmp_path)))


def test_unreachable_hub_says_how_to_use_a_local_path():
    # conftest sets HF_HUB_OFFLINE=1, which is what an unreachable hub looks like to transformers.
    with pytest.raises(LoralabError, match="set model.name_or_path: DIR"):
        modeling.load_tokenizer(ModelConfig(name_or_path="nobody-here/no-such-model"))


def test_base_weights_are_stored_in_compute_dtype_and_lora_in_fp32(tiny_model_dir):
    model = modeling.add_lora(modeling.load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "bf16", "cpu"), LoraSection())
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and base == {torch.bfloat16}
