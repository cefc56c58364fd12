"""Trainer state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder is something people copy around and hand to each other, so loading one must
never run code. ``torch.save`` / ``pickle`` can (a crafted ``__reduce__`` runs on load); safetensors
and JSON cannot. :func:`save_state` splits a nested state (optimizer, scheduler, RNG states, data
positions, unfinished PPO experience) into ``NAME.json`` (the structure, with tagged references to
tensors) and ``NAME.safetensors`` (the tensors); :func:`load_state` rebuilds it.

What a state may hold: ``None``, bools, ints, floats (non-finite ones too), strings, lists, tuples,
dicts (any of these as keys), ``torch.Tensor`` and ``numpy.ndarray`` (NumPy's RNG state). Anything
else is a programming error and raises ``TypeError`` when saving; a class is never stored, so
nothing but these types can come back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "minillm-state-1"
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else {"__float__": repr(x)}  # 'nan', 'inf', '-inf': strict JSON
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        t = obj.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (and a CPU tensor would alias the live state)
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        tensors[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state (only tensors, arrays, "
                    "numbers, strings, lists, tuples and dicts)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "__tensor__" or tag == "__ndarray__":
            if val not in tensors:
                raise ValueError(f"{where}: refers to tensor {val!r}, which the .safetensors file lacks")
            return tensors[val] if tag == "__tensor__" else tensors[val].numpy()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, where) for v in val)
        if tag == "__dict__":
            return {_hashable(_decode(k, tensors, where)): _decode(v, tensors, where) for k, v in val}
        if tag == "__float__":
            return float(val)
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def _write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)``, fsync, then rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def state_files(folder: Path, name: str) -> tuple[Path, Path]:
    """The two files of state ``name`` in ``folder``: (structure ``.json``, tensors ``.safetensors``)."""
    return folder / f"{name}.json", folder / f"{name}.safetensors"


def save_state(state: Any, folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``state`` as ``folder/NAME.json`` + ``folder/NAME.safetensors``; return both paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "state": _encode(state, tensors, set())}
    js, st = state_files(folder, name)
    _write(st, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    _write(js, lambda p: p.write_text(json.dumps(doc, allow_nan=False)))
    return js, st


def load_state(folder: str | Path, name: str) -> Any:
    """Read a state written by :func:`save_state`. Raises ``ValueError`` (naming the file) when a
    file is missing, cut short or not one of ours; nothing in either file can run code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    js, st = state_files(Path(folder), name)
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{js}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{js}: not a readable state file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise ValueError(f"{js}: not a minillm state file (expected format {FORMAT!r})")
    try:
        tensors = load_file(str(st))
    except FileNotFoundError:
        raise ValueError(f"{st}: missing") from None
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{st}: not a readable safetensors file ({str(e)[:120]})") from None
    return _decode(doc["state"], tensors, str(js))
