"""Numerical health of a run: bad steps are skipped, a diverging run stops with a diagnosis, and
the paper's failure signatures are warned about.

* A step whose loss, gradient norm or rollout reward is not finite is **bad**: the trainer applies
  no optimizer update for it (:func:`minillm.trainer.optimise` skips the step, as a loss scaler
  skips an overflowing one) and its metrics row says ``skipped: true``. After
  ``train.max_bad_steps`` bad steps in a row the run stops with one line naming the quantity, the
  steps and what to try (exit status 2).
* No checkpoint is written after a bad step (its weights are the ones that failed). A checkpoint
  of step k becomes *healthy* when step k + 1, the first step computed from its weights, passes the
  check (finite, and no loss jump); the newest healthy checkpoint is never pruned by
  ``train.keep_last``: a run that diverges keeps a good state to go back to.
* Warnings, each logged once and flagged in every metrics row where it holds (``warn_*: true``):
  ``loss_jump`` (``|loss| > train.loss_jump`` times the running median of ``|loss|``: the lowest
  that median has been in the run, floored at 1, so a loss that climbs step by step is caught too), ``length_collapse`` (mean rollout response length below ``train.length_collapse`` of the
  first rollouts', or at least half the responses empty) and ``reward_hacking`` (rollout distinct-2
  below ``train.distinct_collapse`` of the first rollouts' while the teacher's mean log-prob of the
  responses is higher than at first: repetitive text the teacher likes).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from minillm.config import TrainConfig

log = logging.getLogger("minillm")

WINDOW = 50  # steps in the running median of |loss|
JUMP_FLOOR = 1.0  # a loss jump is measured against max(median |loss|, this): no alarm from a loss near 0
CHECKED = ("reward", "loss", "grad_norm")  # where a bad step is looked for, the likeliest cause first
MESSAGES = {
    "loss_jump": "the loss jumped to {value:.3g} at step {step}, over {factor:g}x its running median; the run may be "
                 "diverging: lower train.lr or raise train.warmup",
    "length_collapse": "length collapse at step {step}: mean response length {value:.3g} tokens (first rollouts: "
                       "{base:.3g}), {empty:g} empty; the student learns to stop at once: check minillm.length_norm "
                       "and the teacher's EOS",
    "reward_hacking": "possible reward hacking at step {step}: rollout distinct-2 fell to {value:.3g} (first "
                      "rollouts: {base:.3g}) while the teacher's log-prob rose to {logp:.3g}: repetitive responses "
                      "the teacher rates highly",
}


def first_bad(row: dict[str, Any]) -> str | None:
    """The first of reward, loss and gradient norm in ``row`` that is not a finite number."""
    for key in CHECKED:
        v = row.get(key)
        if v is not None and not math.isfinite(float(v)):
            return key
    return None


class Health:
    """The health record of a run (saved in each checkpoint, so a resumed run warns and stops as
    the uninterrupted one does)."""

    def __init__(self, cfg: TrainConfig, rollouts_per_step: int) -> None:
        self.cfg, self.rollouts = cfg, rollouts_per_step
        self.bad_run: list[tuple[int, str, float]] = []  # the current streak: (step, quantity, value)
        self.bad_total = 0
        self.losses: list[float] = []  # |loss| of the last WINDOW healthy steps
        self.low_median: float | None = None  # the lowest running median of |loss| so far
        self.base_len: float | None = None
        self.base_distinct: float | None = None
        self.base_logp: float | None = None
        self.warned: list[str] = []
        self.pending: int | None = None  # the newest checkpoint's step, until the step after it is judged
        self.last_healthy: int | None = None  # the step of the newest healthy checkpoint

    # -- per step ---------------------------------------------------------------------------------
    def check(self, row: dict[str, Any], step: int, loss_scaled: bool = False) -> dict[str, Any]:
        """Judge the finished step ``step`` from its metrics ``row``; return the flags to add to the
        row. Under loss scaling a non-finite gradient norm is the scaler's overflow skip, not a bad
        step. After the ``max_bad_steps``-th bad step in a row :attr:`diverged` is true."""
        flags: dict[str, Any] = {}
        bad = first_bad({k: v for k, v in row.items() if not (loss_scaled and k == "grad_norm")})
        if bad is not None:
            self.bad_run.append((step, bad, float(row[bad])))
            self.bad_total += 1
            self.pending = None  # the checkpoint before this step holds the weights that failed
            flags.update(skipped=True, bad_steps=len(self.bad_run))
            log.warning("step %d skipped: the %s is %s (no update applied; %d bad step(s) in a row, stop at %d)",
                        step, bad.replace("_", " "), row[bad], len(self.bad_run), self.cfg.max_bad_steps)
            return flags
        self.bad_run = []
        flags.update(self._loss_jump(float(row["loss"]), step))
        if self.pending is not None and not flags:  # its weights gave a finite, ordinary loss
            self.last_healthy = self.pending
        self.pending = None
        flags.update(self._rollout_signatures(row, step))
        return flags

    def _loss_jump(self, loss: float, step: int) -> dict[str, Any]:
        limit = math.inf if self.cfg.loss_jump == 0 or self.low_median is None else self.cfg.loss_jump * max(self.low_median, JUMP_FLOOR)
        if abs(loss) > limit:
            self._warn("loss_jump", value=loss, step=step, factor=self.cfg.loss_jump)
            return {"warn_loss_jump": True}  # a jumped loss stays out of the median: divergence stays flagged
        self.losses = (self.losses + [abs(loss)])[-WINDOW:]
        median = float(np.median(self.losses))
        self.low_median = median if self.low_median is None else min(self.low_median, median)
        return {}

    def _rollout_signatures(self, row: dict[str, Any], step: int) -> dict[str, Any]:
        flags: dict[str, Any] = {}
        if "response_len" in row and self.cfg.length_collapse > 0:
            n, empty = float(row["response_len"]), float(row.get("empty_responses", 0.0))
            if self.base_len is None:
                self.base_len = n
            if self.base_len > 0 and (n < self.cfg.length_collapse * self.base_len or empty >= 0.5 * self.rollouts):
                flags["warn_length_collapse"] = True
                self._warn("length_collapse", value=n, base=self.base_len, empty=empty, step=step)
        if "rollout_distinct_2" in row and "teacher_logprob" in row:
            d, lp = float(row["rollout_distinct_2"]), float(row["teacher_logprob"])
            if self.base_distinct is None:
                self.base_distinct, self.base_logp = d, lp
            if d < self.cfg.distinct_collapse * self.base_distinct and lp > (self.base_logp or 0.0):
                flags["warn_reward_hacking"] = True
                self._warn("reward_hacking", value=d, base=self.base_distinct, logp=lp, step=step)
        return flags

    def _warn(self, kind: str, **values: Any) -> None:
        if kind not in self.warned:
            self.warned.append(kind)
            log.warning(MESSAGES[kind].format(**values) + " (warned once per run; see warn_%s in metrics.jsonl)", kind)

    @property
    def diverged(self) -> bool:
        """``train.max_bad_steps`` bad steps in a row: the run must stop (:meth:`diagnosis` says why)."""
        return len(self.bad_run) >= self.cfg.max_bad_steps

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def may_save(self) -> bool:
        """A checkpoint may be written now: the last step was not bad."""
        return not self.bad_run

    def saved(self, step: int) -> None:
        """Record a checkpoint written at ``step``: healthy once the next step passes."""
        self.pending = step

    def diagnosis(self, root: Path | None = None) -> str:
        """One line for the user: what was not finite, at which steps, the checkpoint to go back to
        (under ``root``, the checkpoints folder), and what to change."""
        first, last = self.bad_run[0], self.bad_run[-1]
        kinds = sorted({q for _, q, _ in self.bad_run}, key=CHECKED.index)
        what = " / ".join(k.replace("_", " ") for k in kinds)
        fix = f"lower train.lr (now {self.cfg.lr:g}) or check the data"
        if self.last_healthy is None:
            keep = f"no healthy checkpoint was written. {fix[0].upper() + fix[1:]}, then start again"
        else:
            where = root / f"step_{self.last_healthy:08d}" if root is not None else f"step {self.last_healthy}"
            keep = (f"the last healthy checkpoint is {where}. To go on from it, {fix} and start a new run from its "
                    f"weights (student.path={where}/model in another output_dir; `minillm export` for a distributed "
                    "checkpoint)")
        return (f"the run diverged: the {what} was not finite for {len(self.bad_run)} steps in a row (steps "
                f"{first[0]}-{last[0]}, first {first[1].replace('_', ' ')}={first[2]}); {keep} "
                f"(train.max_bad_steps={self.cfg.max_bad_steps})")

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"bad_run": [list(b) for b in self.bad_run], "bad_total": self.bad_total, "losses": list(self.losses), "low_median": self.low_median,
                "base_len": self.base_len, "base_distinct": self.base_distinct, "base_logp": self.base_logp,
                "warned": list(self.warned), "pending": self.pending, "last_healthy": self.last_healthy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_run = [(int(s), str(q), float(v)) for s, q, v in state["bad_run"]]
        self.bad_total, self.losses = int(state["bad_total"]), [float(x) for x in state["losses"]]
        self.low_median = state["low_median"]
        self.base_len, self.base_distinct, self.base_logp = state["base_len"], state["base_distinct"], state["base_logp"]
        self.warned, self.pending = list(state["warned"]), state["pending"]
        self.last_healthy = state["last_healthy"]
