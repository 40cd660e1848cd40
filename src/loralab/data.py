"""Alpaca records -> token ids and labels. Pure functions: values in, values out.

An example is ``{"input_ids": [...], "labels": [...]}`` where labels are IGNORE_INDEX on every prompt
token (and on template text after the end-of-sequence token) and equal to the id on the response and
its end-of-sequence token. The ids are those of tokenising the whole rendered conversation at once:
the prompt/response boundary is found from character offsets, never by tokenising pieces separately
(sentencepiece tokenizers give a word a different id with and without its boundary space).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
            raise DataError(f"{where}: missing '{key}' "
                            "(each record needs 'instruction' and 'output', 'input' is optional)")
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


def split_sizes(n_records: int, num_examples: int | None, eval_size: int, source: str) -> list[str]:
    """Check the asked subset and split against the usable records; return warnings, raise on a split that
    leaves too little to train on. Each message names the setting to change (not a symptom further on)."""
    warnings = []
    take = n_records if num_examples is None else min(num_examples, n_records)
    if num_examples is not None and num_examples > n_records:
        warnings.append(f"data.num_examples is {num_examples} but {source} holds {n_records} usable records; "
                        f"using all {n_records}")
    if eval_size >= take:
        raise DataError(f"data.eval_size {eval_size} holds out all {take} records of {source}, leaving none to train "
                        f"on; "
                        f"lower data.eval_size (at most {take // 2}) or add records")
    if take - eval_size < eval_size:
        raise DataError(f"data.eval_size {eval_size} leaves only {take - eval_size} of the {take} records of {source} "
                        f"to train on, "
                        f"fewer than it holds out; lower data.eval_size (at most {take // 2}) or add records")
    return warnings


ZERO_WIDTH_SPACE = "\u200b"


def escape_special_tokens(record: Any, specials: Sequence[str]) -> tuple[Any, int]:
    """Break every special-token string (``</s>``, ``<|im_end|>``, ...) inside a record's text (nested messages
    included) with a zero-width space after its first character, so it is tokenised as the text it is, never as
    a control token: a literal ``</s>`` in an answer would otherwise train an end of sequence mid-answer.
    Returns (record, strings escaped). Role names are left alone."""
    ordered = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)
    if isinstance(record, str):
        count = 0
        for token in ordered:
            if token in record:
                count += record.count(token)
                record = record.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
        return record, count
    if isinstance(record, list):
        pairs = [escape_special_tokens(v, ordered) for v in record]
        return [v for v, _ in pairs], sum(n for _, n in pairs)
    if isinstance(record, dict):
        pairs = {k: (v, 0) if k == "role" else escape_special_tokens(v, ordered) for k, v in record.items()}
        return {k: v for k, (v, _) in pairs.items()}, sum(n for _, n in pairs.values())
    return record, 0


def answer_text(record: dict) -> str:
    """Everything a record trains on as an answer (all assistant turns; plain text: the text)."""
    if "text" in record:
        return record["text"]
    if "prompt" in record:
        return record["completion"]
    return "".join(m["content"] for m in conversation(record) if m["role"] == "assistant")


def select_and_split(n_records: int, num_examples: int | None, eval_size: int,
                     seed: int) -> tuple[list[int], list[int]]:
    """Seeded subset of ``num_examples`` indices, split into (train, eval) index lists."""
    rng = random.Random(seed)
    take = n_records if num_examples is None else min(num_examples, n_records)
    chosen = rng.sample(range(n_records), take)
    eval_size = min(eval_size, take)
    return chosen[eval_size:], chosen[:eval_size]


def record_key(record: dict) -> str:
    """Equal for exact duplicates (data.dedupe): normalised records (format read, data.columns applied) with the
    same fields holding the same values."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def dedupe(records: Sequence[dict]) -> list[dict]:
    """The records without exact duplicates: the first of each kept, in order."""
    unique: dict[str, dict] = {}
    for record in records:
        unique.setdefault(record_key(record), record)
    return list(unique.values())


@dataclass
class Template:
    """How a record becomes text with trained character spans. Built once per tokenizer by ``make_template``.

    ``kind`` is how conversations (Alpaca records, chat messages, ShareGPT) are rendered: "chat" (the
    tokenizer's chat template) or "alpaca" (the classic prompt; Alpaca records only). Prompt/completion and
    plain-text records are raw text and render the same under either kind.
    """

    kind: str  # "chat" or "alpaca"
    eos_token: str
    bos_token: str | None
    tokenizer: Any = field(repr=False)

    def _chat(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt_text(self, record: dict) -> str:
        """What the model sees before it answers (for a conversation: up to its last assistant turn)."""
        if "text" in record:
            return ""
        if "prompt" in record:
            return record["prompt"]
        if self.kind == "chat":
            messages = conversation(record)
            return self._chat(messages[: last_assistant(messages)], generation_prompt=True)
        fmt = ALPACA_PROMPT_WITH_INPUT if record["input"].strip() else ALPACA_PROMPT
        return fmt.format(instruction=record["instruction"], input=record["input"])

    def render(self, record: dict, assistant_turns: str = "all") -> tuple[str, list[tuple[int, int]]]:
        """Return (full text, trained character spans [start, end)): each trained answer with its EOS.

        ``assistant_turns``: "all" trains every assistant turn of a conversation, "last" only the last one.
        """
        if "text" in record:
            full = record["text"] + self.eos_token
            return full, [(0, len(full))]
        if "prompt" in record:
            full = record["prompt"] + record["completion"] + self.eos_token
            return full, [(len(record["prompt"]), len(full))]
        if self.kind != "chat":
            prompt = self.prompt_text(record)
            full = prompt + record["output"] + self.eos_token
            return full, [(len(prompt), len(full))]
        return self._render_conversation(conversation(record), assistant_turns)

    def _render_conversation(self, messages: list[dict], assistant_turns: str) -> tuple[str, list[tuple[int, int]]]:
        full = self._chat(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if assistant_turns == "last":
            turns = turns[-1:]
        spans = []
        for i in turns:
            prompt = self._chat(messages[:i], generation_prompt=True)
            if not full.startswith(prompt):
                raise DataError(
                    "the tokenizer's chat template renders the prompt differently with and without the answer; "
                    "set data.template: alpaca (Alpaca records only) or use a model whose template round-trips"
                )
            # The turn ends where the conversation up to it ends; the answer's EOS must lie before that.
            upto = self._chat(messages[: i + 1])
            bound = len(upto) if full.startswith(upto) else len(full)
            content = messages[i]["content"]
            answer_at = full.find(content, len(prompt))
            if answer_at < 0:
                raise DataError("the tokenizer's chat template changes the assistant's text; set data.template: alpaca")
            answer_end = answer_at + len(content)
            eos_at = full.find(self.eos_token, answer_end, bound)
            if eos_at >= 0:
                spans.append((len(prompt), eos_at + len(self.eos_token)))
            elif i == len(messages) - 1:
                # The template ends the answer without an EOS: add one, or generation never learns to stop.
                full = full[:answer_end] + self.eos_token
                spans.append((len(prompt), len(full)))
            else:
                spans.append((len(prompt), answer_end))
        return full, spans

    def trained_text(self, record: dict, assistant_turns: str = "all") -> str:
        """The characters the loss sees, concatenated (what the trained tokens decode to)."""
        full, spans = self.render(record, assistant_turns)
        return "".join(full[a:b] for a, b in spans)


def conversation(record: dict) -> list[dict]:
    """The record's chat messages: its own, or an Alpaca record's single user/assistant exchange."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": user_message(record)}, {"role": "assistant", "content": record["output"]}]


def last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def reference_answer(record: dict) -> str | None:
    """The answer generation is scored against; None for plain text, which has no prompt to answer."""
    if "text" in record:
        return None
    if "prompt" in record:
        return record["completion"]
    messages = conversation(record)
    return messages[last_assistant(messages)]["content"]


def make_template(tokenizer: Any, kind: str = "auto", data_format: str = "alpaca") -> Template:
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has no end-of-sequence token; pick a model whose tokenizer defines eos_token")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if data_format in ("messages", "sharegpt"):
        if kind == "alpaca" or not has_chat:
            why = "data.template is 'alpaca'" if has_chat else "the tokenizer has no chat template"
            raise DataError(f"{data_format} data is rendered with the tokenizer's chat template, but {why}; set "
                            f"data.template: auto with a model whose tokenizer has a chat template")
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


def prompt_ids(tokenizer: Any, template: Template, record: dict) -> list[int]:
    """Token ids of the prompt alone, as fed to the model at generation time."""
    return tokenize_text(tokenizer, template.prompt_text(record))[0]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_example(tokenizer: Any, template: Template, record: dict, max_length: int,
                   assistant_turns: str = "all") -> Encoded:
    """Tokenise one record and mask all but its trained spans. Over-long examples lose tokens from the end."""
    text, spans = template.render(record, assistant_turns)
    ids, offsets = tokenize_text(tokenizer, text)
    # A token is trained when it lies wholly inside a trained span; a token straddling a prompt
    # boundary counts as prompt, so what is trained never depends on the prompt's last characters.
    labels = [tok if b > a and any(a >= s and b <= e for s, e in spans) else IGNORE_INDEX
              for tok, (a, b) in zip(ids, offsets, strict=False)]
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def trained_token_count(labels: Sequence[int]) -> int:
    """Tokens the loss is taken on: labels other than IGNORE_INDEX after the first (position 0 is predicted from
    nothing, so its label never counts)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def encode_split(tokenizer: Any, template: Template, records: list[dict], max_length: int,
                 assistant_turns: str = "all") -> tuple[list[dict], dict]:
    """Encode records; drop (and count) those left with no trained token. Returns (examples, stats)."""
    examples, truncated, dropped, tokens, trained = [], 0, 0, 0, 0
    for record in records:
        enc = encode_example(tokenizer, template, record, max_length, assistant_turns)
        n_trained = trained_token_count(enc.labels)
        truncated += enc.truncated
        if n_trained == 0:
            dropped += 1
            continue
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels, "record": record})
        tokens += len(enc.input_ids)
        trained += n_trained
    stats = {"examples": len(examples), "tokens": tokens, "trained_tokens": trained, "truncated": truncated,
             "dropped": dropped}
    return examples, stats


# Data formats -------------------------------------------------------------------------------------

FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
"""Each record format and its fields (the names data.columns maps onto)."""
FORMATS = tuple(FORMAT_FIELDS)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
DETECT_RECORDS = 10  # records looked at to detect the format


def rename_columns(record: Any, columns: dict[str, str], where: str) -> Any:
    """The record with each data.columns source field renamed to its loralab name (a pure rename)."""
    if not columns or not isinstance(record, dict):
        return record
    renamed = dict(record)
    for name, source in columns.items():
        if source not in record:
            fields = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"{where}: data.columns maps '{name}' to '{source}', but the record has no '{source}' "
                            f"(its fields: {fields}); fix data.columns")
        renamed[name] = renamed.pop(source)
    return renamed


def record_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for name in ("messages", "sharegpt", "prompt_completion", "alpaca"):
        required = ("instruction", "output") if name == "alpaca" else FORMAT_FIELDS[name]
        if all(k in record for k in required):
            return name
    return "text" if "text" in record else None


def detect_format(records: Sequence[Any], where: str) -> str:
    """The format of the first records' fields; DataError when they match none or disagree."""
    seen: dict[str, int] = {}
    for i, record in enumerate(records[:DETECT_RECORDS]):
        found = record_format(record)
        if found is not None:  # a record that matches nothing is reported by the detected format's checks
            seen.setdefault(found, i)
    if len(seen) > 1:
        (a, i), (b, j) = list(seen.items())[:2]
        raise DataError(f"{where}: record {i} looks like {a} and record {j} like {b}; set data.format")
    if not seen and records:
        first = records[0]
        fields = ", ".join(sorted(map(str, first))) if isinstance(first, dict) else type(first).__name__
        raise DataError(f"{where} record 0 ({fields}) matches no data format; set data.format to one of "
                        f"{', '.join(FORMATS)} and data.columns to name its fields")
    return next(iter(seen), "alpaca")


def check_conversation(messages: Any, where: str) -> list[dict[str, str]]:
    """Return the messages as {role, content} dicts, or raise DataError: an optional system message, then
    user and assistant turns alternating, ending with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: the conversation must be a non-empty list of messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where} message {k}: expected an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where} message {k}: unknown role '{m['role']}'; roles are {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn, so nothing to train on; each conversation needs one")
    first = 1 if out[0]["role"] == "system" else 0
    for k, m in enumerate(out[first:], first):
        expected = "user" if (k - first) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"{where} message {k}: roles out of order, expected '{expected}', got '{m['role']}' (an "
                            f"optional system message first, then user and assistant alternating)")
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {out[-1]['role']} turn; end it with the assistant's")
    return out


def _string_field(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing '{key}'")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
    return record[key]


def normalize_record(record: Any, data_format: str, where: str) -> dict:
    """One source record (fields already renamed) -> loralab's form for its format, or DataError naming ``where``.

    alpaca -> {instruction, input, output}; messages and sharegpt -> {messages: [{role, content}]};
    prompt_completion -> {prompt, completion}; text -> {text}.
    """
    if data_format == "alpaca":
        return validate_record(record, where)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with {', '.join(FORMAT_FIELDS[data_format])}, "
                        f"got {type(record).__name__}")
    if data_format == "messages":
        return {"messages": check_conversation(record.get("messages"), where)}
    if data_format == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
        messages = []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise DataError(f"{where} turn {k}: expected an object with 'from' and a string 'value'")
            role = SHAREGPT_ROLES.get(turn.get("from"))
            if role is None:
                raise DataError(f"{where} turn {k}: unknown 'from' value {turn.get('from')!r}; ShareGPT turns are from "
                                f"{', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": turn["value"]})
        return {"messages": check_conversation(messages, where)}
    if data_format == "prompt_completion":
        return {"prompt": _string_field(record, "prompt", where),
                "completion": _string_field(record, "completion", where)}
    text = _string_field(record, "text", where)
    if not text.strip():
        raise DataError(f"{where}: 'text' is empty")
    return {"text": text}


def read_format(raw: Sequence[Any], data_format: str, columns: dict[str, str], where: str) -> tuple[str, list[dict]]:
    """Rename, detect (``data_format`` "auto") and validate source records: (format, normalised records)."""
    renamed = [rename_columns(r, columns, f"{where} record {i}") for i, r in enumerate(raw)]
    if data_format == "auto":
        data_format = detect_format(renamed, where)
    return data_format, [normalize_record(r, data_format, f"{where} record {i}") for i, r in enumerate(renamed)]
def adds_bos(tokenizer: Any, text: str) -> bool:
    """True when `tokenize_text` puts a BOS before ``text``: the tokenizer has one, the text does not start with it.

    The same rule decides the exported GGUF's ``add_bos_token``, so llama.cpp sees the ids training saw.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return not ids or ids[0] != bos


def conversation_prompt_text(template: Template, messages: list[dict[str, str]]) -> str:
    """A conversation ending with a user turn, rendered for the model's next answer as training renders it.

    A single user turn gives exactly ``template.prompt_text`` of that record; earlier turns come before it
    (chat templates render them; the Alpaca format joins prompt + answer + EOS per turn).
    """
    if not messages or messages[-1]["role"] != "user":
        raise DataError("a conversation to answer must end with a user message")
    if template.kind == "chat":
        return template.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text, user = "", None
    for message in messages:
        if message["role"] == "user":
            user = message["content"]
        elif message["role"] == "assistant" and user is not None:
            record = {"instruction": user, "input": "", "output": ""}
            text += template.prompt_text(record) + message["content"] + template.eos_token
            user = None
    return text + template.prompt_text({"instruction": user, "input": "", "output": ""})


def conversation_prompt_ids(tokenizer: Any, template: Template, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `conversation_prompt_text`, with the BOS rule of training (`tokenize_text`)."""
    return tokenize_text(tokenizer, conversation_prompt_text(template, messages))[0]
