"""User-facing errors: one clear line, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config, bad data, missing file).

    The CLI prints ``str(error)`` on one line and exits with status 2. The message names the
    file, line or key at fault, what is wrong and how to fix it. A message that quotes a
    multi-line text (a parser's error, say) is joined into one line here.
    """

    def __init__(self, message: object = "") -> None:
        text = str(message)
        lines = text.splitlines()
        super().__init__(text if lines == [text] else " ".join(part.strip() for part in lines if part.strip()))


def where(path: object, line: int | None = None) -> str:
    """Format a location ``file:line`` for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
