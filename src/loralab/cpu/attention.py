"""Causal attention per packed example as batched matmuls on a CPU, where SDPA's flash kernel is slow at head_dim 64.

A packed row's examples are found where ``position_ids`` restart at 0, and each is attended alone (no
tokens x tokens block mask); the speed-up is in docs/benchmarks.md.
"""

from __future__ import annotations

import math

import torch

from loralab.cpu.forwards import swap_forwards

PER_EXAMPLE_ATTENTION = "loralab_per_example"
# longer examples use SDPA's flash kernel: the probabilities would take 32 x L^2 x 2 bytes a layer
MATERIALISED_MAX_TOKENS = 1024


class CausalAttention(torch.autograd.Function):
    """Causal softmax attention of one example with grouped-query heads, as three batched matmuls each way.

    On CPUs SDPA's flash kernel runs at a tenth of the matmul peak for head_dim 64: this materialised form
    (the query heads of a group stacked as rows, so K and V are never repeated) is faster fore and aft
    at Alpaca lengths (docs/benchmarks.md), at the cost of keeping the (heads x L x L) probabilities for the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        # q: (kv_heads, group * L, head_dim), row g * L + i = query head g of the group at position i
        # k, v: (kv_heads, L, head_dim)
        q = q * scale
        probs, out = attend(q, k, v)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        return (*attend_backward(*ctx.saved_tensors, dout, ctx.scale), None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CausalAttention's forward on a q already scaled: (probabilities, output), both (kv_heads, group * L, ...)."""
    kv_heads, rows, _ = q.shape
    length = k.shape[1]
    scores = torch.bmm(q, k.transpose(1, 2)).view(kv_heads, rows // length, length, length)
    scores.add_(causal_mask(length, scores.dtype, q.device))  # what masked_fill_ gives, faster (docs)
    # fp32 inside, stored in q's dtype, over the scores (row by row, each read before it is written: the values
    # torch.softmax gives, without a second fresh (heads x L x L) buffer)
    probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores).view(kv_heads, rows, length)
    return probs, torch.bmm(probs, v)


def attend_backward(q, k, v, probs, dout, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attend for the unscaled q, given the scaled q it ran on and its probabilities."""
    dv = torch.bmm(probs.transpose(1, 2), dout)  # sums over the group's heads
    dscores = torch.bmm(dout, v.transpose(1, 2))
    softmax_backward_(dscores, probs)
    dq = torch.bmm(dscores, k)
    if scale != 1.0:
        dq.mul_(scale)
    dk = torch.bmm(dscores.transpose(1, 2), q)
    return dq, dk, dv


def softmax_backward_(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The softmax's backward over the last dimension, (grad - sum(grad * probs)) * probs, written over ``grad``:
    one pass of PyTorch's own kernel (each row's sum is taken before the row is written), instead of three."""
    return torch.ops.aten._softmax_backward_data.out(grad, probs, -1, probs.dtype, grad_input=grad)


_CAUSAL_MASKS: dict[tuple, torch.Tensor] = {}


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(length, length), -inf above the diagonal and 0 elsewhere, to add to attention scores: a contiguous copy of
    the corner of one mask kept per dtype and device."""
    mask = _CAUSAL_MASKS.get((dtype, device))
    if mask is None or mask.shape[0] < length:
        size = max(length, MATERIALISED_MAX_TOKENS)
        with torch.inference_mode(False):  # one first made under inference_mode must still serve training
            above = torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)
            mask = torch.zeros(size, size, dtype=dtype, device=device).masked_fill_(above, float("-inf"))
        _CAUSAL_MASKS[(dtype, device)] = mask
    return mask[:length, :length].contiguous()


def _attend(query, key, value, scale: float, dropout: float):
    """One example: query (1, heads, L, d), key/value (1, kv_heads, L, d) -> (1, heads, L, d)."""
    _, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length > MATERIALISED_MAX_TOKENS or dropout > 0.0 or heads % kv_heads:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=heads != kv_heads
        )
    grouped = query[0].reshape(kv_heads, heads // kv_heads * length, dim)
    return CausalAttention.apply(grouped, key[0], value[0], scale).view(1, heads, length, dim)


def per_example_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers attention function for packed rows on CPU: causal attention run on each example.

    A packed row's examples are found where ``position_ids`` restart at 0; each costs what it would cost
    alone (transformers' "sdpa" would build a tokens x tokens block-diagonal mask instead). Anything else
    (a padding mask, a KV cache, several rows) goes to transformers' sdpa_attention_forward unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]  # query: (1, heads, tokens, head_dim)
    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    bounds = example_bounds(position_ids, length)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, None, position_ids=position_ids, **kwargs)
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    dropout = kwargs.get("dropout", 0.0)
    outputs = [_attend(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scale, dropout) for s, e in bounds]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None  # (1, tokens, heads, head_dim)


def _no_mask_when_unpadded(*args, attention_mask=None, q_length=None, kv_length=None, **kwargs):
    """Build no mask for a row without padding (per_example_attention reads position_ids); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not kwargs.get("q_offset") and not kwargs.get("kv_offset"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def use_per_example_attention(model) -> bool:
    """Switch a transformers model from "sdpa" to per_example_attention; False (unchanged) for other backends.
    undo_per_example_attention switches it back."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PER_EXAMPLE_ATTENTION, per_example_attention)
    AttentionMaskInterface.register(PER_EXAMPLE_ATTENTION, _no_mask_when_unpadded)
    model.set_attn_implementation(PER_EXAMPLE_ATTENTION)
    return True


def undo_per_example_attention(model) -> None:
    """Put a model switched by use_per_example_attention back on "sdpa"."""
    if getattr(model.config, "_attn_implementation", None) == PER_EXAMPLE_ATTENTION:
        model.set_attn_implementation("sdpa")


# Llama's attention as one autograd node per packed row ------------------------------------------------------------


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one of q, k: x * cos + rotate_half(x) * sin, rounded as it rounds
    (each product, then their sum), written half by half instead of through a negated, concatenated copy.
    x: (tokens, heads, head_dim); cos, sin: (tokens, 1, head_dim)."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=o1).sub_(x2 * sin[..., :half])
    torch.mul(x2, cos[..., half:], out=o2).add_(x1 * sin[..., half:])
    return out


def rotate_backward_(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of rotate's input, from its output's ``grad`` (overwritten): the products autograd would make
    through transformers' ops, added in the same roundings."""
    half = grad.shape[-1] // 2
    g1, g2 = grad[..., :half], grad[..., half:]
    d1 = (g1 * cos[..., :half]).add_(g2 * sin[..., half:])
    g2.mul_(cos[..., half:]).sub_(g1 * sin[..., :half])
    g1.copy_(d1)
    return grad


class RowAttention(torch.autograd.Function):
    """RoPE on q and k, then causal attention of each example of a packed row (CausalAttention's arithmetic): the
    projections' outputs in, o_proj's input out, one autograd node a layer.

    transformers' route to the same values (apply_rotary_pos_emb, a slice of q, k and v per example, a concatenation
    and a transposed copy of the outputs) costs a dozen passes over q and k more and, in the backward, a zeroed
    full-size gradient for every example's slice; the values here are the same, bit for bit, fore and aft
    (tests/test_fused.py)."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, bounds: tuple, head_dim: int, scale: float):
        # q: (1, T, heads * d); k, v: (1, T, kv_heads * d); cos, sin: (1, T, d); bounds: the examples' (start, end)
        tokens = q.shape[1]
        cos, sin = cos.reshape(tokens, 1, head_dim), sin.reshape(tokens, 1, head_dim)
        q_cos, q_sin, q_scale = _scaled(cos, sin, scale)
        qr = rotate(q.view(tokens, -1, head_dim), q_cos, q_sin)  # (T, heads, d), scaled here or below
        kr = rotate(k.view(tokens, -1, head_dim), cos, sin)  # (T, kv_heads, d)
        vr = v.view(tokens, -1, head_dim)
        heads, kv_heads = qr.shape[1], kr.shape[1]
        out = torch.empty_like(qr)
        saved = []
        for start, end in bounds:
            # the query heads of a group stacked as rows, as CausalAttention takes them; K and V as strided views
            grouped = qr[start:end].transpose(0, 1).reshape(kv_heads, -1, head_dim)
            if q_scale != 1.0:
                grouped = grouped.mul_(q_scale)
            probs, o = attend(grouped, kr[start:end].transpose(0, 1), vr[start:end].transpose(0, 1))
            out[start:end] = o.view(heads, end - start, head_dim).transpose(0, 1)
            saved += [grouped, probs]
        ctx.save_for_backward(kr, v, cos, sin, *saved)
        ctx.bounds, ctx.head_dim, ctx.scale = bounds, head_dim, scale
        return out.view(1, tokens, -1)

    @staticmethod
    def backward(ctx, dout):
        kr, v, cos, sin, *saved = ctx.saved_tensors
        q_cos, q_sin, q_scale = _scaled(cos, sin, ctx.scale)
        tokens, kv_heads, head_dim = kr.shape
        vr = v.view(tokens, kv_heads, head_dim)
        dout = dout.view(tokens, -1, head_dim)
        heads = dout.shape[1]
        dq, dk, dv = torch.empty_like(dout), torch.empty_like(kr), torch.empty_like(kr)
        for i, (start, end) in enumerate(ctx.bounds):
            k_ex, v_ex = kr[start:end].transpose(0, 1), vr[start:end].transpose(0, 1)
            d_grouped = dout[start:end].transpose(0, 1).reshape(kv_heads, -1, head_dim)
            dq_ex, dk_ex, dv_ex = attend_backward(saved[2 * i], k_ex, v_ex, saved[2 * i + 1], d_grouped, q_scale)
            dq[start:end] = dq_ex.view(heads, end - start, head_dim).transpose(0, 1)
            dk[start:end] = dk_ex.transpose(0, 1)
            dv[start:end] = dv_ex.transpose(0, 1)
        dq, dk = rotate_backward_(dq, q_cos, q_sin), rotate_backward_(dk, cos, sin)
        return dq.view(1, tokens, -1), dk.view(1, tokens, -1), dv.view(1, tokens, -1), None, None, None, None, None


def _scaled(cos: torch.Tensor, sin: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(cos, sin, scale left to apply) for q: a power-of-two scale goes into cos and sin, where it changes no
    rounding (x * (c * 2^k) rounds as (x * c) * 2^k), saving a pass over q each way; any other stays separate."""
    if math.frexp(scale)[0] == 0.5:
        return cos * scale, sin * scale, 1.0
    return cos, sin, scale


def example_bounds(position_ids: torch.Tensor | None, tokens: int) -> tuple | None:
    """The (start, end) of each example of one packed row, where ``position_ids`` (1, tokens) restart at 0; None
    when there is no such row (several rows, no position ids, or a row not starting at 0)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != (1, tokens):
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    return tuple(zip(starts, starts[1:] + [tokens], strict=True))


def _row_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                           **kwargs):
    """LlamaAttention's forward through RowAttention for a packed row without padding or cache; the class's own
    forward (per_example_attention or SDPA) for anything else."""
    tokens = hidden_states.shape[1] if hidden_states.dim() == 3 else -1
    bounds = example_bounds(kwargs.get("position_ids"), tokens)
    heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
    if (bounds is None or attention_mask is not None or cache is not None or position_embeddings is None
            or kwargs.get("past_key_values") is not None or (self.training and self.attention_dropout > 0)
            or heads % kv_heads or max(e - s for s, e in bounds) > MATERIALISED_MAX_TOKENS):
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    cos, sin = position_embeddings
    out = RowAttention.apply(self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                             cos, sin, bounds, self.head_dim, self.scaling)
    return self.o_proj(out), None


def fuse_row_attention(model) -> int:
    """Route each of ``model``'s transformers LlamaAttention modules (Llama, SmolLM2, TinyLlama) through
    RowAttention on packed rows; return how many. Other attention classes (Mistral's sliding window, Qwen's norms
    on q and k) keep their forward. Put back by speed_path.own_forwards_back."""
    return swap_forwards(model, _row_attention_forward, lambda m: (
        type(m).__name__ == "LlamaAttention" and type(m).__module__.startswith("transformers.")))
