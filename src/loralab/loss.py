"""Response-only cross-entropy that computes logits only where a trained token is predicted.

The full (tokens x vocab) logits tensor is never built: prompt positions (about a fifth of the tokens
on Alpaca) are skipped, and the rest are upcast to fp32 only for the loss. On a CPU, with a frozen
plain LM head, even those logits are only ever built a chunk at a time (FrozenHeadCrossEntropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab import IGNORE_INDEX, LOSS_CHUNK_ROWS, PLAIN_HEAD_MODELS, packed_weights
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
    def forward(ctx, hidden, weight, targets, packed=None):
        # packed: the head in oneDNN's layouts, its plain weight released (loralab.packed_weights)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        rows = torch.arange(min(CHUNK_ROWS, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h, t = hidden[start : start + CHUNK_ROWS], targets[start : start + CHUNK_ROWS]
            logits = (h @ weight.t() if packed is None else packed_weights.linear(h, packed)).float()  # (c, vocab)
            # log-sum-exp and softmax in place, each pass over the chunk once (torch.logsumexp allocates two more)
            shifted = logits.sub_(logits.amax(1, keepdim=True))
            target_shifted = shifted.gather(1, t[:, None]).squeeze(1)
            exp = shifted.exp_()
            sums = exp.sum(1)
            total += (sums.log() - target_shifted).sum()
            if grad is not None:
                probs = exp.div_(sums[:, None])
                probs[rows[: len(t)], t] -= 1.0
                if packed is None:
                    torch.mm(probs.to(hidden.dtype), weight, out=grad[start : start + CHUNK_ROWS])
                else:
                    grad[start : start + CHUNK_ROWS] = packed_weights.grad_input(probs.to(hidden.dtype), packed)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None



def _frozen_plain_head(model):
    """(decoder, head) when the loss may bypass the model's own head: a CPU model of a type whose
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
    return base.get_decoder(), head


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
        decoder, head = plain
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[0, keep]  # (K, hidden)
        loss_sum = FrozenHeadCrossEntropy.apply(hidden, head.weight, targets[keep], packed_weights.packed_of(head))
        return loss_sum, int(keep.numel())
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
