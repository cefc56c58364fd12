"""Stopping on a signal: SIGTERM (Slurm, Kubernetes, spot preemption) and SIGINT (Ctrl-C).

During training the first signal only sets a flag; the loop finishes the optimizer step it is in,
writes a checkpoint and raises :class:`Stopped`, which the CLI turns into one line naming the
checkpoint and the command that resumes, and exit status 128 + signal (143 / 130). A second signal
exits at once with the same status. Under ``torchrun`` the ranks agree on the flag with one
all-reduce per step (:meth:`StopFlag.agreed`), so they all stop after the same step and none waits
in a collective the others never reach.

Outside the loop (model loading, ``generate``, ``eval``) either signal raises :class:`Interrupted`;
the CLI prints one line and exits with the same status.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by signal ``signum``: 128 + its number."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Stopped(BaseException):  # noqa: N818 - a stop the user asked for: no `except Exception` may swallow it
    """Training stopped on a signal after a finished step; ``checkpoint`` resumes it."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet (nothing to resume)"
        super().__init__(f"stopped by {signal_name(signum)} after step {step}; {where}")


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, past `except Exception`
    """SIGTERM or SIGINT outside the training loop. Not a KeyboardInterrupt on purpose: click turns
    that into its own ``Abort`` and the reason is lost."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal_name(signum)}")


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install_interrupt_handlers() -> None:
    """SIGTERM and SIGINT raise :class:`Interrupted` (SIGTERM would end the process without a word)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise_interrupted)


class StopFlag:
    """Context manager that holds SIGTERM / SIGINT for the training loop.

    ``requested`` is the first signal's number (0: none). A second signal prints one line and ends
    the process at once (``os._exit``: no step is finished, no file written; the checkpoints already
    on disk are complete, they are written atomically)."""

    def __init__(self) -> None:
        self.requested = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            sys.stderr.write(f"{signal_name(signum)} again: exiting now; the last finished checkpoint is kept\n")
            sys.stderr.flush()
            os._exit(exit_status(self.requested))
        self.requested = signum
        sys.stderr.write(f"{signal_name(signum)} received: finishing this step and writing a checkpoint "
                         "(send it again to exit at once)\n")
        sys.stderr.flush()

    def install(self) -> StopFlag:
        """Hold SIGTERM and SIGINT from now on (in the main thread: only it may set handlers)."""
        if threading.current_thread() is threading.main_thread() and not self._old:
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """The handlers as they were before :meth:`install` (safe to call twice)."""
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def agreed(self, dist: Any) -> int:
        """The signal every rank stops for (0: keep going): the largest rank's flag, one all-reduce
        under several ranks. Every rank calls this once per step, at the same point."""
        if getattr(dist, "world", 1) == 1:
            return self.requested
        import torch.distributed as tdist

        t = torch.tensor([self.requested], dtype=torch.int64, device=dist._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())
