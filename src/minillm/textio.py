"""Reading text users wrote: every failure is one :class:`~minillm.errors.UserError` with file and line.

Bytes that are not UTF-8, JSON that does not parse or nests deeper than Python's parser allows, and
strings holding a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but not valid Unicode:
tokenizers and UTF-8 writers fail on it later, far from the file).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from minillm.errors import UserError

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a surrogate gets into JSON text


def decode_utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """``raw`` as UTF-8 text; bad bytes name the line they are on (counted from ``first_line``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def _surrogate_at(obj: Any) -> str | None:
    """The field path of the first string holding a lone surrogate, or None (iterative: any depth)."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        at, node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return at or "the record"
        elif isinstance(node, dict):
            for k, v in node.items():
                stack.append((f"{at}.{k}" if at else str(k), v))
                stack.append((f"the key of {at}.{k}" if at else f"key {k!r}", k))
        elif isinstance(node, list):
            stack.extend((f"{at}[{i}]", v) for i, v in enumerate(node))
    return None


def parse_json(text: str, where: str, whole_file: bool = False) -> Any:
    """``json.loads`` whose every failure is a :class:`UserError` naming ``where`` (plus the line
    of a syntax error in a ``whole_file``)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if whole_file:
            raise UserError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
        raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON object") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested deeper than Python's parser allows (about {sys.getrecursionlimit()} levels)") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise UserError(f"{where}: unreadable JSON value ({e})") from None
    if _SURROGATE_ESCAPE.search(text) and (at := _surrogate_at(obj)) is not None:
        raise UserError(f"{where}: {at} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not valid Unicode; fix or drop it")
    return obj
