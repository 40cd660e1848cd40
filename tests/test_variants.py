"""Adapter variants by config, through PEFT's own options: DoRA, rsLoRA, all-linear, modules_to_save; QLoRA and the
8-bit optimizer's guards. Trainable-parameter counts are exact on TinyLlama's config (a meta-device model: no
memory)."""

import importlib.util
import math

import pytest
import torch
from conftest import estimate
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loralab.commands.plan import format_plan
from loralab.config import LoraSection, TrainConfig
from loralab.cpu.speed_path import speed_path
from loralab.decisions import check_bitsandbytes
from loralab.errors import LoralabError
from loralab.loss import response_loss_sum
from loralab.models.loading import add_lora, count_parameters
from loralab.models.tiny import TINYLLAMA_CONFIG
from loralab.packing import pack_examples
from loralab.planning.profiles import PROFILES
from loralab.planning.shapes import lora_trainable_params, model_shape

ALL = "all-linear"
# (variant, trainable parameters): per layer q/k/v/o are 2048x2048, 2048x256, 2048x256, 2048x2048 (GQA, 4 KV heads),
# gate/up 2048x5632, down 5632x2048; 22 layers; vocab 32,000.
VARIANTS = [
    ({}, 22 * 8 * (4096 + 2304 + 2304 + 4096)),  # 2,252,800: the reference r=8 on q/k/v/o
    ({"use_rslora": True}, 2_252_800),  # only the scale changes
    ({"use_dora": True}, 2_252_800 + 22 * (2048 + 256 + 256 + 2048)),  # + a magnitude per output feature
    ({"target_modules": ALL}, 2_252_800 + 22 * 3 * 8 * (2048 + 5632)),
    ({"modules_to_save": ["lm_head"]}, 2_252_800 + 32_000 * 2048),
    ({"target_modules": ALL, "use_dora": True, "modules_to_save": ["lm_head", "embed_tokens"]},
     6_307_840 + 22 * (2048 + 256 + 256 + 2048 + 5632 + 5632 + 2048) + 2 * 32_000 * 2048),
]


@pytest.mark.parametrize("variant, expected", VARIANTS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_trainable_parameters_on_tinyllama_are_exact(variant, expected):
    lora = LoraSection(**variant)
    with torch.device("meta"):
        model = add_lora(LlamaForCausalLM(LlamaConfig(**TINYLLAMA_CONFIG)), lora)
    assert count_parameters(model).trainable == expected
    assert lora_trainable_params(model_shape(TINYLLAMA_CONFIG), lora) == expected


def test_literal_counts():
    assert VARIANTS[0][1] == 2_252_800 and VARIANTS[2][1] == 2_354_176 and VARIANTS[3][1] == 6_307_840
    assert VARIANTS[5][1] == 137_774_080


def test_rslora_scale_is_alpha_over_sqrt_r():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    for rslora, scale in [(False, 16 / 8), (True, 16 / math.sqrt(8))]:
        model = add_lora(LlamaForCausalLM(config), LoraSection(use_rslora=rslora))
        assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(scale)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"target_modules": ALL, "modules_to_save": ["lm_head"]}])
def test_variants_train_on_the_cpu_path(tiny_model_dir, variant):
    """DoRA layers keep PEFT's forward and a trainable head the model's own loss; gradients reach every trainable."""
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSection(lora_dropout=0.0, **variant))
    batch = pack_examples([{"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]}])
    with speed_path(model, 64):
        loss, count = response_loss_sum(model, batch)
        (loss / count).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # LoRA B starts at zero, so A's gradient is zero at step 0; everything else must get one.
    missing = [n for n, p in trainable if p.grad is None or (not p.grad.any() and "lora_A" not in n)]
    assert not missing, missing


def test_plan_accounts_for_qlora_and_the_8bit_optimizer():
    a100 = PROFILES["a100"]
    plain = estimate(TINYLLAMA_CONFIG, LoraSection(), TrainConfig(), [256], a100, "bf16", with_suggestions=False)
    qlora = estimate(TINYLLAMA_CONFIG, LoraSection(), TrainConfig(load_in_4bit=True, optim="adamw_bnb_8bit"), [256],
                     a100, "bf16", with_suggestions=False)
    base = {m.label: m.bytes for m in plain.memory}
    quant = {m.label: m.bytes for m in qlora.memory}
    linear = 22 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632)
    others = model_shape(TINYLLAMA_CONFIG).total_params - linear
    assert quant["base weights"] == pytest.approx(linear * (0.5 + 0.127 / 8) + others * 2)
    assert base["LoRA params + grads + AdamW"] == 2_252_800 * 16
    assert quant["LoRA params + grads + 8-bit AdamW"] == 2_252_800 * 10
    assert "4-bit NF4 (QLoRA)" in format_plan(qlora)
    dora = estimate(TINYLLAMA_CONFIG, LoraSection(use_dora=True), TrainConfig(), [256], a100, "bf16",
                    with_suggestions=False)
    assert {m.label: m.bytes for m in dora.memory}["DoRA weight norm"] == 2048 * 2048 * 4  # q_proj, the largest


def test_qlora_off_cuda_is_one_clear_error():
    with pytest.raises(LoralabError, match="train.load_in_4bit \\(QLoRA\\) needs a CUDA GPU and this run is on cpu"):
        check_bitsandbytes(True, "adamw_torch", "cpu")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_bitsandbytes_options_without_the_package_say_what_to_install():
    with pytest.raises(LoralabError, match="needs bitsandbytes: pip install bitsandbytes"):
        check_bitsandbytes(True, "adamw_torch", "cuda")
    with pytest.raises(LoralabError, match="train.optim adamw_bnb_8bit needs bitsandbytes"):
        check_bitsandbytes(False, "adamw_bnb_8bit", "cpu")
