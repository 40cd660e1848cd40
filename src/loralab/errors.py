"""The one exception type the CLI turns into a single line on stderr (no traceback), and the library notices it
hides."""

import functools
import warnings


class LoralabError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting. The message says how."""


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
