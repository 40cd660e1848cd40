"""Response-only cross-entropy that computes logits only where a trained token is predicted.

The full (tokens x vocab) logits tensor is never built: prompt positions (about a fifth of the tokens
on Alpaca) are skipped, and the rest are upcast to fp32 only for the loss. On a CPU, with a frozen
plain LM head, even those logits are only ever built a chunk at a time (FrozenHeadCrossEntropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab import IGNORE_INDEX, LOSS_CHUNK_ROWS, PLAIN_HEAD_MODELS
from loralab.packing import pack_examples


CHUNK_ROWS = LOSS_CHUNK_ROWS


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, target_i) for a frozen, bias-free head W, CHUNK_ROWS positions at a time.

    The loss's only gradient is the hidden states' (W is frozen), so the forward computes it chunk by chunk,
    (softmax - one-hot) @ W, and keeps that (K x hidden) instead of any logits; the backward scales it.
    Same arithmetic as F.cross_entropy on the upcast logits of the head (bf16 logits, fp32 softmax). On a
    CPU this saves the passes over the (K x vocab) fp32 tensors and their gradients, which are mmap'd fresh
    (too big for the heap) every time: about 4% of a TinyLlama training step (bench/train_throughput.py).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h, t = hidden[start : start + CHUNK_ROWS], targets[start : start + CHUNK_ROWS]
            logits = (h @ weight.t()).float()  # (c, vocab)
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                torch.mm(probs.to(hidden.dtype), weight, out=grad[start : start + CHUNK_ROWS])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None



def _frozen_plain_head(model):
    """(decoder, head weight) when the loss may bypass the model's own head: a CPU model of a type whose
    forward applies the LM head and nothing else, the head a frozen bias-free Linear; else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if (
        getattr(base.config, "model_type", None) not in PLAIN_HEAD_MODELS
        or type(head) is not torch.nn.Linear
        or head.bias is not None
        or head.weight.requires_grad
        or head.weight.device.type != "cpu"
    ):
        return None
    return base.get_decoder(), head.weight


def response_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over trained targets of a packed row, and their count.

    ``batch`` holds input_ids, labels and position_ids of shape (1, T) as made by pack_examples.
    """
    labels = batch["labels"]
    targets = labels[0, 1:]  # (T-1,) the token each position predicts
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (K,) positions with a trained target
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = _frozen_plain_head(model)
    if plain is not None:
        decoder, weight = plain
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[0, keep]  # (K, hidden)
        return FrozenHeadCrossEntropy.apply(hidden, weight, targets[keep]), int(keep.numel())
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = out.logits[0].float()  # (K, vocab)
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.numel())


@torch.no_grad()
def heldout_loss(model, examples: list[dict], device: str | torch.device, max_tokens: int = 2048) -> float:
    """Token-weighted mean response loss over ``examples`` (teacher forcing, no dropout)."""
    was_training = model.training
    model.eval()
    total, count, row, row_tokens = 0.0, 0, [], 0
    try:
        for ex in examples + [None]:
            if ex is not None and (not row or row_tokens + len(ex["input_ids"]) <= max_tokens):
                row.append(ex)
                row_tokens += len(ex["input_ids"])
                continue
            if row:
                batch = {k: v.to(device) for k, v in pack_examples(row).items()}
                loss_sum, n = response_loss_sum(model, batch)
                total += loss_sum.item()
                count += n
            row, row_tokens = ([ex], len(ex["input_ids"])) if ex is not None else ([], 0)
    finally:
        model.train(was_training)
    return total / max(count, 1)
