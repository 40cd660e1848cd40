"""The one exception type the CLI turns into a single line on stderr (no traceback)."""


class LoralabError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting. The message says how."""
