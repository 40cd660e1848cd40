"""Padding-free batches: several examples laid end to end in one row, positions restarting at each.

transformers keeps attention inside each example when it sees restarting ``position_ids`` and no
attention mask (and no KV cache is built: ``use_cache=False``), so a packed row computes exactly what
the examples would compute one by one, without a single padding token.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorWithFlattening

from loralab import IGNORE_INDEX
from loralab.decisions import plan_rows


def pack_examples(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row: input_ids, labels and position_ids, each of shape (1, total). The first
    token of each example is never a target (it would be predicted from the previous example)."""
    return _FLATTEN([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples])


# transformers' own flattening collator lays out one row; loralab only adds the row planning (pack_rows), which
# the collator does not do (it puts a whole batch in one row, whatever its length).
_FLATTEN = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


def pack_rows(examples: list[dict], max_tokens: int) -> dict:
    """One optimizer step's examples as best-fit rows of at most ``max_tokens`` tokens (see plan_rows).

    Returns ``rows`` (pack_examples of each row, run forward and backward one at a time by
    loralab.train.ResponseOnlyTrainer) and the step's input_ids and labels end to end, which is what the
    Trainer counts tokens and trained targets on.
    """
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
