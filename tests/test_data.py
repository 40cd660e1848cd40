import pytest
from transformers import AutoTokenizer

from loralab import IGNORE_INDEX
from loralab.data import (
    DataError,
    encode_example,
    encode_split,
    make_template,
    prompt_ids,
    select_and_split,
    tokenize_text,
    user_message,
    validate_record,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _trained(enc):
    return [t for t, l in zip(enc.input_ids, enc.labels, strict=False) if l != IGNORE_INDEX]


def test_every_real_example_trains_exactly_response_and_eos(tokenizer, alpaca_records):
    template = make_template(tokenizer)
    assert template.kind == "chat"
    for i, raw in enumerate(alpaca_records):
        record = validate_record(raw, f"record {i}")
        enc = encode_example(tokenizer, template, record, max_length=10_000)
        # The ids are those of tokenising the whole conversation at once (BOS + rendered text).
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(record)}, {"role": "assistant", "content": record["output"]}],
            tokenize=False,
        )
        assert enc.input_ids == tokenizer(full).input_ids, i
        # The trained tokens decode to the response followed by EOS (after the newline that ends
        # the generation prompt "<|assistant|>\n", which the prompt already holds).
        decoded = tokenizer.decode(_trained(enc), skip_special_tokens=False)
        assert decoded == record["output"] + tokenizer.eos_token, i
        # Labels equal ids where trained, and the prompt (as fed at generation time) is untrained.
        n_prompt = len(prompt_ids(tokenizer, template, record))
        assert enc.input_ids[:n_prompt] == prompt_ids(tokenizer, template, record)
        assert all(l == IGNORE_INDEX for l in enc.labels[:n_prompt])
        assert all(l in (IGNORE_INDEX, t) for t, l in zip(enc.input_ids, enc.labels, strict=False))


def test_alpaca_template_when_tokenizer_has_none(tokenizer):
    template = make_template(tokenizer, "alpaca")
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    text, [(start, end)] = template.render(record)
    assert "### Input:\n2 and 3" in text and text[start:end] == "5" + tokenizer.eos_token
    enc = encode_example(tokenizer, template, record, 512)
    assert tokenizer.decode(_trained(enc)) == "5" + tokenizer.eos_token


def test_user_turn_puts_input_after_a_blank_line():
    assert user_message({"instruction": "Do X.", "input": "data", "output": ""}) == "Do X.\n\ndata"
    assert user_message({"instruction": "Do X.", "input": "", "output": ""}) == "Do X."


def test_truncation_cuts_the_response_end_and_drops_untrainable(tokenizer):
    template = make_template(tokenizer)
    record = {"instruction": "Tell me a story.", "input": "", "output": "Once upon a time " * 40}
    n_prompt = len(prompt_ids(tokenizer, template, record))
    enc = encode_example(tokenizer, template, record, n_prompt + 5)
    assert enc.truncated and len(enc.input_ids) == n_prompt + 5
    assert len(_trained(enc)) == 5 and tokenizer.eos_token_id not in _trained(enc)
    examples, stats = encode_split(tokenizer, template, [record, record], max_length=n_prompt)
    assert examples == [] and stats["dropped"] == 2 and stats["truncated"] == 2


def test_split_is_seeded_and_disjoint():
    a = select_and_split(999, 100, 10, seed=1)
    assert a == select_and_split(999, 100, 10, seed=1)
    assert a != select_and_split(999, 100, 10, seed=2)
    train, held = a
    assert len(train) == 90 and len(held) == 10 and not set(train) & set(held)
    assert select_and_split(5, 100, 2, seed=0)[0].__len__() == 3


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"input": "", "output": "x"}, "missing 'instruction'"),
        ({"instruction": "x"}, "missing 'output'"),
        ({"instruction": "x", "output": 3}, "'output' must be a string"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, "'input' must be a string"),
        ("just text", "expected an object"),
    ],
)
def test_malformed_records_are_named(record, fragment):
    with pytest.raises(DataError, match="record 7") as err:
        validate_record(record, "record 7")
    assert fragment in str(err.value)


def test_bos_is_added_once(tokenizer):
    ids, offsets = tokenize_text(tokenizer, "<s>hello")
    assert ids.count(tokenizer.bos_token_id) == 1
    ids, _ = tokenize_text(tokenizer, "hello")
    assert ids[0] == tokenizer.bos_token_id
