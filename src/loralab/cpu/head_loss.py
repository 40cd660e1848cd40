"""The frozen LM head's cross-entropy a chunk of positions at a time on a CPU: no full fp32 logits and their gradients.

Used by loralab.loss.response_loss_sum whenever frozen_plain_head finds a CPU model it applies to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab.cpu import onednn_weights
from loralab.cpu.catalogue import LOSS_CHUNK_ROWS, PLAIN_HEAD_MODELS
from loralab.cpu.forwards import base_model

CHUNK_ROWS = LOSS_CHUNK_ROWS
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (CHUNK_ROWS x vocab) buffers, the head's logits in ``dtype`` and their fp32 copy (the same buffer when
    ``dtype`` is fp32), kept for the process and reused by every chunk of every call (one pair per vocabulary size,
    dtype, device and chunk size).

    Freshly allocated, each chunk's logits land on pages the kernel has just handed out (the heap's top is
    trimmed between steps), and the first write to each page faults: with a 49,152-token head (SmolLM2) that made
    the fp32 upcast many times slower than on warm pages. bench/step_profile.py counts the page faults per step."""
    key = (CHUNK_ROWS, vocab, dtype, device)
    if key not in _workspaces:
        with torch.inference_mode(False):  # plain tensors even if first asked for under inference_mode: training
            low = torch.empty((CHUNK_ROWS, vocab), dtype=dtype, device=device)  # writes into them later
            high = low if dtype == torch.float32 else torch.empty((CHUNK_ROWS, vocab), dtype=torch.float32,
                                                                  device=device)
        _workspaces[key] = (low, high)
    return _workspaces[key]


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, onednn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden @ W^T for up to CHUNK_ROWS positions, in the head's dtype and upcast to fp32, both in workspace()."""
    low, high = workspace(weight.shape[0] if onednn is None else onednn.out_features, hidden.dtype,
                          hidden.device)
    low, high = low[: hidden.shape[0]], high[: hidden.shape[0]]
    if onednn is None:
        torch.mm(hidden, weight.t(), out=low)
    else:
        low.copy_(onednn_weights.linear(hidden, onednn))
    return low, high if high.data_ptr() == low.data_ptr() else high.copy_(low)


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, target_i) for a frozen, bias-free head W, CHUNK_ROWS positions at a time.

    The loss's only gradient is the hidden states' (W is frozen), so the forward computes it chunk by chunk,
    (softmax - one-hot) @ W, and keeps that (K x hidden) instead of any logits; the backward scales it.
    The loss of F.cross_entropy on the upcast logits of the head (bf16 logits, fp32 softmax), to fp32 rounding. On a
    CPU this saves the passes over the (K x vocab) fp32 tensors and their gradients, which are mmap'd fresh
    (too big for the heap) every time (bench/train_throughput.py measures the step with and without).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, onednn=None):
        # onednn: the head in oneDNN's layouts, its plain weight released (loralab.cpu.onednn_weights)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        rows = torch.arange(min(CHUNK_ROWS, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h, t = hidden[start : start + CHUNK_ROWS], targets[start : start + CHUNK_ROWS]
            low, logits = chunk_logits(h, weight, onednn)  # (c, vocab) each
            # PyTorch's softmax kernel in place, a row at a time from cache, where max, subtract, exp, sum and divide
            # each took a pass over the whole chunk from memory; CE = -log of the target's probability, which is
            # log-sum-exp minus the target's logit to fp32's rounding while that probability is a normal float
            probs = torch.ops.aten._softmax.out(logits, 1, False, out=logits)
            p_target = probs.gather(1, t[:, None]).squeeze(1)
            losses = p_target.log().neg_()
            underflow = p_target < torch.finfo(torch.float32).tiny
            if underflow.any():  # a target 87 nats or more below the top logit: its loss from the logits instead
                losses[underflow] = upcast_losses(h[underflow], weight, t[underflow], onednn)
            total += losses.sum()
            if grad is not None:
                probs[rows[: len(t)], t] -= 1.0
                if low.data_ptr() != probs.data_ptr():
                    low.copy_(probs)  # in the head's dtype, for its matmul
                if onednn is None:
                    torch.mm(low, weight, out=grad[start : start + CHUNK_ROWS])
                else:
                    grad[start : start + CHUNK_ROWS] = onednn_weights.grad_input(low, onednn)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


@torch.no_grad()
def upcast_losses(hidden, weight, targets, onednn=None) -> torch.Tensor:
    """CE(hidden_i @ W^T, target_i) for a few positions, fp32 (K,): log-sum-exp of the upcast logits minus the
    target's, the logits made afresh (FrozenHeadCrossEntropy's fallback where a target's probability underflows)."""
    logits = (F.linear(hidden, weight) if onednn is None else onednn_weights.linear(hidden, onednn)).float()
    return cross_entropies(logits, targets)


def cross_entropies(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE of each row of fp32 ``logits`` (K, vocab) at its target (K,): log-sum-exp minus the target's logit."""
    return torch.logsumexp(logits, 1) - logits.gather(1, targets[:, None]).squeeze(1)


@torch.no_grad()
def token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, onednn=None) -> torch.Tensor:
    """CE(hidden_i @ W^T, target_i) for each position i, fp32 (K,), CHUNK_ROWS positions at a time: the per-token
    terms FrozenHeadCrossEntropy sums, for the held-out loss's per-example sums (no gradient)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        h, t = hidden[start : start + CHUNK_ROWS], targets[start : start + CHUNK_ROWS]
        _, logits = chunk_logits(h, weight, onednn)  # (c, vocab) fp32
        out[start : start + len(t)] = cross_entropies(logits, t)
    return out


def frozen_plain_head(model):
    """(decoder, head) when the loss may bypass the model's own head: a CPU model of a type whose
    forward applies the LM head and nothing else, the head a frozen bias-free Linear; else None. Never under
    DDP: its gradient all-reduce is set up by its own forward, which this path would bypass."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    base = base_model(model)
    head = base.get_output_embeddings()
    if (
        getattr(base.config, "model_type", None) not in PLAIN_HEAD_MODELS
        or type(head) is not torch.nn.Linear
        or head.bias is not None
        or head.weight.requires_grad
        or head.weight.device.type != "cpu"
    ):
        return None
    return base.get_decoder(), head
