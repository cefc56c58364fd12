"""Loading ``torch.distributed.checkpoint`` folders without running code from them.

PyTorch's own reader unpickles the checkpoint's ``.metadata`` file with plain ``pickle`` and its
default planner reads every non-tensor item with ``torch.load(weights_only=False)``: a crafted
checkpoint folder would run its payload on resume. :class:`SafeReader` unpickles the metadata with
an allow-list of the classes a DCP metadata file is made of (its dataclasses and enums, ``torch.Size``,
dtypes, layouts, paths), and :class:`SafePlanner` reads non-tensor items with ``weights_only=True``;
anything else in either file is refused with :class:`UnsafeCheckpointError`, never built.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A distributed checkpoint holds an object outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            # only the classes the module itself defines (its dataclasses and enums), not what it imports
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout  # maps a layout's name to the layout
        elif module == "pathlib" and name in _PATHS:
            import pathlib

            return getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise UnsafeCheckpointError(f"refused {module}.{name}: not part of a checkpoint's metadata")


def read_metadata_file(path: str | Any) -> Any:
    """Unpickle a DCP ``.metadata`` file through the allow-list (raises :class:`UnsafeCheckpointError`)."""
    with open(path, "rb") as fh:
        return _MetadataUnpickler(fh).load()


def unsafe_cause(e: BaseException) -> UnsafeCheckpointError | None:
    """The :class:`UnsafeCheckpointError` behind ``e``, which DCP wraps per rank in a
    ``CheckpointException`` (its ``failures``: rank -> (exception, traceback))."""
    if isinstance(e, UnsafeCheckpointError):
        return e
    for failure in (getattr(e, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, UnsafeCheckpointError):
            return inner
    return None


class SafeReader(FileSystemReader):
    """A :class:`FileSystemReader` whose metadata is unpickled through the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank")) if hasattr(self, "_get_metadata_path") \
            else self.fs.concat_path(self.path, ".metadata")  # torch < 2.7 names no per-rank metadata
        with self.fs.create_stream(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """The default load planner, with every non-tensor item first read by ``torch.load(weights_only=True)``:
    only when that succeeds (the bytes hold nothing but tensors and plain values) does the default
    reading run on the same bytes, which then builds the same plain objects."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refused item {read_item.dest_index.fqn}: {str(e).strip().splitlines()[-1][:200]}") from None
        value.seek(0)
        super().load_bytes(read_item, value)
