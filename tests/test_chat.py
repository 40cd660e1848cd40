"""`loralab generate` and `loralab chat`: prompts built as in training, answers as in eval, streamed."""

import io
import json

import pytest

from loralab import cli
from loralab.commands.chat import SamplingSettings, chat, generate
from loralab.data import conversation_prompt_ids, make_template, prompt_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_one_user_turn_is_the_training_prompt_with_bos_first(tokenizer):
    template = make_template(tokenizer)
    record = {"instruction": "Name three colors.", "input": "", "output": ""}
    ids = conversation_prompt_ids(tokenizer, template, [{"role": "user", "content": record["instruction"]}])
    assert ids == prompt_ids(tokenizer, template, record)
    # The tiny chat template (TinyLlama's) writes no BOS; training puts one first, so inference does too.
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_later_turns_follow_the_chat_template(tokenizer):
    template = make_template(tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    ids = conversation_prompt_ids(tokenizer, template, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def test_alpaca_template_conversations(tokenizer):
    template = make_template(tokenizer, "alpaca")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    ids = conversation_prompt_ids(tokenizer, template, messages)
    first = template.prompt_text({"instruction": "Hi", "input": "", "output": ""})
    last = template.prompt_text({"instruction": "Bye", "input": "", "output": ""})
    assert tokenizer.decode(ids[1:]) == first + "Hello!" + tokenizer.eos_token + last


def test_generate_answers_exactly_as_eval(trained_run):
    """Greedy generate on the run gives eval's LoRA answers (the same prompt ids, fp32, greedy)."""
    _, rd = trained_run
    predictions = [json.loads(x) for x in (rd / "predictions.jsonl").read_text().splitlines()]
    chosen = [p for p in predictions if not p["input"]][:3]
    out = io.StringIO()
    rows = generate(str(rd), [p["instruction"] for p in chosen], None, SamplingSettings(max_new_tokens=8), out=out)
    assert [r["lora"] for r in rows] == [p["lora"] for p in chosen]
    # Streaming printed the same text as it came.
    for row in rows:
        assert row["lora"] in out.getvalue()


def test_compare_answers_with_base_and_lora(trained_run):
    _, rd = trained_run
    predictions = [json.loads(x) for x in (rd / "predictions.jsonl").read_text().splitlines()]
    chosen = [p for p in predictions if not p["input"]][:2]
    out = io.StringIO()
    rows = generate(str(rd), [p["instruction"] for p in chosen], None,
                    SamplingSettings(max_new_tokens=8, compare=True), out=out)
    assert [(r["base"], r["lora"]) for r in rows] == [(p["base"], p["lora"]) for p in chosen]
    assert out.getvalue().count("[base] ") == 2 and out.getvalue().count("[lora] ") == 2


def test_sampling_is_seeded(trained_run):
    _, rd = trained_run
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first = generate(str(rd), ["Name a fruit."], None, settings, out=io.StringIO())
    again = generate(str(rd), ["Name a fruit."], None, settings, out=io.StringIO())
    assert first == again


@pytest.fixture
def answered(monkeypatch):
    """The messages of each answer chat asks for (their contents, oldest first), the answers still made."""
    from loralab.commands import chat as chat_module
    seen = []
    original = chat_module.Responder.answer

    def spy(self, messages, side, out=None):
        seen.append([m["content"] for m in messages])
        return original(self, messages, side, out)

    monkeypatch.setattr(chat_module.Responder, "answer", spy)
    return seen


def test_chat_keeps_the_conversation_and_resets(trained_run, answered):
    _, rd = trained_run
    out = io.StringIO()
    chat(str(rd), SamplingSettings(max_new_tokens=4), stdin=io.StringIO("Hello\nAnd then?\n/reset\nAgain\n"), out=out)
    assert [len(m) for m in answered] == [1, 3, 1]
    assert answered[1][0] == "Hello" and answered[1][2] == "And then?" and answered[2] == ["Again"]
    assert out.getvalue().count("lora> ") == 3 and "(new conversation)" in out.getvalue()


@pytest.mark.parametrize("quit_line", ["/exit", "/quit", "/bye"])
def test_chat_answers_no_command_as_a_message(trained_run, answered, quit_line):
    _, rd = trained_run
    out = io.StringIO()
    stdin = io.StringIO(f"/help\n/?\n/usr/bin is a folder?\n{quit_line}\nNever sent\n")
    chat(str(rd), SamplingSettings(max_new_tokens=4), stdin=stdin, out=out)
    # a path is a message; /help and /? are not, nor anything after the quit
    assert answered == [["/usr/bin is a folder?"]]
    assert "(unknown command /help: /reset starts a new conversation, /exit quits)" in out.getvalue()
    assert "(unknown command /?: " in out.getvalue()


def test_generate_from_a_model_folder_and_from_a_file(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a color.\n\nName a fruit.\n")
    assert cli.main(["generate", str(tiny_model_dir), "--file", str(prompts), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count(">>> ") == 2


@pytest.mark.parametrize("argv, fragment", [
    (["--compare"], "--compare needs a run"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--file", "/nonexistent/prompts.txt"], "cannot read prompts"),
])
def test_bad_generate_flags_fail_cleanly(tiny_model_dir, capsys, argv, fragment):
    assert cli.main(["generate", str(tiny_model_dir), "Hi", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loralab: error:") and fragment in err, err
