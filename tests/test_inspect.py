"""`loralab inspect`: pure checks on crafted good and bad data, rendering, and the CLI on a tiny model."""

import json

import pytest
from conftest import write_config

from loralab import IGNORE_INDEX, cli
from loralab.commands.inspect_data import (
    PLAIN_CLOSE,
    PLAIN_OPEN,
    check_eos_trained,
    check_template_roundtrip,
    check_trained_tokens,
    check_truncation,
    format_histogram,
    length_histogram,
    render_example,
    run_checks,
    trained_runs,
)
from loralab.data import (
    ALPACA_PROMPT_WITH_INPUT,
    Encoded,
    encode_example,
    make_template,
    tokenize_text,
    validate_record,
)
from loralab.models.tiny import build_tiny_llama, train_tokenizer

RECORDS = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
    {"instruction": "Translate to French.", "input": "The cat sleeps.", "output": "Le chat dort."},
    {"instruction": "Give a synonym for happy.", "input": "", "output": "Joyful."},
    {"instruction": "What is two plus two?", "input": "", "output": "Two plus two is four."},
]
# The Alpaca prompt is in the tokenizer's training text so that its characters ('#') are in the alphabet.
TEXTS = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in RECORDS] * 4 + [ALPACA_PROMPT_WITH_INPUT]

# TinyLlama's template with the eos_token after the assistant turn left out (user turns keep theirs).
NO_EOS_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
# The generation prompt says "<|bot|>" but the assistant turn is rendered as "<|assistant|>".
MISMATCHED_TEMPLATE = NO_EOS_TEMPLATE.replace("{{ '<|assistant|>\n' }}{% endif %}\n", "").replace(
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}",
    "{% if loop.last and add_generation_prompt %}{{ '<|bot|>\n' }}",
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def records():
    return [validate_record(r, f"record {i}") for i, r in enumerate(RECORDS)]


def _encode(tokenizer, records, max_length=256):
    template = make_template(tokenizer, "chat")
    return template, [encode_example(tokenizer, template, r, max_length) for r in records]


def test_good_dataset_passes_every_check(tokenizer, records):
    template, examples = _encode(tokenizer, records)
    findings = run_checks(tokenizer, template, records, examples, 256)
    assert [f.check for f in findings] == ["trained tokens", "truncation", "EOS trained", "template round-trip"]
    assert all(f.status == "ok" for f in findings), findings


def test_alpaca_template_also_round_trips(tokenizer, records):
    template = make_template(tokenizer, "alpaca")
    examples = [encode_example(tokenizer, template, r, 256) for r in records]
    assert all(f.status == "ok" for f in run_checks(tokenizer, template, records, examples, 256))


def test_template_that_never_trains_eos_is_caught(records):
    """A naive pipeline on a template without EOS after the answer trains the response only."""
    tok = train_tokenizer(TEXTS, vocab_size=300, chat_template=NO_EOS_TEMPLATE)
    examples = []
    for r in records:
        user = [{"role": "user", "content": r["instruction"]}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": r["output"]}], tokenize=False)
        assert tok.eos_token not in full[len(prompt):]  # the template really leaves it out
        ids, offsets = tokenize_text(tok, full)
        start, end = len(prompt), len(prompt) + len(r["output"])
        labels = [t if a >= start and b <= end and b > a else IGNORE_INDEX
                  for t, (a, b) in zip(ids, offsets, strict=False)]
        examples.append(Encoded(ids, labels, truncated=False))
    finding = check_eos_trained(examples, tok.eos_token_id)
    assert finding.status == "error" and finding.indices == [0, 1, 2, 3]
    assert "will not learn to stop" in finding.message


def test_masked_eos_in_one_example_is_named(tokenizer, records):
    _, examples = _encode(tokenizer, records)
    bad = examples[2]
    last = max(i for i, x in enumerate(bad.labels) if x != IGNORE_INDEX)
    assert bad.labels[last] == tokenizer.eos_token_id
    examples[2] = Encoded(bad.input_ids, bad.labels[:last] + [IGNORE_INDEX] + bad.labels[last + 1:], False)
    finding = check_eos_trained(examples, tokenizer.eos_token_id)
    assert finding.status == "error" and finding.indices == [2] and "1 of 4" in finding.message


def test_truncation_that_removes_every_response(tokenizer, records):
    shortest_prompt = min(len(tokenize_text(tokenizer, make_template(tokenizer, "chat").prompt_text(r))[0])
                          for r in records)
    template, examples = _encode(tokenizer, records, max_length=shortest_prompt - 1)
    trained = check_trained_tokens(examples)
    assert trained.status == "error" and trained.indices == [0, 1, 2, 3]
    assert "lost their whole response to data.max_length" in trained.message
    cut = check_truncation(examples, shortest_prompt - 1)
    assert cut.status == "warning" and cut.indices == [0, 1, 2, 3] and "4 of 4" in cut.message
    assert check_eos_trained(examples, tokenizer.eos_token_id).status == "warning"  # nothing complete to check


def test_roundtrip_catches_a_prompt_that_is_not_a_prefix(records):
    tok = train_tokenizer(TEXTS, vocab_size=300, chat_template=MISMATCHED_TEMPLATE)
    template = make_template(tok, "chat")
    assert template.prompt_text(records[0]).endswith("<|bot|>\n")
    examples = [Encoded([1, 2], [IGNORE_INDEX, 2], False) for _ in records]
    finding = check_template_roundtrip(tok, template, records, examples)
    assert finding.status == "error" and finding.indices == [0, 1, 2, 3]
    assert "renders the prompt differently" in finding.message


def test_roundtrip_catches_a_response_boundary_off_by_one_token(tokenizer, records):
    template, examples = _encode(tokenizer, records)
    ex = examples[0]
    first = next(i for i, x in enumerate(ex.labels) if x != IGNORE_INDEX)
    examples[0] = Encoded(ex.input_ids, ex.labels[:first] + [IGNORE_INDEX] + ex.labels[first + 1:], False)
    finding = check_template_roundtrip(tokenizer, template, records, examples)
    assert finding.status == "error" and finding.indices == [0]
    assert "decode to" in finding.message


def test_render_marks_exactly_the_trained_text(tokenizer, records):
    _, examples = _encode(tokenizer, records)
    ex = examples[0]
    plain = render_example(tokenizer, ex.input_ids, ex.labels)
    assert plain.count(PLAIN_OPEN) == 1 and plain.count(PLAIN_CLOSE) == 1
    inside = plain[plain.index(PLAIN_OPEN) + 1: plain.index(PLAIN_CLOSE)]
    assert inside == "Red is a primary color." + tokenizer.eos_token
    assert (plain.replace(PLAIN_OPEN, "").replace(PLAIN_CLOSE, "")
            == tokenizer.decode(ex.input_ids, skip_special_tokens=False))
    coloured = render_example(tokenizer, ex.input_ids, ex.labels, color=True)
    assert "\x1b[1;32mRed is a primary color." in coloured and PLAIN_OPEN not in coloured
    assert trained_runs([IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX]) == [(0, 2, False), (2, 4, True),
                                                                               (4, 5, False)]


def test_length_histogram_bins():
    hist = length_histogram([1, 10, 11, 50, 100, 100], max_length=100, bins=10)
    assert hist[0] == (1, 10, 2) and hist[1] == (11, 20, 1) and hist[4] == (41, 50, 1) and hist[-1] == (91, 100, 2)
    assert sum(c for _, _, c in hist) == 6
    text = format_histogram(hist, truncated=2)
    assert text.splitlines()[-1].endswith("<- 2 cut at max_length") and "#" * 40 in text


def _cli_setup(tmp_path, **data):
    model_dir = build_tiny_llama(tmp_path / "model", TEXTS, vocab_size=300)
    data_file = tmp_path / "records.json"
    data_file.write_text(json.dumps(RECORDS * 3))
    return write_config(tmp_path / "exp.yaml", model={"name_or_path": str(model_dir)},
                        data={"path": str(data_file), "num_examples": 12, "eval_size": 2, **data})


def test_cli_inspect_prints_examples_checks_and_saves_histogram(tmp_path, capsys):
    cfg = _cli_setup(tmp_path)
    assert cli.main(["inspect", str(cfg), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example") == 2 and PLAIN_OPEN in out  # captured stdout is not a TTY: plain markers
    assert out.count("[OK     ]") == 4
    assert "length histogram" in out
    png = tmp_path / "runs" / "t" / "length_histogram.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inspect_fails_when_truncation_removes_every_response(tmp_path, capsys):
    cfg = _cli_setup(tmp_path, max_length=4)
    assert cli.main(["inspect", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert "[ERROR  ] trained tokens: 12 of 12 examples have no trained token" in captured.out
    assert captured.err.strip().splitlines()[-1].startswith(
        "loralab: error: inspect found 1 problem(s): trained tokens")
