"""SmolLM2-135M-Instruct, the real pretrained model `loralab fetch` provides: exact ChatML masking on all
999 shared records, and a short real training run whose adapter reloads through PEFT and still talks."""

import pytest
import torch
from conftest import write_config

from loralab import IGNORE_INDEX
from loralab.data import encode_example, make_template, prompt_ids, validate_record

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


def test_the_tokenizer_is_chatml_with_im_end_as_eos(tokenizer):
    template = make_template(tokenizer)
    assert template.kind == "chat"
    assert tokenizer.eos_token == IM_END
    prompt = template.prompt_text({"instruction": "Hi", "input": "", "output": ""})
    # The template inserts its default system prompt by itself.
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                      "trained by Hugging Face<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_masking_is_exact_on_every_shared_record(tokenizer, alpaca_records):
    """Trained tokens are exactly the response and <|im_end|>; the newline after it and the whole prompt
    (system prompt included) are masked; the generation-time prompt is a token prefix of the example."""
    template = make_template(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    assert len(alpaca_records) == 999
    for i, raw in enumerate(alpaca_records):
        record = validate_record(raw, f"record {i}")
        enc = encode_example(tokenizer, template, record, max_length=4096)
        assert not enc.truncated
        trained = [j for j, label in enumerate(enc.labels) if label != IGNORE_INDEX]
        first, last = trained[0], trained[-1]
        assert trained == list(range(first, last + 1)), f"record {i}: trained tokens are not one run"
        assert [enc.labels[j] for j in trained] == enc.input_ids[first:last + 1]
        assert tokenizer.decode(enc.input_ids[first:last + 1]) == record["output"] + IM_END, f"record {i}"
        assert enc.input_ids[last] == eos_id
        assert tokenizer.decode(enc.input_ids[last + 1:]) == "\n"
        assert enc.input_ids[:first] == prompt_ids(tokenizer, template, record), f"record {i}"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, real_model_dir, alpaca_path):
    """Three optimizer steps of the reference recipe on the real model, through loralab prepare and train."""
    from loralab.config import load_config
    from loralab.stages import prepare, train

    tmp = tmp_path_factory.mktemp("real")
    cfg = load_config(write_config(
        tmp / "exp.yaml", model={"name_or_path": str(real_model_dir)},
        data={"path": str(alpaca_path), "num_examples": 12, "eval_size": 2, "max_length": 96},
        train={"max_steps": 3, "learning_rate": 1e-3, "warmup_steps": 0, "gradient_accumulation_steps": 2},
    ))
    prepare.run(cfg)
    train.run(cfg)
    return cfg


def test_adapter_reloads_with_peft_changes_logits_and_still_answers(trained_run, real_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained_run.run_dir / "adapter"
    base = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        lora_logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert (lora_logits - base_logits).abs().max().item() > 1e-3  # B left its zero init: the adapter acts
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer  # a few steps on Alpaca keep the pretrained model's knowledge and fluency
