import pytest
import torch
from transformers import LlamaConfig

from loralab.config import LoraSection, ModelConfig
from loralab.errors import LoralabError
from loralab.models import loading as modeling
from loralab.models.tiny import TINYLLAMA_CONFIG


def test_tinyllama_parameter_counts_are_exact():
    counts = modeling.count_parameters_from_config(LlamaConfig(**TINYLLAMA_CONFIG), LoraSection())
    assert counts.trainable == 2_252_800
    assert counts.total == 1_100_048_384
    assert str(counts) == "trainable params: 2,252,800 of 1,100,048,384 (0.20%)"


def test_lora_rank_scales_trainable_count():
    counts = modeling.count_parameters_from_config(LlamaConfig(**TINYLLAMA_CONFIG), LoraSection(r=16))
    assert counts.trainable == 2 * 2_252_800


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
    model = modeling.add_lora(modeling.load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "bf16", "cpu"),
                              LoraSection())
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and base == {torch.bfloat16}
