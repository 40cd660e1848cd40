"""Padding-free batches: several examples laid end to end in one row, positions restarting at each, and the plan
of which examples share a row.

transformers keeps attention inside each example when it sees restarting ``position_ids`` and no
attention mask (and no KV cache is built: ``use_cache=False``), so a packed row computes exactly what
the examples would compute one by one, without a single padding token.
"""

from __future__ import annotations

from functools import cache

from loralab import IGNORE_INDEX


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


def peak_row(lengths: list[int], per_step: int, row_tokens: int) -> list[int]:
    """Indices of the examples in the fullest row a step can make: the longest examples that fit together
    (one of ``per_step`` examples alone if it is longer than ``row_tokens``)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:per_step]
    row, used = [], 0
    for i in order:
        if used + lengths[i] <= row_tokens or not row:
            row.append(i)
            used += lengths[i]
    return row


@cache
def _flatten():
    """transformers' own flattening collator lays out one row; loralab only adds the row planning (plan_rows), which
    the collator does not do (it puts a whole batch in one row, whatever its length)."""
    # torch and transformers are imported when the first row is built, so that planning (rows only) stays light
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


def pack_examples(examples: list[dict]) -> dict:
    """Concatenate examples into one row: input_ids, labels and position_ids, each of shape (1, total). The first
    token of each example is never a target (it would be predicted from the previous example)."""
    return _flatten()([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples])


def pack_rows(examples: list[dict], max_tokens: int) -> dict:
    """One optimizer step's examples as best-fit rows of at most ``max_tokens`` tokens (see plan_rows).

    Returns ``rows`` (pack_examples of each row, run forward and backward one at a time by
    loralab.training.trainer.ResponseOnlyTrainer) and the step's input_ids and labels end to end, which is what the
    Trainer counts tokens and trained targets on.
    """
    import torch  # heavy: see _flatten

    groups = plan_rows([len(ex["input_ids"]) for ex in examples], max_tokens)
    rows = [pack_examples([examples[i] for i in group]) for group in groups]
    return {
        "input_ids": torch.cat([r["input_ids"] for r in rows], dim=1),
        "labels": torch.cat([r["labels"] for r in rows], dim=1),
        "rows": rows,
    }


class RowCollator:
    """The Trainer's data collator: a batch of examples -> pack_rows with this row budget."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def __call__(self, examples: list[dict]) -> dict:
        return pack_rows(examples, self.max_tokens)
