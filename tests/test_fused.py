"""The training speed paths are exact: fused LoRA layers and per-example attention give PEFT's and SDPA's
losses and gradients, and a packed row through them equals its examples run one by one."""

import pytest
import torch

from loralab.config import LoraSection, ModelConfig
from loralab.cpu.attention import per_example_attention, softmax_backward_, use_per_example_attention
from loralab.cpu.fused_lora import LoraLinearFunction, drop_positions, fuse_lora_layers
from loralab.cpu.speed_path import speed_path
from loralab.loss import response_loss_sum
from loralab.models.loading import add_lora, load_model
from loralab.packing import pack_examples


def _lora_model(model_dir, dropout=0.0, precision="fp32"):
    torch.manual_seed(0)
    model = add_lora(load_model(ModelConfig(name_or_path=str(model_dir)), precision, "cpu"),
                     LoraSection(lora_dropout=dropout))
    with torch.no_grad():  # LoRA B starts at zero, which would hide a wrong gradient through A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _examples(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def _loss_and_grads(model, batch):
    model.zero_grad()
    s, n = response_loss_sum(model, batch)
    s.backward()
    return s.item(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_equals_peft_forward_and_backward(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    model.train()
    batch = pack_examples(_examples(model.config.vocab_size, [17, 30, 9]))
    peft_loss, n, peft_grads = _loss_and_grads(model, batch)
    switched = fuse_lora_layers(model)
    assert switched == 4 * model.config.num_hidden_layers  # q, k, v, o in every layer
    fused_loss, n2, fused_grads = _loss_and_grads(model, batch)
    assert n == n2
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == peft_grads.keys()
    for name in peft_grads:
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_lora_dropout_forward_and_backward_use_one_mask(dtype, tol):
    """The backward uses the positions the forward dropped: gradients equal the textbook formula with that one
    mask, and the generator ends where a single draw leaves it."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 32).to(dtype).requires_grad_()
    weight = torch.randn(16, 32).to(dtype)
    a = torch.randn(8, 32, requires_grad=True)
    b = torch.randn(16, 8, requires_grad=True)
    grad_out = torch.randn(4, 6, 16).to(dtype)
    torch.manual_seed(1)
    y = LoraLinearFunction.apply(x, weight, None, a, b, 2.0, 0.5)
    after_forward = torch.get_rng_state()
    y.backward(grad_out)
    assert torch.equal(torch.get_rng_state(), after_forward)  # the backward drew nothing

    torch.manual_seed(1)
    keep = torch.ones(24 * 32)
    keep[drop_positions(24 * 32, 0.5, "cpu")] = 0
    keep, q = keep.view(24, 32), 0.5
    assert 0.3 < keep.mean() < 0.7
    xr, ar, br = (x.detach().float().requires_grad_(), a.detach().clone().requires_grad_(),
                  b.detach().clone().requires_grad_())
    x2 = xr.reshape(24, 32)
    ref = x2 @ weight.float().t() + ((x2 * keep) @ ar.t()) @ br.t() * (2.0 / q)
    ref.backward(grad_out.float().reshape(24, 16))
    assert a.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == dtype
    # relative error of the whole tensor: bf16 rounding moves single elements, a different mask moves all
    for got, want in [(y.reshape(24, 16), ref), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)]:
        assert (got.detach().float() - want.detach()).norm() / want.norm() < tol


def test_fused_lora_dropout_backward_twice_on_a_retained_graph_gives_the_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(16, 32).to(torch.bfloat16)
    a, b = torch.randn(8, 32, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    grad_out = torch.randn(3, 5, 16).to(torch.bfloat16)
    y = LoraLinearFunction.apply(x, weight, None, a, b, 2.0, 0.3)
    first = torch.autograd.grad(y, (x, a, b), grad_out, retain_graph=True)
    second = torch.autograd.grad(y, (x, a, b), grad_out)
    for one, two in zip(first, second, strict=True):
        assert torch.equal(one, two)  # the same dropped positions both times


def test_drop_positions_are_independent_coins_of_rate_p():
    torch.manual_seed(0)
    n, p = 200_000, 0.05
    pos = drop_positions(n, p, "cpu")
    assert pos.dtype == torch.int64 and 0 <= int(pos[0]) and int(pos[-1]) < n
    assert bool((pos[1:] > pos[:-1]).all())  # sorted, no position twice
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[pos] = True
    assert abs(dropped.float().mean().item() - p) < 0.003  # 6 standard deviations
    both = (dropped[1:] & dropped[:-1]).float().mean().item()  # neighbours independent: p^2
    assert abs(both - p * p) < 0.001
    # every position, the first and the last included, is dropped at rate p (an off-by-one would show here)
    counts = torch.zeros(40)
    for _ in range(3000):
        counts[drop_positions(40, 0.3, "cpu")] += 1
    rate = counts / 3000
    assert (rate - 0.3).abs().max() < 0.04  # ~5 standard deviations per position
    assert drop_positions(1000, 0.999, "cpu").numel() > 990  # a dense draw still ends inside the range


def test_the_in_place_softmax_backward_equals_pytorchs_own():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        probs = torch.softmax(torch.randn(3, 45, 37), -1).to(dtype)
        grad = torch.randn(3, 45, 37, dtype=dtype)
        want = torch._softmax_backward_data(grad, probs, -1, dtype)
        assert torch.equal(softmax_backward_(grad.clone(), probs), want)


def test_per_example_attention_equals_sdpa_with_a_block_mask():
    torch.manual_seed(0)
    heads, kv_heads, dim, lengths = 4, 2, 16, [5, 12, 7]
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    out, _ = per_example_attention(None, q, k, v, None, position_ids=position_ids, scaling=dim**-0.5)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1), attn_mask=allowed
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want, strict=False):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_training_model_packed_equals_one_by_one(tiny_model_dir):
    """The model `loralab train` builds on a CPU (fused LoRA, per-example attention): packing changes nothing."""
    model = _lora_model(tiny_model_dir)
    with speed_path(model, row_tokens=1024) as switched:
        assert switched.per_example_attention and switched.fused_lora_layers == 4 * model.config.num_hidden_layers
        model.train()
        examples = _examples(model.config.vocab_size, [17, 5, 30, 11])
        total, count, summed = 0.0, 0, None
        for ex in examples:
            s, n, g = _loss_and_grads(model, pack_examples([ex]))
            total, count = total + s, count + n
            summed = g if summed is None else {k: summed[k] + g[k] for k in g}
        s, n, packed = _loss_and_grads(model, pack_examples(examples))
    assert n == count
    torch.testing.assert_close(s, total, rtol=1e-5, atol=1e-5)
    for name in packed:
        torch.testing.assert_close(packed[name], summed[name], rtol=1e-4, atol=1e-6)


def test_generation_with_padding_still_works_after_switching_attention(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "fp32", "cpu").eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    before = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert use_per_example_attention(model)
    after = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(before, after)


def test_fused_rms_norms_give_the_same_loss_and_grads(tiny_model_dir):
    from loralab.cpu.fused_norm import FrozenRMSNormFunction, fuse_rms_norms

    model = _lora_model(tiny_model_dir)
    model.train()
    batch = pack_examples(_examples(model.config.vocab_size, [17, 30, 9]))
    plain_loss, n, plain_grads = _loss_and_grads(model, batch)
    assert fuse_rms_norms(model) == 2 * model.config.num_hidden_layers + 1  # two a layer, and the final norm
    fused_loss, _, fused_grads = _loss_and_grads(model, batch)
    assert fused_loss == plain_loss  # the forward is the same arithmetic in the same order
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)
    # bf16, against transformers' own norm: bit-identical forward, backward to bf16 rounding
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16).requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(3, 10, 64).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(3, 10, 64).to(torch.bfloat16)
    want = norm(x)
    (dx_want,) = torch.autograd.grad(want, x, grad)
    got = FrozenRMSNormFunction.apply(x, norm.weight, 1e-5)
    (dx_got,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got, want)
    assert (dx_got.float() - dx_want.float()).norm() / dx_want.float().norm() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_rms_norm_leaves_its_input_alone(dtype):
    # in fp32 x.float() is x itself: a backward that scaled it in place once wrote over the layer's input
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from loralab.cpu.fused_norm import FrozenRMSNormFunction

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-6).to(dtype).requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(2, 7, 48).to(dtype).requires_grad_()
    grad = torch.randn(2, 7, 48).to(dtype)
    before = x.detach().clone()
    got = FrozenRMSNormFunction.apply(x, norm.weight, 1e-6)
    (dx_got,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(x.detach(), before)
    assert dx_got.dtype == dtype
    (dx_want,) = torch.autograd.grad(norm(x), x, grad)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (dx_got.float() - dx_want.float()).norm() / dx_want.float().norm() < tolerance


def test_the_speed_path_is_undone_on_the_way_out(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    batch = pack_examples(_examples(model.config.vocab_size, [17, 30]))
    before, _, _ = _loss_and_grads(model, batch)
    with pytest.raises(RuntimeError, match="boom"):
        with speed_path(model, row_tokens=1024) as switched:
            assert switched.fused_rms_norms == 2 * model.config.num_hidden_layers + 1
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())  # every module's own forward again
    assert model.config._attn_implementation == "sdpa"
    after, _, _ = _loss_and_grads(model, batch)
    assert after == before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_row_attention_gives_per_example_attentions_values_bit_for_bit(tiny_model_dir, precision):
    """RoPE and per-example attention as one node a packed row (RowAttention): the same loss and LoRA gradients
    as transformers' RoPE with per_example_attention, bit for bit, and back on the class's forward after."""
    from loralab.cpu.attention import RowAttention, _row_attention_forward, fuse_row_attention
    from loralab.cpu.speed_path import own_forwards_back

    model = _lora_model(tiny_model_dir, precision=precision)
    model.train()
    assert use_per_example_attention(model.get_base_model())
    batch = pack_examples(_examples(model.config.vocab_size, [17, 30, 4, 9]))
    want_loss, n, want = _loss_and_grads(model, batch)
    calls = []
    original = RowAttention.forward
    RowAttention.forward = staticmethod(lambda ctx, *a: calls.append(a[5]) or original(ctx, *a))
    try:
        assert fuse_row_attention(model) == model.config.num_hidden_layers
        got_loss, n2, got = _loss_and_grads(model, batch)
    finally:
        RowAttention.forward = staticmethod(original)
        own_forwards_back(model, _row_attention_forward)
    assert calls == [((0, 17), (17, 47), (47, 51), (51, 60))] * model.config.num_hidden_layers
    assert (n2, got_loss) == (n, want_loss)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m).__name__ == "LlamaAttention")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_swiglu_gives_autograds_values_bit_for_bit_and_keeps_two_tensors(tiny_model_dir, precision):
    from loralab.cpu import fused_mlp
    from loralab.cpu.speed_path import own_forwards_back

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    gate, up = (torch.randn(2, 9, 40).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(2, 9, 40).to(dtype)
    want = torch.nn.functional.silu(gate) * up
    got = fused_mlp.SwiGLUFunction.apply(gate, up)
    assert torch.equal(got, want)
    assert [t.data_ptr() for t in got.grad_fn.saved_tensors] == [gate.data_ptr(), up.data_ptr()]
    wants = torch.autograd.grad(want, (gate, up), grad)
    gots = torch.autograd.grad(got, (gate, up), grad, retain_graph=True)
    assert all(torch.equal(g, w) for g, w in zip(gots, wants, strict=True))
    again = torch.autograd.grad(got, (gate, up), grad)  # the saved tensors are left as they were
    assert all(torch.equal(g, w) for g, w in zip(again, wants, strict=True))

    model = _lora_model(tiny_model_dir, precision=precision)
    model.train()
    batch = pack_examples(_examples(model.config.vocab_size, [17, 30, 9]))
    want_loss, n, want_grads = _loss_and_grads(model, batch)
    try:
        assert fused_mlp.fuse_swiglu(model) == model.config.num_hidden_layers
        got_loss, _, got_grads = _loss_and_grads(model, batch)
    finally:
        own_forwards_back(model, fused_mlp._fused_forward)
    assert got_loss == want_loss
    assert all(torch.equal(got_grads[k], want_grads[k]) for k in want_grads)
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m).__name__ == "LlamaMLP")


@pytest.mark.parametrize("head_dim", [32, 64])  # a scale of 32^-0.5 stays a pass of its own; 64^-0.5 goes into cos
def test_row_attention_equals_transformers_rope_then_per_example_attention(head_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from loralab.cpu.attention import RowAttention

    torch.manual_seed(0)
    tokens, heads, kv_heads, bounds = 23, 6, 2, ((0, 9), (9, 10), (10, 23))
    q = torch.randn(1, tokens, heads * head_dim).bfloat16().requires_grad_()
    k, v = (torch.randn(1, tokens, kv_heads * head_dim).bfloat16().requires_grad_() for _ in range(2))
    angles = torch.cat([torch.arange(e - s) for s, e in bounds])[:, None] * torch.rand(head_dim // 2)
    cos, sin = (f(torch.cat([angles, angles], -1))[None].bfloat16() for f in (torch.cos, torch.sin))
    position_ids = torch.cat([torch.arange(e - s) for s, e in bounds])[None]
    grad = torch.randn(1, tokens, heads * head_dim).bfloat16()

    def view(t):
        return t.view(1, tokens, -1, head_dim).transpose(1, 2)

    qe, ke = apply_rotary_pos_emb(view(q), view(k), cos, sin)
    module = type("Attn", (), {"training": True})()
    want, _ = per_example_attention(module, qe, ke, view(v), None, position_ids=position_ids,
                                    scaling=head_dim**-0.5)
    want = want.reshape(1, tokens, -1)
    wants = torch.autograd.grad(want, (q, k, v), grad)
    got = RowAttention.apply(q, k, v, cos, sin, bounds, head_dim, head_dim**-0.5)
    gots = torch.autograd.grad(got, (q, k, v), grad)
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(gots, wants, strict=True))
