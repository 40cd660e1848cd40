"""The SwiGLU of a Llama-family MLP, silu(gate) * up, as one autograd function on a CPU: a third less kept.

Autograd keeps gate, silu(gate) and up for the product's backward, three (tokens x intermediate) tensors a layer,
the widest activations of the layer, each a fresh allocation while the forward grows the heap. Here only gate and up
are kept; the backward computes silu(gate) again (one pass) and writes the gradients over its own temporaries. The
values are autograd's, bit for bit, fore and aft: the same ops, rounded at the same places (tests/test_fused.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab.cpu.forwards import llama_family, swap_forwards

_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class SwiGLUFunction(torch.autograd.Function):
    """h = silu(gate) * up, each product rounded to the inputs' dtype as transformers' two ops round it."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        d_up = F.silu(gate).mul_(dh)  # the product's backward: dh * silu(gate)
        d_act = dh * up  # and dh * up, through silu's own backward, written over itself
        d_gate = torch.ops.aten.silu_backward.grad_input(d_act, gate, grad_input=d_act)
        return d_gate, d_up


def _fused_forward(self, x):
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu(model) -> int:
    """Route the SiLU-gated MLPs of a Llama-family model (transformers' LlamaMLP and its copies in Mistral and
    Qwen2/3, with a plain SiLU) through SwiGLUFunction; return how many. Other MLPs keep their forward."""
    base = llama_family(model)
    return 0 if base is None else swap_forwards(base, _fused_forward, lambda m: (
        type(m).__name__ in _MLP_CLASSES and type(m.act_fn).__name__ in ("SiLUActivation", "SiLU")
        and all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj"))))
