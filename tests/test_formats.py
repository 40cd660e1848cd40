"""Data beyond Alpaca: chat messages, ShareGPT, prompt/completion, plain text, column mapping, detection.

Masking is checked exactly on the demo's Llama-style tokenizer (TinyLlama's chat template): the whole
example as `loralab inspect` renders it, with the trained tokens between ⟦ and ⟧.
"""

import json
from pathlib import Path

import pytest
from conftest import write_config
from transformers import AutoTokenizer

from loralab import IGNORE_INDEX, cli
from loralab.commands.inspect_data import render_example, run_checks
from loralab.data import DataError, detect_format, encode_example, make_template, read_format, tokenize_text

DATA = Path(__file__).parent / "data"
CHAT = DATA / "chat_messages.jsonl"
SHAREGPT = DATA / "sharegpt.json"
CHAT_RENDERED = (
    "<s> <|system|>\nYou are a helpful assistant.</s>\n<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"
    "{a1}The capital of France is Paris.</s>{z1}\n<|user|>\nAnd of Italy?</s>\n<|assistant|>\n"
    "⟦The capital of Italy is Rome.</s>⟧\n"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _chat_records():
    return [json.loads(line) for line in CHAT.read_text().splitlines()]


def _encode(tokenizer, raw, data_format="auto", columns=None, turns="all"):
    fmt, records = read_format(raw, data_format, columns or {}, "data")
    template = make_template(tokenizer, "auto", fmt)
    return fmt, [encode_example(tokenizer, template, r, 512, turns) for r in records]


def _shown(tokenizer, enc):
    return render_example(tokenizer, enc.input_ids, enc.labels)


def test_messages_train_every_assistant_turn_exactly(tokenizer):
    fmt, examples = _encode(tokenizer, _chat_records()[:1])
    assert fmt == "messages"
    assert _shown(tokenizer, examples[0]) == CHAT_RENDERED.format(a1="⟦", z1="⟧")
    # The ids are those of the whole conversation tokenised at once.
    full = tokenizer.apply_chat_template(_chat_records()[0]["messages"], tokenize=False)
    assert examples[0].input_ids == tokenizer(full).input_ids
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(examples[0].input_ids, examples[0].labels, strict=False))


def test_messages_last_turn_only(tokenizer):
    _, examples = _encode(tokenizer, _chat_records()[:1], turns="last")
    assert _shown(tokenizer, examples[0]) == CHAT_RENDERED.format(a1="", z1="")


def test_sharegpt_encodes_as_the_same_messages(tokenizer):
    fmt, share = _encode(tokenizer, json.loads(SHAREGPT.read_text()))
    assert fmt == "sharegpt"
    _, chat = _encode(tokenizer, _chat_records())
    assert [(e.input_ids, e.labels) for e in share] == [(e.input_ids, e.labels) for e in chat]


def test_every_fixture_conversation_passes_inspect_checks(tokenizer):
    for turns in ("all", "last"):
        fmt, records = read_format(_chat_records(), "auto", {}, "data")
        template = make_template(tokenizer, "auto", fmt)
        examples = [encode_example(tokenizer, template, r, 512, turns) for r in records]
        findings = run_checks(tokenizer, template, records, examples, 512, turns)
        assert all(f.status == "ok" for f in findings), findings


def test_prompt_completion_trains_the_completion_and_eos(tokenizer):
    fmt, [enc] = _encode(tokenizer, [{"prompt": "Q: What is two plus two?\nA:", "completion": " Four."}])
    assert fmt == "prompt_completion"
    assert _shown(tokenizer, enc) == "<s> Q: What is two plus two?\nA:⟦ Four.</s>⟧"


def test_plain_text_trains_everything_but_bos(tokenizer):
    fmt, [enc] = _encode(tokenizer, [{"text": "Bees make honey."}])
    assert fmt == "text"
    assert _shown(tokenizer, enc) == "<s>⟦ Bees make honey.</s>⟧"
    assert enc.labels[0] == IGNORE_INDEX and enc.labels[1:] == enc.input_ids[1:]


def test_column_mapping_gives_the_canonical_examples(tokenizer):
    canonical = [{"instruction": "Name a color.", "input": "", "output": "Red."}]
    renamed = [{"question": "Name a color.", "answer": "Red.", "extra": 1}]
    assert (_encode(tokenizer, renamed, columns={"instruction": "question", "output": "answer"})
            == _encode(tokenizer, canonical))
    dialog = [{"dialog": _chat_records()[0]["messages"]}]
    assert _encode(tokenizer, dialog, columns={"messages": "dialog"}) == _encode(tokenizer, _chat_records()[:1])


def test_format_detection():
    assert detect_format([{"instruction": "a", "output": "b"}], "d") == "alpaca"
    assert detect_format([{"prompt": "a", "completion": "b"}], "d") == "prompt_completion"
    assert detect_format([{"text": "a", "meta": 1}], "d") == "text"
    assert detect_format(_chat_records(), "d") == "messages"
    with pytest.raises(DataError, match="record 0 looks like text and record 1 like alpaca; set data.format"):
        detect_format([{"text": "a"}, {"instruction": "a", "output": "b"}], "d")
    with pytest.raises(DataError, match=r"record 0 \(answer, question\) matches no data format; set data.format"):
        detect_format([{"question": "a", "answer": "b"}], "d")


def test_bos_once_for_text_that_starts_with_it(tokenizer):
    ids, _ = tokenize_text(tokenizer, "<s>hi")
    assert ids.count(tokenizer.bos_token_id) == 1


# Bad input through the CLI: one line, non-zero exit, nothing written --------------------------------

SYSTEM, USER, ASSISTANT = ({"role": r, "content": "x"} for r in ("system", "user", "assistant"))


@pytest.mark.parametrize(
    "record, columns, fragment",
    [
        ({"messages": [SYSTEM, USER]}, {}, "record 0: no assistant turn"),
        ({"messages": [USER, ASSISTANT, ASSISTANT]}, {},
         "message 2: roles out of order, expected 'user', got 'assistant'"),
        ({"messages": [ASSISTANT, USER, ASSISTANT]}, {}, "message 0: roles out of order"),
        ({"messages": [USER, SYSTEM, ASSISTANT]}, {}, "message 1: roles out of order"),
        ({"messages": [USER, ASSISTANT, USER]}, {}, "ends with a user turn"),
        ({"messages": [{"role": "tool", "content": "x"}, ASSISTANT]}, {}, "message 0: unknown role 'tool'; roles are"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}, {},
         "turn 1: unknown 'from' value 'bot'; ShareGPT turns are from system, human, user, gpt, assistant"),
        ({"question": "q", "answer": "a"}, {"instruction": "question", "output": "reply"},
         "record 0: data.columns maps 'output' to 'reply', but the record has no 'reply' "
         "(its fields: answer, question)"),
    ],
)
def test_bad_records_fail_in_one_line_and_write_nothing(capsys, tmp_path, tiny_model_dir, record, columns, fragment):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(record) + "\n")
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(data), "columns": columns})
    assert cli.main(["prepare", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loralab: error:") and fragment in err, err
    assert not (tmp_path / "runs").exists()


def test_columns_naming_an_unknown_field_is_a_config_error(capsys, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data={"columns": {"answer": "reply"}})
    assert cli.main(["prepare", str(cfg)]) == 2
    assert "data.columns' maps unknown field 'answer'; loralab's field names are completion," in capsys.readouterr().err


# The stages on chat data ------------------------------------------------------------------------------

def test_prepare_and_inspect_name_the_format(capsys, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(SHAREGPT), "num_examples": None, "eval_size": 2})
    assert cli.main(["inspect", str(cfg), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert ("12 sharegpt examples (10 train, 2 eval)" in out and "</s>⟧" in out
            and "[OK     ] template round-trip" in out)
    assert cli.main(["prepare", str(cfg)]) == 0
    run = tmp_path / "runs" / "t"
    assert json.loads((run / "data" / "stats.json").read_text())["format"] == "sharegpt"
    assert json.loads((run / "manifest.json").read_text())["data_format"] == "sharegpt"
    first = json.loads((run / "data" / "train.jsonl").read_text().splitlines()[0])
    assert first["record"]["messages"][-1]["role"] == "assistant"
