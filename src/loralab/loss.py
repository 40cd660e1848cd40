"""Response-only cross-entropy that computes logits only where a trained token is predicted.

The full (tokens x vocab) logits tensor is never built: prompt positions (about a fifth of the tokens
on Alpaca) are skipped, and the rest are upcast to fp32 only for the loss. On a CPU, with a frozen
plain LM head, even those logits are only ever built a chunk at a time (loralab.cpu.head_loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loralab import IGNORE_INDEX
from loralab.cpu import head_loss, onednn_weights
from loralab.packing import pack_examples, plan_rows


def response_loss_sum(model, batch: dict[str, torch.Tensor], fused_head: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over trained targets of a packed row, and their count.

    ``batch`` holds input_ids, labels and position_ids of shape (1, T) as made by pack_examples. ``fused_head``:
    through loralab.cpu.head_loss where it applies (loralab.decisions.cpu_pieces decides it for training).
    """
    labels = batch["labels"]
    targets = labels[0, 1:]  # (T-1,) the token each position predicts
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (K,) positions with a trained target
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = head_loss.frozen_plain_head(model) if fused_head else None
    if plain is not None:
        decoder, head = plain
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[0, keep]  # (K, hidden)
        loss_sum = head_loss.FrozenHeadCrossEntropy.apply(hidden, head.weight, targets[keep],
                                                          onednn_weights.onednn_of(head))
        return loss_sum, int(keep.numel())
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = out.logits[0].float()  # (K, vocab)
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.numel())


HELDOUT_ROW_TOKENS = 2048  # heldout_loss packs the examples into rows of at most this many tokens


@torch.no_grad()
def heldout_loss(
    model,
    examples: list[dict],
    device: str | torch.device,
    max_tokens: int = HELDOUT_ROW_TOKENS,
    progress: bool = False,
    desc: str = "held-out loss",
) -> float:
    """Token-weighted mean response loss over ``examples`` (teacher forcing, no dropout).

    One forward pass over every example, the examples packed best-fit into rows of at most ``max_tokens``
    tokens (attention stays inside each example), logits only where a trained token is predicted.
    ``progress`` shows a bar counting tokens, with an ETA.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with tqdm(total=sum(lengths), desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
            for group in plan_rows(lengths, max_tokens):
                batch = {k: v.to(device) for k, v in pack_examples([examples[i] for i in group]).items()}
                loss_sum, n = response_loss_sum(model, batch)
                total += loss_sum.item()
                count += n
                bar.update(sum(lengths[i] for i in group))
    finally:
        model.train(was_training)
    return total / max(count, 1)
