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


@torch.no_grad()
def response_token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trained target's next-token loss in a packed row (fp32, (K,)) and the index of the example it belongs
    to (0 for the row's first; examples start where position_ids restart at 0). The terms response_loss_sum adds."""
    labels = batch["labels"]
    targets = labels[0, 1:]
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    example = (batch["position_ids"][0] == 0).cumsum(0)[1:][keep] - 1  # the target token's example
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = head_loss.frozen_plain_head(model)
    if plain is not None:
        decoder, head = plain
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[0, keep]
        losses = head_loss.token_losses(hidden, head.weight, targets[keep], onednn_weights.onednn_of(head))
    else:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0].float()
        losses = F.cross_entropy(logits, targets[keep], reduction="none")
    return losses, example


HELDOUT_ROW_TOKENS = 2048  # heldout_loss packs the examples into rows of at most this many tokens


@torch.no_grad()
def heldout_example_losses(
    model,
    examples: list[dict],
    device: str | torch.device,
    max_tokens: int = HELDOUT_ROW_TOKENS,
    progress: bool = False,
    desc: str = "held-out loss",
) -> list[tuple[float, int]]:
    """Each example's summed response loss and trained-token count, in order (teacher forcing, no dropout): what
    the held-out loss and its paired-bootstrap interval (loralab.intervals.loss_changes) are computed from.

    One forward pass over every example, the examples packed best-fit into rows of at most ``max_tokens``
    tokens (attention stays inside each example), logits only where a trained token is predicted.
    ``progress`` shows a bar counting tokens, with an ETA.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    was_training = model.training
    model.eval()
    sums, counts = [0.0] * len(examples), [0] * len(examples)
    try:
        with tqdm(total=sum(lengths), desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
            for group in plan_rows(lengths, max_tokens):
                batch = {k: v.to(device) for k, v in pack_examples([examples[i] for i in group]).items()}
                losses, example = response_token_losses(model, batch)
                per_sum = torch.zeros(len(group), dtype=torch.float64).index_add_(0, example.cpu(),
                                                                                  losses.double().cpu())
                per_count = torch.bincount(example.cpu(), minlength=len(group))
                for j, i in enumerate(group):
                    sums[i], counts[i] = float(per_sum[j]), int(per_count[j])
                bar.update(sum(lengths[i] for i in group))
    finally:
        model.train(was_training)
    return list(zip(sums, counts, strict=True))


def mean_loss(example_losses: list[tuple[float, int]]) -> float:
    """The token-weighted mean of per-example (loss sum, token count) pairs, as training weighs tokens."""
    return sum(s for s, _ in example_losses) / max(sum(c for _, c in example_losses), 1)


def heldout_loss(model, examples: list[dict], device: str | torch.device, **options) -> float:
    """Token-weighted mean response loss over ``examples``: heldout_example_losses (``options``: its max_tokens,
    progress, desc), then mean_loss."""
    return mean_loss(heldout_example_losses(model, examples, device, **options))
