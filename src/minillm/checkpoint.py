"""Atomic checkpoints: written to a temp folder, then renamed; a crash never leaves half of one.

``output_dir/checkpoints/step_00000100/`` holds the trainer state (scheduler, RNG states, the
method's data position and any unfinished rollout experience) as ``trainer_state.json`` +
``trainer_state.safetensors`` (:mod:`minillm.statefile`): nothing in a checkpoint is unpickled, so a
checkpoint folder handed to you cannot run code. The weights and the optimizer state come in one of
two forms:

* one process: ``model/`` in Hugging Face format (loadable as is; a LoRA student's adapter in peft's
  format) and the optimizer inside the trainer state;
* a distributed run (several ranks, or a sharded student): ``dcp/``, a
  ``torch.distributed.checkpoint`` of the model and the optimizer, written by every rank in
  parallel, each its own shards, plus ``model/`` with the config and tokenizer. It loads on any
  number of ranks, sharded or not, and in one process (DCP reshards on load);
  ``minillm export`` turns it into a Hugging Face folder. Under several nodes ``output_dir`` must
  be on a filesystem every node sees.

Each checkpoint folder ends with ``manifest.json`` (written last, atomically): the size and SHA-256
of every file in it, ``dcp/`` shards included. At resume :meth:`Checkpointer.latest_intact` checks
the newest checkpoint against its manifest; one that fails (a file missing or cut short, a flipped
byte, an unreadable manifest) is set aside as ``damaged_step_*`` with a warning naming it and what
failed, and the next older one is used. A checkpoint from before manifests is checked for
readability only (its state parses, its safetensors headers cover their files).

Only the newest ``keep_last`` are kept, pruned after the new one is written and checked: pruning
never removes the checkpoint just written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.atomic import disk_error, fault_point, fsync_tree, write_text_atomic
from minillm.distributed import Dist
from minillm.errors import UserError
from minillm.lora import is_lora, load_adapter_weights
from minillm.parallel import is_sharded
from minillm.statefile import load_state, save_state, state_files

STATE = "trainer_state"  # trainer_state.json + trainer_state.safetensors
LEGACY_STATE_FILE = "trainer_state.pt"  # checkpoints written before 0.2 (a pickle: read with weights_only=True)
DCP_DIR = "dcp"  # a distributed checkpoint of the model and the optimizer
MANIFEST = "manifest.json"  # size and SHA-256 of every other file in the checkpoint folder
MANIFEST_FORMAT = "minillm-manifest-1"
DAMAGED_PREFIX = "damaged_"  # a checkpoint that failed its check, set aside (kept for inspection)

log = logging.getLogger("minillm")


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
    """Save / find / restore training checkpoints under ``root``. In a distributed run every rank
    calls :meth:`save` and :meth:`load`; rank 0 alone writes the trainer state and renames."""

    def __init__(self, root: Path, keep_last: int, dist: Dist | None = None) -> None:
        self.root, self.keep_last, self.dist = Path(root), keep_last, dist or Dist()
        self.protect: int | None = None  # a step whose checkpoint pruning keeps (the newest healthy one: minillm.health)

    def all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if _has_state(p) or (p / MANIFEST).is_file())

    def latest(self) -> Path | None:
        ckpts = self.all()
        return ckpts[-1] if ckpts else None

    def latest_intact(self, set_aside: bool = True) -> Path | None:
        """The newest checkpoint that passes :func:`check_checkpoint`. Newer ones that fail are
        skipped with a warning (and with ``set_aside`` renamed ``damaged_step_*``, so that later
        resumes and pruning pass them by). None when there is no checkpoint; a :class:`UserError`
        when there are some and none is intact."""
        damaged: list[tuple[Path, str]] = []
        for path in reversed(self.all()):
            problem = check_checkpoint(path)
            if problem is None:
                for bad, _ in damaged if set_aside else []:
                    aside = bad.with_name(DAMAGED_PREFIX + bad.name)
                    if aside.exists():
                        shutil.rmtree(aside)
                    bad.rename(aside)
                    log.warning("set %s aside as %s (kept for inspection; delete it when done)", bad.name, aside)
                return path
            log.warning("checkpoint %s is damaged (%s); skipping it for the next older one", path, problem)
            damaged.append((path, problem))
        if not damaged:
            return None
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged[:3])
        raise UserError(f"{self.root}: no intact checkpoint to resume from ({listed}); restore the folder from a copy, or "
                        "pass train.resume=false to start over (it deletes them)")

    def save(self, step: int, model: Any, opt: Any, tokenizer: Any, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically (manifest last), check it, then prune old ones.

        A full disk or an unwritable folder: the temp folder is removed and one :class:`UserError`
        line names the path and the last complete checkpoint."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        main, sharded_form = self.dist.main, self.dist.world > 1 or is_sharded(model)
        try:
            if main:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                (tmp / "model").mkdir(parents=True)
                fault_point("checkpoint", tmp / "model")
            self.dist.barrier()
            if sharded_form:
                save_distributed(model, opt, tmp / DCP_DIR)
                if main:
                    model.config.save_pretrained(tmp / "model")
            elif main:
                model.save_pretrained(tmp / "model", safe_serialization=True)
                state = {**state, "optimizer": opt.state_dict()}
            if main:
                tokenizer.save_pretrained(tmp / "model")
                save_state({**state, "rng": rng_state(), "step": step}, tmp, STATE)
                fsync_tree(tmp)
                write_manifest(tmp)  # last: a folder with a manifest is complete
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
        except Exception as e:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest()
            err = disk_error(e, tmp, f"the last complete checkpoint is {last if last is not None else 'none (none was written yet)'}")
            if err is None:
                raise
            raise err from None
        if main:
            problem = check_checkpoint(final, checksums=False)  # sizes against the manifest: cheap
            if problem is None:
                older = [p for p in self.all() if p != final]
                for old in older[: max(0, len(older) - (self.keep_last - 1))]:
                    if self.protect is None or old.name != f"step_{self.protect:08d}":  # the newest healthy one stays
                        shutil.rmtree(old, ignore_errors=True)
            else:
                log.warning("checkpoint %s failed its check right after writing (%s); older checkpoints are kept", final, problem)
        self.dist.barrier()
        return final

    def load(self, path: Path, model: Any, opt: Any) -> dict[str, Any]:
        """Restore the model's weights, the optimizer and the RNG; return the saved trainer state."""
        state = read_state(path)
        if (path / DCP_DIR).is_dir():
            load_distributed(model, opt, path / DCP_DIR)
        else:
            if is_sharded(model):
                raise UserError(f"{path}: was written by a one-process run; resume it with train.parallel=ddp "
                                "(its checkpoints after that load anywhere)")
            load_model_folder(model, path / "model")
            opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        return state


def load_model_folder(model: Any, folder: Path) -> None:
    """The weights of a one-process checkpoint's ``model/`` (a LoRA student's: its adapter)."""
    if is_lora(model):
        load_adapter_weights(model, folder)
    else:
        load_weights(model, folder)


def _state_dict_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (a LoRA student's base) are not saved: they come from student.path again
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_distributed(model: Any, opt: Any, folder: Path) -> None:
    """``torch.distributed.checkpoint`` of the model's trained weights and the optimizer: each rank
    writes its own shards (one copy of replicated tensors in all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt, options=_state_dict_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))


def load_distributed(model: Any, opt: Any | None, folder: Path) -> None:
    """Load a :func:`save_distributed` checkpoint into ``model`` (and ``opt``), whatever the number of
    ranks it was written on and whether ``model`` is sharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    from minillm.dcp_safe import SafePlanner, SafeReader, read_metadata_file, unsafe_cause

    opts = _state_dict_options()
    # never PyTorch's default reader: it unpickles the metadata and non-tensor items without limits
    safe = {"storage_reader": SafeReader(str(folder)), "planner": SafePlanner()}

    def refuse(e: BaseException) -> UserError:
        return UserError(f"{folder}: refused to load ({e}); a checkpoint must hold only tensors and plain values. "
                         "Delete this checkpoint folder if you do not trust where it came from")

    try:
        read_metadata_file(folder / ".metadata")  # checked here first: DCP would swallow the refusal and retry
    except FileNotFoundError:
        raise UserError(f"{folder}: no .metadata file; this distributed checkpoint is incomplete") from None
    except pickle.UnpicklingError as e:
        raise refuse(e) from None
    try:
        if opt is None:
            msd = get_model_state_dict(model, options=opts)
            dcp.load({"model": msd}, checkpoint_id=str(folder), **safe)
            set_model_state_dict(model, msd, options=opts)
            return
        msd, osd = get_state_dict(model, opt, options=opts)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(folder), **safe)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=opts)
    except CheckpointException as e:
        cause = unsafe_cause(e)
        if cause is None:
            raise
        raise refuse(cause) from None
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"{folder}: does not fit this run's student ({first}); student.* must match the run that wrote it") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()  # measured the fastest of hashlib's here: benchmarks/bench_checkpoint.py
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> Path:
    """``folder/manifest.json``: size and SHA-256 of every file under ``folder`` (written atomically)."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    return write_text_atomic(folder / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")


def check_checkpoint(folder: Path, checksums: bool = True) -> str | None:
    """What is wrong with checkpoint ``folder`` (one phrase naming the file), or None when it is
    intact. With a manifest: every file listed is there, of its size (and ``checksums``: its
    SHA-256). Without one (a checkpoint from before manifests): its trainer state reads and its
    safetensors files are whole."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return _check_unlisted(folder)
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        files = doc["files"] if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT else None
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"size", "sha256"} <= set(v) for v in files.values()):
            return f"{MANIFEST} is not a minillm manifest"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return f"{MANIFEST} is unreadable"
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{rel} is {size} bytes, the manifest says {want['size']}"
        if checksums and _sha256(p) != want["sha256"]:
            return f"{rel} does not match its checksum (changed or corrupted)"
    return None


def _check_unlisted(folder: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    log.info("checkpoint %s has no %s (written before manifests): checking that it reads", folder, MANIFEST)
    try:
        read_state(folder)
    except UserError as e:
        return str(e).split(";")[0]
    for f in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{f.relative_to(folder)}: {str(e)[:120]}"
    return None


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
