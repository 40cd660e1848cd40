"""A LoRA linear layer's forward and backward as one autograd function: fewer passes over memory per adapted layer.

PEFT computes ``base(x) + B(A(dropout(x.float()))) * scale`` op by op: with bf16 base weights that is an
fp32 copy of the input, a dropout mask, a masked copy, an fp32 (tokens x out) update and two casts per
adapted layer, each a full pass over memory, which on a CPU cost about as much as the frozen matmul of
a k/v projection itself. Here the adapter runs in the base dtype like autocast would (A and B are cast,
a few KB; they and their gradients stay fp32), dropout zeroes positions drawn sparsely (drop_positions)
and its 1/(1-p) is folded into the scale of the rank-r product, and the update is accumulated into the
base output by the matmul itself.
The parameters, their names and the saved adapter are PEFT's own: only the forward of each
``peft.tuners.lora.Linear`` is swapped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loralab.cpu import onednn_weights
from loralab.cpu.forwards import swap_forwards


def drop_positions(numel: int, p: float, device) -> torch.Tensor:
    """The sorted flat indices of the elements a dropout of rate ``p`` zeroes, out of ``numel``.

    Drawn as the gaps between successive dropped elements, geometric by the inverse CDF of a uniform,
    which is the distribution of one Bernoulli(p) coin per element: about p x numel random numbers
    instead of numel (on a CPU the random-number generator, not the masking, is the cost). A float32 uniform
    caps a gap at log(2^-24) / log(1 - p) (324 at p = 0.05), which a true gap exceeds with probability 2^-24.
    """
    expected = numel * p
    count = int(expected + 8 * math.sqrt(expected) + 16)  # enough gaps to pass the end, all but always
    log_keep = math.log1p(-p)

    def gap_ends() -> torch.Tensor:  # P(gap > g) = (1 - p)^g for g = 0, 1, 2, ...
        u = torch.rand(count, device=device)
        return torch.log1p(u.neg_()).div_(log_keep).floor_().add_(1).to(torch.int64).cumsum_(0)

    ends = gap_ends()
    while int(ends[-1]) <= numel:
        ends = torch.cat([ends, gap_ends().add_(ends[-1])])
    positions = ends.sub_(1)  # the first dropped element is at gap - 1, each next one a gap further on
    return positions[: int(torch.searchsorted(positions, numel))]


def zero_at(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) with the flat ``positions`` set to zero, in place."""
    t.view(-1).index_fill_(0, positions, 0)
    return t


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scale/(1-p) * ((x * keep) A^T) B^T with keep ~ Bernoulli(1-p) per element; W, b frozen.

    Saves x (shared by q/k/v, so stored once) and the positions dropout zeroed, as int32 (about p x 4 bytes per
    input element, where a mask takes 1 and drawing them again in the backward took longer: docs/benchmarks.md).
    The input's gradient takes the rank-r term in the same matmul as the frozen one, then puts the frozen part
    alone back at the dropped positions (the rank-r branch gives them no gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, p: float, onednn=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # (r, in), (out, r)
        kept = None
        if p > 0.0:
            dropped = drop_positions(x2.numel(), p, x.device)
            xd = zero_at(x2.clone(), dropped)
            kept = dropped.to(torch.int32) if x2.numel() <= torch.iinfo(torch.int32).max else dropped
            scale = scale / (1.0 - p)  # dropout's 1/(1-p), applied exactly on the rank-r side
        else:
            xd = x2
        h = xd @ a.t()  # (N, r)
        # (N, out); onednn: the frozen weight in oneDNN's layouts, its plain copy released (loralab.cpu.onednn_weights)
        y = F.linear(x2, weight, bias) if onednn is None else onednn_weights.linear(x2, onednn, bias)
        y.addmm_(h, b.t(), alpha=scale)
        # saved, not a ctx attribute: freed with the rest after the backward, and there again for a retained graph's
        ctx.save_for_backward(x2, weight, h, a, b, *([] if kept is None else [kept]))
        ctx.onednn, ctx.scale = onednn, scale
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, h, a, b, *kept = ctx.saved_tensors
        dropped = kept[0].long() if kept else None  # index ops take int64
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dh = (dy2 @ b).mul_(ctx.scale)  # (N, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight if ctx.onednn is None else onednn_weights.grad_input(dy2, ctx.onednn)  # (N, in)
            frozen = None if dropped is None else dx.view(-1).take(dropped)
            dx.addmm_(dh, a)
            if frozen is not None:
                dx.view(-1).index_put_((dropped,), frozen)
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        da = db = None
        if ctx.needs_input_grad[3]:
            xd = x2 if dropped is None else zero_at(x2.clone(), dropped)
            da = (dh.t() @ xd).to(ctx.lora_dtypes[0])  # (r, in)
        if ctx.needs_input_grad[4]:
            db = (dy2.t() @ h).mul_(ctx.scale).to(ctx.lora_dtypes[1])  # (out, r)
        return dx, None, None, da, db, None, None, None


def _fused_forward(self, x, *args, **kwargs):
    """Forward of a peft LoRA Linear through LoraLinearFunction; PEFT's own forward for anything unusual."""
    adapters = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    if name not in self.lora_A:
        return self.base_layer(x)
    dropout = self.lora_dropout[name]
    p = dropout.p if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    base = self.base_layer
    return LoraLinearFunction.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p,
        onednn_weights.onednn_of(base),
    )


def fuse_lora_layers(model) -> int:
    """Route every plain LoRA Linear of ``model`` (frozen nn.Linear base) through LoraLinearFunction.

    Returns how many layers were switched; layers with DoRA or other variants, or a non-Linear base
    (quantised, say), keep PEFT's forward.
    """
    from peft.tuners.lora import Linear as LoraLinear

    return swap_forwards(model, _fused_forward, lambda m: (
        type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear and not m.base_layer.weight.requires_grad))
