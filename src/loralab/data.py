"""Alpaca records -> token ids and labels. Pure functions: values in, values out.

An example is ``{"input_ids": [...], "labels": [...]}`` where labels are IGNORE_INDEX on every prompt
token (and on template text after the end-of-sequence token) and equal to the id on the response and
its end-of-sequence token. The ids are those of tokenising the whole rendered conversation at once:
the prompt/response boundary is found from character offsets, never by tokenising pieces separately
(sentencepiece tokenizers give a word a different id with and without its boundary space).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from loralab import IGNORE_INDEX
from loralab.errors import LoralabError

# The classic Stanford Alpaca prompt, used when the tokenizer has no chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataError(LoralabError):
    """Records or a template that cannot be turned into training examples."""


def validate_record(record: Any, where: str) -> dict[str, str]:
    """Return ``{"instruction", "input", "output"}`` strings, or raise DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with 'instruction' and 'output', got {type(record).__name__}")
    for key in ("instruction", "output"):
        if key not in record:
            raise DataError(f"{where}: missing '{key}' (each record needs 'instruction' and 'output', 'input' is optional)")
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if key == "input" and value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not record["instruction"].strip():
        raise DataError(f"{where}: 'instruction' is empty")
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def user_message(record: dict[str, str]) -> str:
    """The user turn: the instruction, then the input after a blank line when there is one."""
    if record["input"].strip():
        return f"{record['instruction']}\n\n{record['input']}"
    return record["instruction"]


def select_and_split(n_records: int, num_examples: int | None, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded subset of ``num_examples`` indices, split into (train, eval) index lists."""
    rng = random.Random(seed)
    take = n_records if num_examples is None else min(num_examples, n_records)
    chosen = rng.sample(range(n_records), take)
    eval_size = min(eval_size, take)
    return chosen[eval_size:], chosen[:eval_size]


@dataclass
class Template:
    """How a record becomes (prompt text, full text). Built once per tokenizer by ``make_template``."""

    kind: str  # "chat" or "alpaca"
    eos_token: str
    bos_token: str | None
    tokenizer: Any = field(repr=False)

    def prompt_text(self, record: dict[str, str]) -> str:
        """What the model sees before it answers (ends with the generation prompt)."""
        if self.kind == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_message(record)}], tokenize=False, add_generation_prompt=True
            )
        fmt = ALPACA_PROMPT_WITH_INPUT if record["input"].strip() else ALPACA_PROMPT
        return fmt.format(instruction=record["instruction"], input=record["input"])

    def render(self, record: dict[str, str]) -> tuple[str, int, int]:
        """Return (full text, start, end): characters [start, end) are the trained response + EOS."""
        prompt = self.prompt_text(record)
        if self.kind == "chat":
            full = self.tokenizer.apply_chat_template(
                [
                    {"role": "user", "content": user_message(record)},
                    {"role": "assistant", "content": record["output"]},
                ],
                tokenize=False,
            )
            if not full.startswith(prompt):
                raise DataError(
                    "the tokenizer's chat template renders the prompt differently with and without the answer; "
                    "set data.template: alpaca"
                )
            answer_at = full.find(record["output"], len(prompt))
            eos_at = full.find(self.eos_token, answer_at + len(record["output"])) if answer_at >= 0 else -1
            if eos_at < 0:
                # The template ends the answer without an EOS: add one, or generation never learns to stop.
                full = full[: answer_at + len(record["output"])] + self.eos_token if answer_at >= 0 else full + self.eos_token
                eos_at = len(full) - len(self.eos_token)
            return full, len(prompt), eos_at + len(self.eos_token)
        full = prompt + record["output"] + self.eos_token
        return full, len(prompt), len(full)


def make_template(tokenizer: Any, kind: str = "auto") -> Template:
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has no end-of-sequence token; pick a model whose tokenizer defines eos_token")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if kind == "auto":
        kind = "chat" if has_chat else "alpaca"
    if kind == "chat" and not has_chat:
        raise DataError("data.template is 'chat' but the tokenizer has no chat template; set data.template: alpaca")
    return Template(kind=kind, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token, tokenizer=tokenizer)


def tokenize_text(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of the whole text, with a BOS first when the tokenizer has one and the text lacks it.

    Returns (ids, character offsets); the BOS gets offsets (0, 0).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    return ids, offsets


def prompt_ids(tokenizer: Any, template: Template, record: dict[str, str]) -> list[int]:
    """Token ids of the prompt alone, as fed to the model at generation time."""
    return tokenize_text(tokenizer, template.prompt_text(record))[0]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_example(tokenizer: Any, template: Template, record: dict[str, str], max_length: int) -> Encoded:
    """Tokenise one record and mask its prompt. Over-long examples lose tokens from the response end."""
    text, start, end = template.render(record)
    ids, offsets = tokenize_text(tokenizer, text)
    # A token is trained when it lies wholly inside [start, end); a token straddling the prompt
    # boundary counts as prompt, so what is trained never depends on the prompt's last characters.
    labels = [tok if (a >= start and b <= end and b > a) else IGNORE_INDEX for tok, (a, b) in zip(ids, offsets)]
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def trained_token_count(labels: Sequence[int]) -> int:
    return sum(1 for x in labels if x != IGNORE_INDEX)


def encode_split(tokenizer: Any, template: Template, records: list[dict[str, str]], max_length: int) -> tuple[list[dict], dict]:
    """Encode records; drop (and count) those left with no trained token. Returns (examples, stats)."""
    examples, truncated, dropped, tokens, trained = [], 0, 0, 0, 0
    for record in records:
        enc = encode_example(tokenizer, template, record, max_length)
        n_trained = trained_token_count(enc.labels)
        truncated += enc.truncated
        if n_trained == 0:
            dropped += 1
            continue
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels, "record": record})
        tokens += len(enc.input_ids)
        trained += n_trained
    stats = {"examples": len(examples), "tokens": tokens, "trained_tokens": trained, "truncated": truncated, "dropped": dropped}
    return examples, stats
