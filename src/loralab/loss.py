"""Response-only cross-entropy that computes logits only where a trained token is predicted.

The full (tokens x vocab) logits tensor is never built: prompt positions (about a fifth of the tokens
on Alpaca) are skipped, and the rest are upcast to fp32 only for the loss. On a CPU, with a frozen
plain LM head, even those logits are only ever built a chunk at a time (loralab.cpu.head_loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab import IGNORE_INDEX
from loralab.cpu import head_loss, onednn_weights
from loralab.packing import pack_examples


def response_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over trained targets of a packed row, and their count.

    ``batch`` holds input_ids, labels and position_ids of shape (1, T) as made by pack_examples.
    """
    labels = batch["labels"]
    targets = labels[0, 1:]  # (T-1,) the token each position predicts
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (K,) positions with a trained target
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = head_loss.frozen_plain_head(model)
    if plain is not None:
        decoder, head = plain
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[0, keep]  # (K, hidden)
        loss_sum = head_loss.FrozenHeadCrossEntropy.apply(hidden, head.weight, targets[keep], onednn_weights.onednn_of(head))
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
