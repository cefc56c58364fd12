"""Atomic file and folder writes, and the disk errors they can meet.

Every file a resume depends on (``config.hash``, ``run_fingerprint.json``, ``metrics.jsonl`` when
it is rewritten, ``summary.json``, ``results.json``, ``best/``, checkpoint manifests) goes through
:func:`write_text_atomic` or :func:`replace_folder_atomic`: the data goes to a temporary name in
the same folder, is fsynced, then renamed over the target. A kill at any moment leaves the old
file or the new one, never half of one.

:func:`disk_error` turns the errors of a full disk, a read-only folder or a path that runs through
a file into one :class:`~minillm.errors.UserError` line.

Fault injection for tests: ``MINILLM_FAULT_INJECT=kill:NAME`` kills the process (SIGKILL) halfway
through the atomic write of a file called ``NAME``; ``enospc:NAME`` makes a write at fault point
``NAME`` (a file name, or ``checkpoint``) fail as a full disk does. Unset, it costs one lookup.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from minillm.errors import UserError

FAULT_ENV = "MINILLM_FAULT_INJECT"
# errors that mean "this disk / folder cannot take the write", not a bug
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
# how writers that are not Python's own (safetensors in Rust, torch's C++ stream writer) word ENOSPC
_FULL_MARKERS = ("no space left", "storagefull", "os error 28", "code: 28", "disk quota")


def fault_point(name: str, path: Path | str) -> None:
    """Raise a full-disk ``OSError`` at ``name`` when ``MINILLM_FAULT_INJECT=enospc:NAME`` (tests)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"enospc:{name}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename. A disk
    fault (full, read-only) leaves the old file and raises one :class:`UserError` line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            spec = os.environ.get(FAULT_ENV)
            if spec == f"kill:{path.name}":  # tests: a crash halfway through the write
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            fault_point(path.name, path)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if (err := disk_error(e, path)) is not None:
            raise err from None
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files a killed :func:`write_bytes_atomic` left in ``folder`` (one run per folder)."""
    for stale in folder.glob(".*.tmp.*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` (before it is renamed into place)."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def replace_folder_atomic(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill folder ``out`` through ``write(tmp)`` on a temp folder beside it, fsync, then swap it in.
    A disk fault while writing removes the temp folder and raises one :class:`UserError` line.

    A reader sees the old folder or the new one; a crash between the two renames leaves the old one
    as ``OUT.old``, which the next call puts back before anything else."""
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    if not out.exists() and old.is_dir():  # a crash between the two renames below: the old one is whole
        old.rename(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
        fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (err := disk_error(e, tmp)) is not None:
            raise err from None
        raise
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (an ``OSError``, or a writer's own error type that wraps one) means a full disk."""
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return True
    text = str(e).lower()
    return any(m in text for m in _FULL_MARKERS)


def disk_error(e: BaseException, path: Path | str, after: str = "") -> UserError | None:
    """The one-line :class:`UserError` for a disk fault ``e`` met while writing ``path``, or None
    when ``e`` is something else. ``after``: what the user should know next (where the last
    complete checkpoint is)."""
    tail = f"; {after}" if after else ""
    if is_disk_full(e):
        return UserError(f"no space left on device while writing {path}{tail}; free some space and rerun the same "
                         "command to resume")
    if isinstance(e, OSError) and e.errno in NOT_WRITABLE:
        reason = {errno.EROFS: "the filesystem is read-only", errno.ENOTDIR: "a part of the path is a file, not a folder",
                  errno.EEXIST: "a file is in the way of a folder", errno.EISDIR: "a folder is in the way of a file",
                  }.get(e.errno, "permission denied")
        return UserError(f"cannot write {path} ({reason}){tail}; give an output_dir you can write to")
    return None
