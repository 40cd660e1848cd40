"""Frozen weights in oneDNN's layout (loralab.cpu.onednn_weights) compute the same products, train the same LoRA
weights, and always give the plain weights back.

bf16 (needs native bf16 matmuls): the same products bit for bit, oneDNN runs them both ways. fp32 (every CPU): MKL
runs the plain products and oneDNN the prepacked ones, so they agree within fp32 rounding; the weights come back
bit for bit in both."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_fused import _lora_model

from loralab.cpu import onednn_weights as ow
from loralab.cpu.speed_path import speed_path as cpu_speed_path
from loralab.devices import cpu_has_native_bf16
from loralab.loss import response_loss_sum
from loralab.packing import pack_examples

pytestmark = pytest.mark.skipif(not ow.onednn_weights_available(torch.float32),
                                reason="this PyTorch has no oneDNN linear ops")
BF16 = pytest.param("bf16", marks=pytest.mark.skipif(not cpu_has_native_bf16(),
                                                     reason="needs native bf16 matmuls on this CPU"))
PRECISIONS = [BF16, "fp32"]


def _same(a: torch.Tensor, b: torch.Tensor, precision: str) -> None:
    """Bit for bit in bf16 (oneDNN both ways); within fp32 rounding in fp32 (MKL's plain products vs oneDNN's sum
    in another order): 1e-4 relative, or 1e-3 of the tensor's largest value for the elements that nearly cancel."""
    if precision == "bf16":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_onednn_products_equal_the_plain_ones(rows, precision):
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    weight = torch.randn(96, 80).to(dtype)
    bias = torch.randn(96).to(dtype)
    onednn = ow.to_onednn(weight, rows_hint=64)  # a hint unlike the rows: any count still works
    x, dy = torch.randn(rows, 80).to(dtype), torch.randn(rows, 96).to(dtype)
    _same(ow.linear(x, onednn, bias), F.linear(x, weight, bias), precision)
    _same(ow.grad_input(dy, onednn), dy @ weight, precision)
    assert torch.equal(ow.to_plain(onednn), weight)


def _model(model_dir, dropout, precision="bf16"):
    return _lora_model(model_dir, dropout=dropout, precision=precision)


def _loss_and_grads(model, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout draws each time
    s, _ = response_loss_sum(model, batch)
    s.backward()
    return s.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fast_path", [True, False])
def test_a_model_in_onednn_layout_gives_the_same_loss_and_grads_and_its_weights_back(
        tiny_model_dir, fast_path, precision):
    model = _model(tiny_model_dir, dropout=0.1, precision=precision)
    speed_path = contextlib.ExitStack()
    if fast_path:
        speed_path.enter_context(cpu_speed_path(model, row_tokens=128))
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (40, 25, 61):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    batch = pack_examples(examples)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain_loss, plain_grads = _loss_and_grads(model, batch)

    modules = ow.convertible_linears(model)
    # every frozen linear: 7 a layer (4 as LoRA base layers) and the untied head
    assert len(modules) == 7 * model.config.num_hidden_layers + 1
    with ow.onednn_weights(model, rows_hint=128) as count:
        assert count == len(modules) and all(m.weight.numel() == 0 for m in modules)  # plain copies released
        onednn_loss, onednn_grads = _loss_and_grads(model, batch)
    speed_path.close()
    _same(onednn_loss, plain_loss, precision)
    for name, grad in plain_grads.items():
        _same(onednn_grads[name], grad, precision)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit-identical weights back
    assert all("forward" not in m.__dict__ for m in modules)  # their own forward again
    assert not any(hasattr(m, ow.ATTRIBUTE) for m in modules)


def test_the_plain_weights_come_back_when_the_body_fails(tiny_model_dir):
    model = _model(tiny_model_dir, dropout=0.0, precision="fp32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with ow.onednn_weights(model, rows_hint=64):
            raise RuntimeError("boom")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _tied_lora_model(precision):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to({"bf16": torch.bfloat16, "fp32": torch.float32}[precision])
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_head_tied_to_the_embeddings_is_converted_and_its_plain_weight_kept(precision, monkeypatch):
    """The tied head takes oneDNN's layout like any frozen linear, the head loss computes with it, and its plain
    weight (the embeddings') stays in place throughout: the same loss and gradients, the same weights after."""
    model = _tied_lora_model(precision)
    base = model.get_base_model()
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert base.lm_head in ow.convertible_linears(model) and len(ow.convertible_linears(model)) == 2 * 7 + 1
    model.train()
    g = torch.Generator().manual_seed(2)
    examples = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
                for ids in (torch.randint(3, 96, (n,), generator=g).tolist() for n in (30, 17))]
    batch = pack_examples(examples)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    widths = []
    linear = ow.linear
    monkeypatch.setattr(ow, "linear", lambda x2, onednn, bias=None: widths.append(onednn.out_features)
                        or linear(x2, onednn, bias))
    with ow.onednn_weights(model, rows_hint=64) as count:
        assert count == 2 * 7 + 1 and ow.onednn_of(base.lm_head) is not None
        assert torch.equal(base.model.embed_tokens.weight, before["base_model.model.model.embed_tokens.weight"])
        onednn_loss, onednn_grads = _loss_and_grads(model, batch)
    assert 96 in widths  # the head's products ran on its oneDNN copy
    _same(onednn_loss, plain_loss, precision)
    for name, grad in plain_grads.items():
        _same(onednn_grads[name], grad, precision)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert ow.onednn_of(base.lm_head) is None and "forward" not in base.lm_head.__dict__


def test_fp16_weights_take_no_onednn_layout():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=True)
    fp32 = LlamaForCausalLM(config).requires_grad_(False)
    assert len(ow.convertible_linears(fp32)) == 8
    assert ow.convertible_linears(fp32.to(torch.float16)) == []  # no oneDNN layout for fp16 weights


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_with_onednn_weights_trains_the_same_adapter(tmp_path, tiny_model_dir, alpaca_path, capsys, precision):
    """loralab train's trainer with train.onednn_weights on and off: the same losses and LoRA weights (fp32: within
    rounding), and the base weights back in place after training."""
    from loralab.config import config_from_dict
    from loralab.files import read_jsonl
    from loralab.runs.layout import RunDir
    from loralab.stages import prepare, train

    def trained(onednn):
        cfg = config_from_dict({
            "name": "onednn", "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"path": str(alpaca_path), "num_examples": 24, "eval_size": 0, "max_length": 128},
            "train": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                      "warmup_steps": 0, "logging_steps": 1, "save_steps": 1, "device": "cpu", "precision": precision,
                      "onednn_weights": onednn},
        })
        prepare.run(cfg)
        examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(RunDir(cfg).train_file)]
        switches = train.decide(cfg, examples)
        assert switches.onednn_weights is (onednn is not False)  # "auto": this run is small enough
        model = train.build_model(cfg, switches._replace(onednn_weights=False))
        base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
        trainer = train.build_trainer(cfg, model, examples, tmp_path / f"ckpt-{onednn}", [], switches)
        trainer.train()
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in base.items())
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, losses

    plain, plain_losses = trained(False)
    onednn, onednn_losses = trained("auto")
    assert "frozen weights put in oneDNN's layout" in capsys.readouterr().out
    assert len(plain_losses) == 2
    _same(torch.tensor(onednn_losses), torch.tensor(plain_losses), precision)
    for name, w in plain.items():
        _same(onednn[name], w, precision)
    # saved mid-run while in oneDNN's layout
    assert (tmp_path / "ckpt-auto" / "checkpoint-2" / "adapter_model.safetensors").exists()
