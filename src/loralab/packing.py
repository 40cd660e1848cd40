"""Padding-free batches: several examples laid end to end in one row, positions restarting at each.

transformers keeps attention inside each example when it sees restarting ``position_ids`` and no
attention mask (and no KV cache is built: ``use_cache=False``), so a packed row computes exactly what
the examples would compute one by one, without a single padding token.
"""

from __future__ import annotations

import torch

from loralab import IGNORE_INDEX


def pack_examples(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row: input_ids, labels and position_ids, each of shape (1, total)."""
    ids, labels, positions = [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        ids.extend(ex["input_ids"])
        # The first token of each example is never a target: it would be predicted from the previous example.
        labels.extend([IGNORE_INDEX] + list(ex["labels"][1:]))
        positions.extend(range(n))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def plan_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Best-fit-decreasing plan: group example indices into rows of at most ``max_tokens`` tokens.

    Longest first, each into the fullest row it still fits in; an example longer than max_tokens gets a row alone.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        best = -1
        for r, left in enumerate(room):
            if n <= left and (best < 0 or left < room[best]):
                best = r
        if best < 0:
            rows.append([i])
            room.append(max_tokens - n)
        else:
            rows[best].append(i)
            room[best] -= n
    return rows
