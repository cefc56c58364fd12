"""Atomic checkpoints: written to a temp folder, then renamed; a crash never leaves half of one.

``output_dir/checkpoints/step_00000100/`` holds ``model/`` (Hugging Face format, loadable as is)
and the trainer state (optimizer, scheduler, RNG states, the method's data position and any
unfinished rollout experience) as ``trainer_state.json`` + ``trainer_state.safetensors``
(:mod:`minillm.statefile`): nothing in a checkpoint is unpickled, so a checkpoint folder handed to
you cannot run code. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.errors import UserError
from minillm.statefile import load_state, save_state, state_files

STATE = "trainer_state"  # trainer_state.json + trainer_state.safetensors
LEGACY_STATE_FILE = "trainer_state.pt"  # checkpoints written before 0.2 (a pickle: read with weights_only=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load safetensors weights saved by ``save_pretrained`` into ``model`` (tied weights allowed)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights in this checkpoint; it may be from another tool")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    loaded_ptrs = {p.data_ptr() for n, p in model.state_dict().items() if n in sd}
    real_missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded_ptrs]
    if real_missing or unexpected:
        raise UserError(f"{folder}: checkpoint does not match the model (missing {real_missing[:3]}, unexpected {unexpected[:3]})")


class Checkpointer:
    """Save / find / restore training checkpoints under ``root``."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root, self.keep_last = Path(root), keep_last

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if _has_state(p))

    def latest(self) -> Path | None:
        ckpts = self.all()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, model: Any, tokenizer: Any, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        save_state({**state, "rng": rng_state(), "step": step}, tmp, STATE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in self.all()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path, model: Any) -> dict[str, Any]:
        """Restore the model's weights and the RNG; return the saved trainer state."""
        load_weights(model, path / "model")
        state = read_state(path)
        set_rng_state(state["rng"])
        return state


def _has_state(folder: Path) -> bool:
    return all(f.is_file() for f in state_files(folder, STATE)) or (folder / LEGACY_STATE_FILE).is_file()


def read_state(folder: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``folder``, never unpickled: the JSON + safetensors pair, or
    an older ``trainer_state.pt`` read with ``weights_only=True`` (tensors, containers, NumPy's RNG
    state and the experience record only; any other object in the file is refused, not built)."""
    if all(f.is_file() for f in state_files(folder, STATE)):
        try:
            return load_state(folder, STATE)
        except ValueError as e:
            raise UserError(f"{e}; this checkpoint is damaged") from None
    legacy = folder / LEGACY_STATE_FILE
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError names the refused global: the file is not a plain state
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"{legacy}: refused to load ({first[:200]}); a trainer state must hold only tensors and "
                        "plain values. Delete this checkpoint folder if you do not trust where it came from") from None


def _legacy_globals() -> list[Any]:
    """What a pre-0.2 trainer_state.pt legitimately holds besides tensors: NumPy's RNG state (an
    array) and the unfinished experience (a plain dataclass of tensors and floats)."""
    from minillm.methods.base import Experience

    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), Experience]
