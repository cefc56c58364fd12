"""Raw records from a JSONL / JSON file, a saved dataset folder or a Hub dataset.

Every way a file can be unreadable ends in one :class:`~minillm.errors.UserError` naming the file
and line (:mod:`minillm.textio`); a UTF-8 byte-order mark is skipped. A missing file or an
unreachable Hub dataset is reported before anything is read (:func:`check_data_source`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minillm.errors import UserError
from minillm.hub import check_hub_id
from minillm.textio import decode_utf8, parse_json

# suffixes that name a file, never a Hub dataset id: a missing one is reported at once
DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet", ".arrow")


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; a bad line names its number."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = decode_utf8(raw, path, lineno)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                yield lineno, parse_json(line, f"{path}:{lineno}")


def read_json_file(path: Path) -> Any:
    """A whole ``.json`` file; a syntax error names its line."""
    return parse_json(decode_utf8(path.read_bytes(), path).removeprefix("\ufeff"), str(path), whole_file=True)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def check_data_source(source: str, key: str | None = None) -> None:
    """Refuse a source that cannot be read: a missing file, a folder that is not a saved dataset,
    or a name that is neither a local path nor a Hub dataset that can be reached now."""
    path = Path(source)
    where = f"{key}: {source}" if key else source
    if path.is_file():
        return
    if path.is_dir():
        if not is_saved_dataset(path):
            raise UserError(f"{where}: a folder that is not a saved Hugging Face dataset (no dataset_info.json); give a JSONL file")
        return
    if path.suffix in DATA_SUFFIXES:  # a file name, not a Hub id: do not ask the Hub
        raise UserError(f"{where}: data file not found")
    check_hub_id(source, key or "data", repo_type="dataset", missing="no such file")


def load_records(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) from a JSONL file, a ``.json`` file (a list of records, or one
    record such as a raw natural-instructions task file), a saved dataset folder or a Hub dataset."""
    check_data_source(source)
    path = Path(source)
    if path.is_file():
        if path.suffix == ".json":
            data = read_json_file(path)
            if isinstance(data, dict):
                yield str(path), data
                return
            if not isinstance(data, list):
                raise UserError(f"{path}: a .json data file must hold a list of records or one record object (or use JSONL)")
            for i, rec in enumerate(data):
                yield f"{path}[{i}]", rec
            return
        for lineno, rec in iter_jsonl(path):
            yield f"{path}:{lineno}", rec
        return
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
        raise UserError(f"{source}: could not load the dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{source}: no split {split!r}; available: {sorted(ds)} (set data.split)")
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield f"{source}[{split}][{i}]", rec
