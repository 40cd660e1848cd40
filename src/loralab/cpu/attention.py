"""Causal attention per packed example as batched matmuls on a CPU, where SDPA's flash kernel is slow at head_dim 64.

A packed row's examples are found where ``position_ids`` restart at 0, and each is attended alone (no
tokens x tokens block mask); the speed-up is in docs/benchmarks.md.
"""

from __future__ import annotations

import torch

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
        kv_heads, rows, _ = q.shape
        length = k.shape[1]
        q = q * scale
        scores = torch.bmm(q, k.transpose(1, 2)).view(kv_heads, rows // length, length, length)
        scores.add_(causal_mask(length, scores.dtype, q.device))  # what masked_fill_ gives, faster (docs)
        probs = torch.softmax(scores, dim=-1).view(kv_heads, rows, length)  # fp32 inside, stored in q's dtype
        out = torch.bmm(probs, v)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, probs, out = ctx.saved_tensors  # q already scaled
        dv = torch.bmm(probs.transpose(1, 2), dout)  # sums over the group's heads
        dscores = torch.bmm(dout, v.transpose(1, 2))
        softmax_backward_(dscores, probs)
        dq = torch.bmm(dscores, k).mul_(ctx.scale)
        dk = torch.bmm(dscores.transpose(1, 2), q)
        return dq, dk, dv, None


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
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return sdpa_attention_forward(module, query, key, value, None, position_ids=position_ids, **kwargs)
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    dropout = kwargs.get("dropout", 0.0)
    bounds = starts + [length]
    outputs = [_attend(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scale, dropout)
               for s, e in zip(bounds, bounds[1:], strict=False)]
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
