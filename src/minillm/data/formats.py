"""Instruction records from JSONL files or Hugging Face datasets, validated with file and line.

Accepted record shapes (field aliases in parentheses):

* Dolly: ``instruction``, optional ``context`` (``input``), ``response`` (``output``).
* Pairs: ``prompt``, ``response`` (``completion``, ``output``).
* Chat: ``messages`` = [{"role": ..., "content": ...}, ...]; the last assistant turn is the response.
* Several references: ``references`` (a list of strings) beside or instead of ``response``.

``data.columns`` maps these field names onto other column names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.errors import UserError


@dataclass
class Example:
    """One instruction example. ``references`` holds every acceptable answer (response first)."""

    instruction: str
    context: str = ""
    response: str | None = None
    references: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None  # chat turns before the response
    source: str = ""  # file:line, for error messages
    meta: dict[str, Any] = field(default_factory=dict)


_ALIASES = {
    "instruction": ("instruction", "prompt", "question"),
    "context": ("context", "input"),
    "response": ("response", "output", "completion", "answer"),
}


def _text(value: Any, where: str, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")


def record_to_example(rec: Any, where: str, columns: dict[str, str] | None = None) -> Example:
    """Turn one raw record into an :class:`Example`, or raise a :class:`UserError` naming ``where``."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    columns = columns or {}

    def get(name: str) -> tuple[str | None, Any]:
        for key in dict.fromkeys((name, *_ALIASES.get(name, ()))):  # data.columns may use an alias: prompt -> q
            if key in columns:
                col = columns[key]
                if col not in rec:
                    raise UserError(f"{where}: column {col!r} (data.columns.{key}) is missing; fields: {sorted(rec)}")
                return col, rec[col]
        for alias in _ALIASES.get(name, (name,)):
            if alias in rec:
                return alias, rec[alias]
        return None, None

    _, messages = get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise UserError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
        msgs = [{"role": str(m["role"]), "content": _text(m["content"], where, "content")} for m in messages]
        response = None
        if msgs and msgs[-1]["role"] == "assistant":
            response = msgs[-1]["content"]
            msgs = msgs[:-1]
        users = [m for m in msgs if m["role"] == "user"]
        if not users:
            raise UserError(f"{where}: 'messages' has no user turn to answer")
        return Example(
            instruction=users[-1]["content"],
            response=response,
            references=[response] if response is not None else [],
            messages=msgs,
            source=where,
        )

    name, instruction = get("instruction")
    if name is None:
        raise UserError(
            f"{where}: no prompt field; expected 'instruction' (Dolly), 'prompt' or 'messages'; "
            f"found {sorted(rec)} (map other names with data.columns)"
        )
    _, context = get("context")
    rname, response = get("response")
    _, refs = get("references")
    references: list[str] = []
    if isinstance(response, list):  # S-NI style: several outputs
        references = [_text(r, where, rname or "response") for r in response]
        response = references[0] if references else None
    elif response is not None:
        response = _text(response, where, rname or "response")
        references = [response]
    if refs is not None:
        if not isinstance(refs, list):
            raise UserError(f"{where}: 'references' must be a list of strings")
        references = [_text(r, where, "references") for r in refs] or references
        if response is None and references:
            response = references[0]
    return Example(
        instruction=_text(instruction, where, name),
        context=_text(context, where, "context"),
        response=response,
        references=references,
        source=where,
    )


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; bad JSON names its line."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def load_records(source: str, split: str = "train", allow_object: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) from a JSONL / JSON file, a saved dataset folder or a Hub dataset.

    ``allow_object``: a ``.json`` file may hold one record object instead of a list (a raw
    natural-instructions task file); training data keeps refusing it."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if isinstance(data, dict) and allow_object:
                yield str(path), data
                return
            if not isinstance(data, list):
                raise UserError(f"{path}: a .json data file must hold a list of records (or use JSONL)")
            for i, rec in enumerate(data):
                yield f"{path}[{i}]", rec
            return
        for lineno, rec in iter_jsonl(path):
            yield f"{path}:{lineno}", rec
        return
    if not path.exists() and path.suffix in (".jsonl", ".json"):  # a file name, not a Hub id: do not ask the Hub
        raise UserError(f"{path}: data file not found")
    if path.is_dir() and not _is_saved_dataset(path):
        raise UserError(f"{path}: a folder that is not a saved Hugging Face dataset (no dataset_info.json)")
    yield from _load_hf(source, split)


def _load_hf(source: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise UserError(f"{source}: reading Hugging Face datasets needs the 'datasets' package") from e
    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        if not path.exists() and "/" not in source:
            raise UserError(f"{source}: no such file, and not a Hugging Face dataset id") from None
        raise UserError(f"{source}: could not load the dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{source}: no split {split!r}; available: {sorted(ds)} (set data.split)")
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield f"{source}[{split}][{i}]", rec


def read_examples(source: str, split: str = "train", columns: dict[str, str] | None = None) -> list[Example]:
    """Read and validate every record of ``source`` into :class:`Example` objects."""
    out = [record_to_example(rec, where, columns) for where, rec in load_records(source, split)]
    if not out:
        raise UserError(f"{source}: no records found")
    return out
