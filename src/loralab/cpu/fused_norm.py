"""RMSNorm as one autograd function on a CPU: a closed-form backward instead of a dozen autograd passes.

transformers' LlamaRMSNorm is six ops (upcast, square, mean, rsqrt, scale, downcast, weight) whose
backward autograd runs as a dozen more full passes over (tokens x hidden) fp32 tensors, for every norm of every
row (docs/benchmarks.md has the cost). Here the forward does the same arithmetic in
the same order (so the outputs are bit-identical) and keeps only the input and the per-token 1/rms;
the backward is the closed form dx = r * (g - x_hat * mean(g * x_hat)) with g = dy * w, and no weight
gradient (the norms are frozen under LoRA). Both write their results straight into the input's dtype (a product
written into a bf16 ``out`` is computed in fp32 and rounded once, as ``.to`` after it would be), so neither makes a
second fp32 (tokens x hidden) tensor, and neither writes over the input (in fp32 ``x.float()`` is ``x`` itself).
"""

from __future__ import annotations

import torch

from loralab.cpu.forwards import llama_family, swap_forwards


class FrozenRMSNormFunction(torch.autograd.Function):
    """y = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype), computed in fp32; weight frozen."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        y = torch.mul(xf, rstd, out=torch.empty_like(x))  # (xf * rstd).to(x.dtype), in one pass
        return y.mul_(weight)  # weight * y: the same product, rounded the same way

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        g = (dy * weight).float()  # the gradient reaching the normalised input (its cast back is the identity's)
        xf = x.float()  # read only: in fp32 this is x itself
        # with x_hat = x * r: r * (g - x_hat * mean(g * x_hat)) = g * r - x * (r^3 * mean(g * x))
        c = torch.linalg.vecdot(g, xf).unsqueeze_(-1).mul_(rstd.pow(3).div_(x.shape[-1]))  # (..., 1)
        dx = torch.addcmul(g.mul_(rstd), xf, c, value=-1, out=torch.empty_like(x))
        return dx, None, None


def _fused_forward(self, hidden_states):
    if self.weight.requires_grad or not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    return FrozenRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model) -> int:
    """Route the frozen RMSNorms of a Llama-family model (transformers' LlamaRMSNorm and its copies in
    Mistral and Qwen2/3) through FrozenRMSNormFunction; return how many. Other norms keep their forward."""
    base = llama_family(model)
    return 0 if base is None else swap_forwards(base, _fused_forward, lambda m: (
        type(m).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
        and hasattr(m, "variance_epsilon")))
