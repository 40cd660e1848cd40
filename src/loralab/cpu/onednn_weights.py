"""Frozen linear weights kept in oneDNN's blocked layout for a CPU training run (bf16 or fp32): fewer reorders.

On a CPU every bf16 matmul goes through oneDNN, which reorders its weight operand into a blocked (VNNI)
layout on every call (fp32 matmuls go through MKL, which re-packs its operands at every call likewise): for a
frozen base model that is the same work, over the whole model, in every forward and every backward. Here each
frozen linear weight is reordered once, both ways (x W^T in the forward and dy W in the backward need different
layouts), and its plain copy is released for the run: +1x the linear weights in memory for more tokens per second
(+2x for a head tied to the input embeddings, whose plain weight the embeddings still read; docs/benchmarks.md has
the figures; bench/train_throughput.py runs the same training with and without). When the run ends the plain
weights are rebuilt from the reordered copies, bit-identical. In bf16 the products are the same oneDNN kernels'
(bitwise equal outputs in tests/test_onednn_weights.py); in fp32 they are oneDNN's instead of MKL's, equal within
fp32 rounding (the same tests).

Intel's extension for PyTorch did this (ipex.optimize's weight prepacking) and is retired; PyTorch keeps
the oneDNN ops it upstreamed for its own CPU inference path (torch.ops.mkldnn._reorder_linear_weight and
_linear_pointwise, used by inductor's freezing pass), and those are what is used here.
"""

from __future__ import annotations

import contextlib
import types
from typing import NamedTuple

import torch

ATTRIBUTE = "_loralab_onednn"  # the OnednnLinear of a module whose plain weight is released


class OnednnLinear(NamedTuple):
    forward: torch.Tensor  # W (out, in) as oneDNN's weight of x @ W^T
    backward: torch.Tensor | None  # W^T (in, out) as the weight of dy @ W; None for inference
    out_features: int
    in_features: int


def onednn_weights_available(dtype: torch.dtype) -> bool:
    """Whether this PyTorch has the oneDNN ops for ``dtype`` weights (bf16 or fp32).

    fp32 too: MKL's fp32 matmul re-packs the weight at every call, which a decode step's few rows do not pay for,
    and oneDNN's prepacked fp32 matmul is faster than MKL's on AMD CPUs (bench/train_throughput.py --precision fp32
    measures both; docs/benchmarks.md has the figures).
    """
    return (
        dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def to_onednn(weight: torch.Tensor, rows_hint: int, backward: bool = True) -> OnednnLinear:
    """Both layouts of a (out, in) weight (the forward's alone without ``backward``); ``rows_hint``: the usual
    rows of the inputs (any count works)."""
    w = weight.detach()
    return OnednnLinear(
        torch.ops.mkldnn._reorder_linear_weight(w, rows_hint),
        torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), rows_hint) if backward else None,
        w.shape[0],
        w.shape[1],
    )


def to_plain(onednn: OnednnLinear) -> torch.Tensor:
    """The plain (out, in) weight back, bit for bit."""
    return onednn.forward.to_dense()


def linear(x2: torch.Tensor, onednn: OnednnLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 (N, in) @ W^T + bias -> (N, out)."""
    return torch.ops.mkldnn._linear_pointwise(x2, onednn.forward, bias, "none", [], "")


def grad_input(dy2: torch.Tensor, onednn: OnednnLinear) -> torch.Tensor:
    """dy2 (N, out) @ W -> (N, in): the input's gradient."""
    return torch.ops.mkldnn._linear_pointwise(dy2, onednn.backward, None, "none", [], "")


class FrozenLinearFunction(torch.autograd.Function):
    """y = x W^T + b through an OnednnLinear; W and b frozen, so only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x, bias, onednn: OnednnLinear):
        ctx.onednn = onednn
        y = linear(x.reshape(-1, onednn.in_features), onednn, bias)  # (N, out)
        return y.view(*x.shape[:-1], onednn.out_features)

    @staticmethod
    def backward(ctx, dy):
        onednn = ctx.onednn
        dx = grad_input(dy.reshape(-1, onednn.out_features), onednn)  # (N, in)
        return dx.view(*dy.shape[:-1], onednn.in_features), None, None


def _onednn_forward(self, x):
    return FrozenLinearFunction.apply(x, self.bias, getattr(self, ATTRIBUTE))


def _weight_users(model) -> dict[int, int]:
    """weight storage -> how many of ``model``'s modules hold it."""
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[p.data_ptr()] = users.get(p.data_ptr(), 0) + 1
    return users


def convertible_linears(model, inference: bool = False) -> list[torch.nn.Module]:
    """The frozen CPU nn.Linear modules of ``model`` (a PEFT wrapper's are its base model's) whose weights can take
    oneDNN's layout, in bf16 or fp32; a head tied to the input embeddings among them (onednn_weights keeps its plain
    weight, which the embeddings read). For ``inference`` (no gradient will be taken) every such module counts as
    frozen."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear and _convertible(m.weight, inference)]


def _convertible(w: torch.Tensor, inference: bool) -> bool:
    return not (w.requires_grad and not inference) and w.device.type == "cpu" and onednn_weights_available(w.dtype)


@contextlib.contextmanager
def onednn_weights(model, rows_hint: int, inference: bool = False):
    """Run the body with ``model``'s convertible linears (convertible_linears) in oneDNN's layouts and their plain
    weights released, except a weight another module shares (a tied head's, which the embeddings read: kept); yields
    how many. ``inference``: the forward layout only, for a body that takes no gradients. Each module's forward, and
    loralab.cpu.fused_lora and loralab.cpu.head_loss for LoRA base layers and the head, use those meanwhile. On the
    way out, however the body ends, the plain weights are put back bit-identical."""
    users = _weight_users(model)
    done = []  # (module, the forward it had as an instance attribute, if any, whether its plain weight was released)
    try:
        for module in convertible_linears(model, inference):
            w = module.weight
            onednn = to_onednn(w, rows_hint, backward=not inference)
            release = users[w.data_ptr()] == 1
            done.append((module, module.__dict__.get("forward"), release))
            setattr(module, ATTRIBUTE, onednn)
            module.forward = types.MethodType(_onednn_forward, module)
            if release:
                w.data = torch.empty(0, dtype=w.dtype, device=w.device)  # the plain copy, released
        yield len(done)
    finally:
        for module, forward, released in done:
            if released:
                module.weight.data = to_plain(getattr(module, ATTRIBUTE))
            delattr(module, ATTRIBUTE)
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def onednn_of(module) -> OnednnLinear | None:
    """The OnednnLinear a module's weight lives in for now, or None when its plain weight is in place."""
    return getattr(module, ATTRIBUTE, None)

