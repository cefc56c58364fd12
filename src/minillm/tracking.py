"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, log lines.

:class:`Tracker` gets every row the trainer writes to ``metrics.jsonl``, unchanged:

* ``train.report_to: [tensorboard]`` writes ``output_dir/tensorboard/`` event files: one scalar
  per numeric key of each row (the tag is the ``metrics.jsonl`` key, the step its ``step``), and two
  texts: ``config`` (the resolved config.yaml) and ``git_commit``. A resumed run purges the events
  past its checkpoint, as ``metrics.jsonl`` drops its rows. Needs ``pip install 'minillm[tensorboard]'``.
* ``train.report_to: [wandb]`` logs the same rows to a W&B run under ``output_dir/wandb/``, with the
  resolved config and the git commit in its config; ``train.wandb_mode: offline`` (the default)
  needs no network or account (``wandb sync`` uploads later). A resumed run continues the same W&B
  run (its id is kept in ``output_dir/wandb/run_id``). Needs ``pip install 'minillm[wandb]'``.
* Without a live progress bar (no terminal: CI, nohup, Slurm; or ``train.progress: false``) a line
  every ``train.log_every`` steps, and on every validation step and the last one, goes to the
  ``minillm`` logger: step, loss, the method's key metrics, seconds per step and the time left.

The git commit is the one of the checkout the run was started in (the current directory), with
``-dirty`` appended when it has uncommitted changes; ``None`` outside a git checkout.
"""

from __future__ import annotations

import logging
import math
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from minillm.config import Config
from minillm.errors import UserError

log = logging.getLogger("minillm")

# metrics.jsonl keys a log line shows when the row has them, in this order
LINE_KEYS = ("pg", "single_step", "pt", "reverse_kl", "reward", "response_len", "alpha", "valid_loss", "valid_rouge_l")


def git_commit(where: Path | None = None) -> str | None:
    """``HEAD`` of the git checkout holding ``where`` (default: the current directory), ``-dirty``
    appended when tracked files changed; None when there is no checkout or no git."""
    cwd = str(where) if where is not None else None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``; ``95`` -> ``1m35s``; ``7.2`` -> ``7s``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Tracker:
    """The trackers of ``train.report_to`` and the periodic log line, for one run in ``out``."""

    def __init__(self, cfg: Config, out: Path, max_steps: int, start_step: int, progress: Any = None) -> None:
        self.cfg, self.out, self.max_steps = cfg, Path(out), max_steps
        self.every = cfg.train.log_every
        # a live bar already shows progress; log lines are for runs nobody watches on a terminal
        self.lines = self.every > 0 and (progress is None or bool(getattr(progress, "disable", False)))
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.tb: Any = None
        self.wandb: Any = None
        if not cfg.train.report_to:
            return
        commit = git_commit()
        config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        if "tensorboard" in cfg.train.report_to:
            self.tb = _tensorboard(self.out / "tensorboard", start_step)
            self.tb.add_text("config", "\n".join("    " + ln for ln in config_text.splitlines()), 0)  # a Markdown code block
            self.tb.add_text("git_commit", str(commit), 0)
            self.tb.flush()
        if "wandb" in cfg.train.report_to:
            self.wandb = _wandb_run(cfg, self.out, commit)

    def log(self, row: dict[str, Any]) -> None:
        """Send one ``metrics.jsonl`` row (it must hold ``step``)."""
        step = int(row["step"])
        values = {k: v for k, v in ((k, _number(v)) for k, v in row.items() if k != "step") if v is not None}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()  # a crash must not take the last steps' events with it
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.lines and (step % self.every == 0 or step == self.max_steps or "valid_loss" in values):
            log.info("%s", self.line(step, values))

    def line(self, step: int, values: dict[str, float]) -> str:
        """``step 40/200 (20%) | loss 0.4123 | ... | 1.25 s/step | ETA 3m20s``: the time per step is
        the mean since this process started (validation and checkpoints included)."""
        done = step - self.start_step
        per_step = (time.perf_counter() - self.t0) / done if done > 0 else 0.0
        parts = [f"{self.cfg.method} step {step}/{self.max_steps} ({100 * step / max(self.max_steps, 1):.0f}%)"]
        if "loss" in values:
            parts.append(f"loss {values['loss']:.4g}")
        parts += [f"{k} {values[k]:.4g}" for k in LINE_KEYS if k in values]
        parts.append(f"{per_step:.3g} s/step")
        parts.append(f"ETA {format_duration(per_step * (self.max_steps - step))}")
        return " | ".join(parts)

    def close(self) -> None:
        """Flush and close the trackers (the run finished)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tensorboard(folder: Path, start_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.report_to: tensorboard needs the tensorboard package: pip install 'minillm[tensorboard]'") from None
    # a resumed run rewrites the steps after its checkpoint: purge the events a crash left past it
    return SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step > 0 else None)


def _wandb_run(cfg: Config, out: Path, commit: str | None) -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError("train.report_to: wandb needs the wandb package: pip install 'minillm[wandb]'") from None
    folder = out / "wandb"  # wandb.init(dir=out) writes its runs here
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.train.wandb_project, name=Path(cfg.output_dir).name, id=run_id, resume="allow", dir=str(out),
        mode=cfg.train.wandb_mode, config={**cfg.to_dict(), "git_commit": commit},
    )
