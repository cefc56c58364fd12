"""minillm: on-policy reverse-KL distillation of causal language models (MiniLLM, Gu et al., ICLR 2024).

The command line (``minillm``, :mod:`minillm.cli`) is the front door. The library's pieces, in the
order data flows: :mod:`minillm.config` -> :mod:`minillm.data` and :mod:`minillm.models` ->
:mod:`minillm.decoding` -> :mod:`minillm.losses` and :mod:`minillm.methods` -> :mod:`minillm.trainer`
(:mod:`minillm.tracking` beside it) -> :mod:`minillm.checkpoint` -> :mod:`minillm.eval` ->
:mod:`minillm.report`; :mod:`minillm.sweep` drives training, evaluation and the report over a grid of
runs. Importing the package imports none of them (torch and transformers load only when a module that
needs them is imported).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("minillm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
