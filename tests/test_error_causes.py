"""Errors name the cause (issue 26): a config value the library rejects is that config key being wrong, never damaged
files; library text is quoted a whole sentence at a time, never cut inside a word; no library warning line comes
before loralab's own error line; and a damaged manifest.json is moved aside and rebuilt from the run's files, the
finished adapter kept.

Each CLI case works on a copy of test_reliability's finished tiny run and checks the exit code, exactly one stderr
line naming the cause, and that the run directory's files are as they were (sha256 before and after).
"""

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import pytest
import test_reliability as reliability
from test_reliability import RUN, _cfg, assert_one_line, tree_hashes

from loralab import cli
from loralab.errors import first_sentence
from loralab.models import loading

DAMAGED = "manifest.json.damaged"
# test_reliability's fixtures: `finished` (its finished tiny run, built once) and `work` (a private copy of it, the
# working directory of the case).
finished, work = reliability.finished, reliability.work


@pytest.fixture
def library_lines():
    """Every log record transformers emits during the test (what its own handler would print)."""
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def refused(argv: list[str], capsys, fragment: str) -> tuple[str, str]:
    """Run the command; it must exit 2 with exactly one stderr line holding ``fragment``. (that line, stdout)"""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(argv) == 2
    captured = capsys.readouterr()
    line = assert_one_line(captured.err, fragment)
    library = [w for w in caught if "site-packages" in str(w.filename)]
    assert not library, [str(w.message) for w in library]
    assert "[transformers]" not in captured.out + captured.err
    return line, captured.out


def assert_quotes_whole(line: str, library_text: str) -> None:
    """The library text quoted in ``line`` (up to the ``); `` after it) is whole sentences or ends at a word
    boundary marked "…": never cut inside a word."""
    start = line.index(library_text[:24])
    quoted = line[start:line.index("); ", start)]
    body = quoted.removesuffix("…")
    assert library_text.startswith(body), (quoted, library_text)
    follows = library_text[len(body):len(body) + 1]
    assert follows in ("", ".", " ", "\n") or quoted.endswith("…"), (quoted, library_text)
    assert not quoted.endswith("…") or follows == " ", (quoted, library_text)


# ---------------------------------------------------------------------------------------------------
# first_sentence: the one way loralab quotes a library's message.

@pytest.mark.parametrize("text, limit, expected", [
    ('Specified `attn_implementation="bogus"` is not supported. The only possible arguments are `"eager"`', 200,
     'Specified `attn_implementation="bogus"` is not supported'),
    ("has model type `x` but Transformers does not recognize this architecture. This could be because of your "
     "version of Transformers", 200, "has model type `x` but Transformers does not recognize this architecture"),
    ("first line\nsecond line", 200, "first line"),
    ("one two three four", 12, "one two…"),
    ("one two, three four", 14, "one two…"),
    ("x" * 50, 10, "x" * 50),  # a single word is never cut
    ("version 5.25.0 is too old", 200, "version 5.25.0 is too old"),
    ("", 200, ""),
])
def test_first_sentence_ends_at_a_sentence_or_a_word(text, limit, expected):
    assert first_sentence(text, limit) == expected


def test_first_sentence_of_an_empty_error_is_its_type():
    assert first_sentence(KeyError()) == "KeyError"
    assert first_sentence(ValueError("  \n ")) == "ValueError"


# ---------------------------------------------------------------------------------------------------
# A config value the library rejects is that setting, never damaged files.

@pytest.mark.parametrize("command", ["train", "prepare", "run", "plan", "eval", "report"])
def test_an_unknown_attention_backend_is_the_setting(work, capsys, library_lines, command):
    before = tree_hashes(work / RUN)
    line, _ = refused(_cfg(command, "model.attn_implementation=bogus"), capsys, "model.attn_implementation")
    assert "'bogus'" in line and "sdpa" in line and "eager" in line
    assert "damaged" not in line and "download" not in line
    assert tree_hashes(work / RUN) == before
    assert not library_lines


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_a_backend_the_library_cannot_load_is_the_setting(work, capsys, library_lines):
    """flash_attention_2 passes the config check; transformers refuses it at load (no flash_attn package): the
    error names model.attn_implementation and quotes transformers' first sentence whole."""
    before = tree_hashes(work / RUN)
    line, _ = refused(_cfg("train", "model.attn_implementation=flash_attention_2"), capsys,
                      "config key 'model.attn_implementation' is 'flash_attention_2'")
    assert "damaged" not in line and "download the model" not in line and '"sdpa"' in line
    assert_quotes_whole(line, "FlashAttention2 has been toggled on, but it cannot be used due to the following "
                              "error: the package for FlashAttention2 doesn't seem to be installed.")
    assert tree_hashes(work / RUN) == before
    assert not library_lines


def _unknown_model_type(w: Path) -> None:
    config = w / "model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "llamazz"}))


@pytest.mark.parametrize("argv", [_cfg("train"), _cfg("prepare") + ["--force"], _cfg("inspect"),
                                  ["generate", "model", "Hi"]], ids=["train", "prepare", "inspect", "generate"])
def test_an_unknown_model_type_is_named_before_any_library_line(work, capsys, library_lines, argv):
    _unknown_model_type(work)
    before = tree_hashes(work / RUN)
    line, _ = refused(argv, capsys, "model_type 'llamazz'")
    assert "config.json" in line and "transformers" in line and "damaged" not in line
    assert "your version of" not in line  # no library text cut mid-sentence
    assert tree_hashes(work / RUN) == before
    assert not library_lines


def test_library_lines_pass_when_the_load_succeeds_and_drop_when_it_fails(library_lines):
    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with loading._library_notes_held():
            hf_logging.get_logger("transformers.some_module").warning("kept: the load succeeded")
            warnings.warn("kept too", UserWarning, stacklevel=1)
        with pytest.raises(RuntimeError), loading._library_notes_held():
            hf_logging.get_logger("transformers.some_module").warning("dropped: the load failed")
            warnings.warn("dropped too", UserWarning, stacklevel=1)
            raise RuntimeError("load failed")
    assert [r.getMessage() for r in library_lines] == ["kept: the load succeeded"]
    assert [str(w.message) for w in shown] == ["kept too"]


# ---------------------------------------------------------------------------------------------------
# A damaged manifest.json: moved aside and rebuilt from the run's files; nothing finished is lost.

def _damage(w: Path, data: bytes = b"{") -> dict[str, str]:
    (w / RUN / "manifest.json").write_bytes(data)
    return tree_hashes(w / RUN)


def _manifest(w: Path) -> dict:
    return json.loads((w / RUN / "manifest.json").read_text())


def assert_kept(before: dict[str, str], w: Path, damaged: bytes = b"{") -> None:
    """Every file but manifest.json is as it was; the damaged manifest is kept beside the rebuilt one."""
    after = tree_hashes(w / RUN)
    assert {k: v for k, v in after.items() if k != "manifest.json" and k != DAMAGED} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert (w / RUN / DAMAGED).read_bytes() == damaged


@pytest.mark.parametrize("command, fragment", [
    ("report", "its 'prepare' stage could not be verified after a damaged manifest.json was rebuilt"),
    ("eval", "the last train could not be verified after a damaged manifest.json was rebuilt"),
])
@pytest.mark.parametrize("damaged", [b"{", b"[]", b'{"stages": []}', b"\xff\xfe"], ids=["junk", "list", "stages",
                                                                                       "binary"])
def test_a_damaged_manifest_is_rebuilt_and_explained_in_one_line(work, capsys, command, fragment, damaged):
    before = _damage(work, damaged)
    line, out = refused(_cfg(command), capsys, fragment)
    assert "loralab run CONFIG" in line and "delete" not in line
    assert f"moved it to {DAMAGED} and rebuilt it" in out and "its adapter is whole and kept" in out
    assert_kept(before, work, damaged)
    stages = _manifest(work)["stages"]
    assert {s: r["status"] for s, r in stages.items()} == dict.fromkeys(("prepare", "train", "eval"), "unverified")


def test_after_a_rebuild_run_keeps_the_adapter_and_redoes_the_rest(work, finished, capsys):
    before = _damage(work)
    assert cli.main(_cfg("run")) == 0
    out = capsys.readouterr().out
    assert "train: up to date (step 4" in out and "trainable params" not in out  # nothing trained again
    assert "eval: 2 held-out prompts" in out and "report:" in out
    adapter = {k: v for k, v in before.items() if k.startswith("adapter/")}
    assert adapter and adapter == {k: v for k, v in tree_hashes(work / RUN).items() if k.startswith("adapter/")}
    assert (work / RUN / DAMAGED).read_bytes() == b"{"
    assert {s: r["status"] for s, r in _manifest(work)["stages"].items()} == \
        dict.fromkeys(("prepare", "train", "eval", "report"), "done")
    assert cli.main(_cfg("eval")) == 0 and "eval: up to date" in capsys.readouterr().out


def test_train_confirms_the_adapter_by_its_recorded_hash(work, capsys):
    """train's hash, read from the adapter's completion marker, is this config's: train and prepare (whose hash
    train's chains) are done again without training; eval, which nothing verifies, stays to be redone."""
    before = _damage(work)
    assert cli.main(_cfg("train")) == 0
    assert "train: up to date (step 4" in capsys.readouterr().out
    assert_kept(before, work)
    stages = _manifest(work)["stages"]
    assert [stages[s]["status"] for s in ("prepare", "train", "eval")] == ["done", "done", "unverified"]
    assert stages["train"]["inputs"]["lora.r"] == 8 and stages["prepare"]["hash"]


def test_an_adapter_from_another_config_is_not_trusted(work, capsys):
    """The adapter's recorded hash is not the one of a config with another lora.r: nothing is marked done, the
    command refuses in one line, and the adapter stays."""
    before = _damage(work)
    line, _ = refused(_cfg("train", "lora.r=4"), capsys, "the last prepare could not be verified")
    assert "loralab run CONFIG" in line
    assert_kept(before, work)
    assert _manifest(work)["stages"]["train"]["status"] == "unverified"


def test_a_second_damage_keeps_the_first_copy(work, capsys):
    _damage(work, b"{")
    refused(_cfg("report"), capsys, "manifest.json")
    _damage(work, b"[")
    _, out = refused(_cfg("report"), capsys, "manifest.json")
    assert f"{DAMAGED}-2" in out
    assert (work / RUN / DAMAGED).read_bytes() == b"{" and (work / RUN / f"{DAMAGED}-2").read_bytes() == b"["
