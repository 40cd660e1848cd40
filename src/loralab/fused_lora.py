"""A LoRA linear layer's forward and backward as one autograd function, for training speed.

PEFT computes ``base(x) + B(A(dropout(x.float()))) * scale`` op by op: with bf16 base weights that is an
fp32 copy of the input, a dropout mask, a masked copy, an fp32 (tokens x out) update and two casts per
adapted layer, each a full pass over memory, which on a CPU cost about as much as the frozen matmul of
a k/v projection itself. Here the adapter runs in the base dtype like autocast would (A and B are cast,
a few KB; they and their gradients stay fp32), dropout is a 0/1 mask whose 1/(1-p) is folded into the
scale of the rank-r product, and the update is accumulated into the base output by the matmul itself.
The parameters, their names and the saved adapter are PEFT's own: only the forward of each
``peft.tuners.lora.Linear`` is swapped.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F


_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # the bit pattern of 1.0 in each 16-bit float


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, float]:
    """A dropout keep-mask of 0s and 1s in ``dtype``, and the keep probability it was drawn with.

    For 16-bit floats each element takes 16 random bits, kept when they are at or above round(p * 2^16)
    (so p is honoured to 1/65536), and the 0/1 values are made by integer ops on the bit patterns:
    on a CPU this is ~4x faster than bernoulli_, which costs more than the k/v projections it masks.
    """
    if dtype not in _ONE_BITS:
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p), 1.0 - p
    n = shape.numel()
    limit = torch.iinfo(torch.int64)
    words = torch.randint(limit.min, limit.max, ((n + 3) // 4,), dtype=torch.int64, device=device)
    bits = words.view(torch.int16)[:n]  # uniform over int16
    drop_below = -(2**15) + round(p * 2**16)
    # drop_below - 1 where dropped, drop_below where kept; then 0 / 1, then the bit pattern of 0.0 / 1.0
    mask = bits.clamp_(drop_below - 1, drop_below).sub_(drop_below - 1).mul_(_ONE_BITS[dtype])
    return mask.view(dtype).view(shape), 1.0 - round(p * 2**16) / 2**16


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _rng_restored(device: torch.device, state: torch.Tensor):
    """Run the body from the random-number ``state``, then put the generator back where it was."""
    current = _rng_state(device)
    setter = (lambda s: torch.cuda.set_rng_state(s, device)) if device.type == "cuda" else torch.set_rng_state
    setter(state)
    try:
        yield
    finally:
        setter(current)


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scale/q * ((x * keep) A^T) B^T with keep ~ Bernoulli(q), q = 1 - p; W, b frozen.

    Saves x (shared by q/k/v, so stored once) and the random-number state the dropout mask was drawn
    from, not the mask: the backward draws the same mask again (cheap, see keep_mask), which saves
    in_features x 2 bytes per token per adapted layer, a fifth of a TinyLlama layer's activations.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, p: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # (r, in), (out, r)
        keep = rng_state = None
        if p > 0.0:
            rng_state = _rng_state(x.device)
            keep, q = keep_mask(x2.shape, p, x.dtype, x.device)  # (N, in) of 0/1
            xd = x2 * keep
            scale = scale / q  # dropout's 1/q, applied exactly on the rank-r side
        else:
            xd = x2
        h = xd @ a.t()  # (N, r)
        y = F.linear(x2, weight, bias)  # (N, out)
        y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, h, a, b)
        ctx.rng_state, ctx.p = rng_state, p
        ctx.scale = scale
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, h, a, b = ctx.saved_tensors
        keep = None
        if ctx.rng_state is not None:
            with _rng_restored(x2.device, ctx.rng_state):
                keep, _ = keep_mask(x2.shape, ctx.p, x2.dtype, x2.device)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dh = (dy2 @ b).mul_(ctx.scale)  # (N, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight  # (N, in)
            if keep is None:
                dx.addmm_(dh, a)
            else:
                dx.addcmul_(dh @ a, keep)
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        da = db = None
        if ctx.needs_input_grad[3]:
            xd = x2 if keep is None else x2 * keep
            da = (dh.t() @ xd).to(ctx.lora_dtypes[0])  # (r, in)
        if ctx.needs_input_grad[4]:
            db = (dy2.t() @ h).mul_(ctx.scale).to(ctx.lora_dtypes[1])  # (out, r)
        return dx, None, None, da, db, None, None


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
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p
    )


def fuse_lora_layers(model) -> int:
    """Route every plain LoRA Linear of ``model`` (frozen nn.Linear base) through LoraLinearFunction.

    Returns how many layers were switched; layers with DoRA or other variants, or a non-Linear base
    (quantised, say), keep PEFT's forward.
    """
    from peft.tuners.lora import Linear as LoraLinear

    switched = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear and not module.base_layer.weight.requires_grad:
            module.forward = types.MethodType(_fused_forward, module)
            switched += 1
    return switched
