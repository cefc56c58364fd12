"""Training methods: each a small module that builds batches and per-token loss terms."""

from __future__ import annotations

from minillm.errors import UserError
from minillm.methods import kd as _kd  # noqa: F401  (registers "kd")
from minillm.methods import minillm as _minillm  # noqa: F401  (registers "minillm")
from minillm.methods import seqkd as _seqkd  # noqa: F401  (registers "seqkd")
from minillm.methods import sft as _sft  # noqa: F401  (registers "sft")
from minillm.methods.base import METHODS, Experience, Method, Term, register_method


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; an unknown name lists the options."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"method: unknown method {name!r}; choose one of {sorted(METHODS)}") from None


__all__ = ["METHODS", "Experience", "Method", "Term", "get_method", "register_method"]
