"""The one exception type the CLI turns into a single line on stderr (no traceback), and the library notices it
hides."""

import functools
import re
import warnings


class LoralabError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting. The message says how."""


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def first_sentence(err: BaseException | str, limit: int = 200) -> str:
    """A library's error message quoted in a loralab line: its first sentence whole (without the final full stop),
    never cut inside a word. A sentence longer than ``limit`` ends at the last word that fits, marked "…"; a
    single word longer than that stays whole. An exception with no message is named by its type."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    sentence = _SENTENCE_END.split(text.splitlines()[0].strip(), maxsplit=1)[0]
    if len(sentence) > limit:
        cut = sentence.rfind(" ", 0, limit)
        if cut > 0:
            return sentence[:cut].rstrip(" ,;:([{") + "…"
    return sentence[:-1] if sentence.endswith(".") and not sentence.endswith("..") else sentence


def hide_library_deprecations(func):
    """Run ``func`` with the deprecation notices transformers, PEFT and accelerate raise inside it hidden: their
    renames are for loralab's maintainers to follow, not for the person training, who cannot act on them. The CLI
    hides them too; a caller's own calls to those libraries keep their notices."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|accelerate)(\.|$)")
            return func(*args, **kwargs)

    return wrapper
