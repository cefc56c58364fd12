"""Numerical health (issue 7, defect 8): a bad step (non-finite reward, loss or gradient norm) applies
no update and is logged; K in a row stop the run with a one-line diagnosis (exit 2); no checkpoint
comes from a bad step and the newest healthy one survives keep_last; the paper's failure signatures
are warned about once and flagged in the metrics rows."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import tiny_config_dict
from minillm.config import TrainConfig, config_from_dict
from minillm.errors import UserError
from minillm.health import Health, first_bad
from minillm.methods.base import Term
from minillm.trainer import optimise, train

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).resolve().parents[2] / "src")


def rows_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def steps_of(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))


# -- optimise: a bad step applies no update ---------------------------------------------------------
class _Linear:
    """A stand-in method whose per-token loss is ``f(w)`` for a chosen ``f`` (NaN, a kink at 0, ...)."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def loss_terms(self, model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> dict[str, Term]:
        return {"x": Term(self.f(model.weight).expand(1, 2), "response_mask")}


@pytest.mark.parametrize("f, skip, bad", [
    (lambda w: w.sum() * math.nan, False, "loss"),
    (lambda w: torch.sqrt(w.sum() * 0.0), False, "grad_norm"),  # finite loss (0), gradient inf * 0 = NaN
    (lambda w: w.sum(), True, "grad_norm"),  # a fine loss, but the rollout's reward was not finite: skip, no norm
])
def test_bad_step_applies_no_update(f: Any, skip: bool, bad: str | None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    before = model.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    mb = [{"response_mask": torch.ones(1, 2)}]
    row = optimise(_Linear(f), model, mb, opt, grad_clip=1.0, skip=skip)
    torch.testing.assert_close(model.weight.detach(), before, rtol=0, atol=0)
    assert not opt.state and all(p.grad is None for p in model.parameters())
    assert first_bad(row) == bad
    # the test has teeth: the same call with a healthy loss moves the weights
    optimise(_Linear(lambda w: w.sum()), model, mb, opt, grad_clip=1.0)
    assert not torch.equal(model.weight.detach(), before)


# -- the health record ------------------------------------------------------------------------------
def _row(loss: float = 2.0, **kw: Any) -> dict[str, Any]:
    return {"loss": loss, "grad_norm": 1.0, **kw}


def test_streak_of_bad_steps_diverges_and_resets() -> None:
    h = Health(TrainConfig(max_bad_steps=3, lr=0.5), rollouts_per_step=8)
    h.check(_row(), 1)
    h.saved(1)
    h.check(_row(), 2)  # step 2 judges checkpoint 1: healthy
    h.saved(2)
    assert h.check(_row(math.nan), 3) == {"skipped": True, "bad_steps": 1} and not h.may_save
    assert h.check(_row(grad_norm=math.inf), 4) == {"skipped": True, "bad_steps": 2} and not h.diverged
    assert h.check(_row(), 5) == {} and h.may_save  # a good step ends the streak
    for s in (6, 7):
        h.check(_row(reward=math.nan), s)
    assert not h.diverged
    h.check(_row(math.inf), 8)
    assert h.diverged and h.bad_total == 5
    msg = h.diagnosis(Path("/run/checkpoints"))
    assert msg == ("the run diverged: the reward / loss was not finite for 3 steps in a row (steps 6-8, first "
                   "reward=nan); the last healthy checkpoint is /run/checkpoints/step_00000001. To go on from it, lower "
                   "train.lr (now 0.5) or check the data and start a new run from its weights "
                   "(student.path=/run/checkpoints/step_00000001/model in another output_dir; `minillm export` for a "
                   "distributed checkpoint) (train.max_bad_steps=3)")
    assert "\n" not in str(UserError(msg))


def test_loss_scaled_overflow_is_not_a_bad_step() -> None:
    h = Health(TrainConfig(), rollouts_per_step=8)
    assert h.check(_row(grad_norm=math.inf), 1, loss_scaled=True) == {}
    assert h.check(_row(grad_norm=math.inf), 2, loss_scaled=False)["skipped"] is True


def test_loss_jump_is_warned_once_and_the_checkpoint_before_it_is_not_healthy(caplog: pytest.LogCaptureFixture) -> None:
    h = Health(TrainConfig(loss_jump=100.0), rollouts_per_step=8)
    for s, loss in enumerate([3.0, 2.5, 2.0], start=1):
        assert h.check(_row(loss), s) == {}
        h.saved(s)
    with caplog.at_level(logging.WARNING, logger="minillm"):
        assert h.check(_row(-8e8), 4) == {"warn_loss_jump": True}
        assert h.check(_row(-9e8), 5) == {"warn_loss_jump": True}  # stays flagged: not absorbed into the median
    assert sum("loss jumped" in r.message for r in caplog.records) == 1
    assert h.last_healthy == 2  # checkpoint 3's weights gave the jump
    assert h.check(_row(150.0), 6) == {}  # under 100 x max(median, 1)
    assert h.check(_row(0.5), 7) == {}
    # a loss climbing by under 100x a step is caught against the lowest median of the run
    g = Health(TrainConfig(), rollouts_per_step=8)
    flags = [g.check(_row(5.0 * 3**k), k + 1) for k in range(8)]
    assert flags[:5] == [{}] * 5 and flags[5] == {"warn_loss_jump": True}  # 1215 > 100 x 5


def test_length_collapse_and_reward_hacking_signatures() -> None:
    h = Health(TrainConfig(length_collapse=0.25, distinct_collapse=0.5), rollouts_per_step=8)
    base = {"response_len": 20.0, "empty_responses": 0.0, "rollout_distinct_2": 0.9, "teacher_logprob": -5.0}
    assert h.check(_row(**base), 1) == {}
    assert h.check(_row(**{**base, "response_len": 6.0}), 2) == {}
    assert h.check(_row(**{**base, "response_len": 4.0}), 3) == {"warn_length_collapse": True}
    assert h.check(_row(**{**base, "empty_responses": 4.0}), 4) == {"warn_length_collapse": True}  # half empty
    assert h.check(_row(**{**base, "rollout_distinct_2": 0.3, "teacher_logprob": -6.0}), 5) == {}  # teacher likes it less
    assert h.check(_row(**{**base, "rollout_distinct_2": 0.3, "teacher_logprob": -2.0}), 6) == {"warn_reward_hacking": True}
    off = Health(TrainConfig(length_collapse=0.0, distinct_collapse=0.0, loss_jump=0.0), rollouts_per_step=8)
    off.check(_row(**base), 1)
    assert off.check(_row(1e9, **{**base, "response_len": 1.0, "empty_responses": 8.0, "rollout_distinct_2": 0.01,
                                  "teacher_logprob": 0.0}), 2) == {}


def test_state_round_trips() -> None:
    h = Health(TrainConfig(), rollouts_per_step=8)
    for s, loss in enumerate([3.0, 2.0, math.inf], start=1):  # (inf: nan != nan in the comparison)
        h.check(_row(loss, response_len=10.0, rollout_distinct_2=0.8, teacher_logprob=-3.0), s)
        h.saved(s)
    g = Health(TrainConfig(), rollouts_per_step=8)
    g.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert g.state_dict() == h.state_dict()


@pytest.mark.parametrize("key, value", [("max_bad_steps", 0), ("loss_jump", -1.0), ("length_collapse", 1.0),
                                        ("distinct_collapse", -0.1)])
def test_thresholds_are_validated(key: str, value: float) -> None:
    with pytest.raises(UserError, match=rf"^train\.{key}: "):
        TrainConfig(**{key: value})


# -- real runs at a learning rate that diverges -----------------------------------------------------
def _cfg(tiny_task: dict[str, Path], out: Path, **train_over: Any) -> dict[str, Any]:
    d = tiny_config_dict(tiny_task, out, "sft")
    d["train"].update(save_every=1, eval_every=100, **train_over)
    return d


def test_diverging_run_keeps_its_last_healthy_checkpoint(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """Before: keep_last=1 left only the newest checkpoint, written long after the loss blew up.
    lr 1e3 warmed up over 1000 steps: step s runs at lr ~ s, the loss climbs 5 -> 1000+ by step 6."""
    out = tmp_path / "run"
    train(config_from_dict(_cfg(tiny_task, out, lr=1e3, warmup=1000, max_steps=8, keep_last=1)))
    rows = rows_of(out)
    jumped = [r["step"] for r in rows if r.get("warn_loss_jump")]
    assert jumped and jumped == list(range(jumped[0], 9)), [(r["step"], r["loss"]) for r in rows]
    first = jumped[0]
    assert rows[first - 1]["loss"] > 100 * rows[0]["loss"]
    # checkpoint first-2 was confirmed by step first-1; checkpoint first-1's weights gave the jump
    assert steps_of(out) == [first - 2, 8]
    healthy = out / "checkpoints" / f"step_{first - 2:08d}"
    from safetensors.torch import load_file

    w = load_file(str(healthy / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())


def test_non_finite_run_stops_with_a_diagnosis_and_writes_no_bad_checkpoint(tiny_task: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """lr 1e4 from the first step: the loss reaches ~1e9 at step 2 and the gradient norm overflows at
    step 3; before, the run either raised a bare FloatingPointError or kept stepping on garbage."""
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg(tiny_task, out, lr=1e4, warmup=0, max_steps=12, keep_last=20, max_bad_steps=3)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "minillm", "train", str(path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    rows = rows_of(out)
    bad = [x["step"] for x in rows if x.get("skipped")]
    assert len(bad) == 3 and bad == list(range(bad[0], bad[0] + 3)) and rows[-1]["step"] == bad[-1], rows
    assert [x["bad_steps"] for x in rows if x.get("skipped")] == [1, 2, 3]
    assert steps_of(out) == list(range(1, bad[0]))  # every checkpoint before the streak, none from it
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run diverged: the ") and f"(steps {bad[0]}-{bad[-1]}, " in last, r.stderr
    assert "no healthy checkpoint was written. Lower train.lr (now 10000) or check the data, then start again" in last
    assert "Traceback" not in r.stderr
    assert not (out / "final").exists()


def test_resumed_run_carries_the_health_record(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """The health record is in each checkpoint: a run resumed in the middle of a divergence keeps
    protecting the same healthy checkpoint and flags the same steps as the uninterrupted run."""
    ref = tmp_path / "ref"
    train(config_from_dict(_cfg(tiny_task, ref, lr=1e3, warmup=1000, max_steps=8, keep_last=1)))
    out = tmp_path / "run"
    d = _cfg(tiny_task, out, lr=1e3, warmup=1000, max_steps=7, keep_last=1)
    train(config_from_dict(d))
    d2 = copy.deepcopy(d)
    d2["train"]["max_steps"] = 8
    train(config_from_dict(d2))
    assert steps_of(out) == steps_of(ref)
    flags = lambda o: [(x["step"], x.get("warn_loss_jump", False)) for x in rows_of(o)]  # noqa: E731
    assert flags(out) == flags(ref)


def test_distinct_2_against_a_naive_count() -> None:
    from minillm.methods.minillm import distinct_2

    g = torch.Generator().manual_seed(0)
    rs = [torch.randint(0, 4, (int(n),), generator=g) for n in torch.randint(0, 9, (6,), generator=g)]
    pairs = [(int(r[i]), int(r[i + 1])) for r in rs for i in range(len(r) - 1)]
    assert distinct_2(rs) == pytest.approx(len(set(pairs)) / len(pairs))
    assert distinct_2([torch.tensor([5, 5, 5, 5])]) == pytest.approx(1 / 3)
    assert distinct_2([torch.tensor([1]), torch.tensor([], dtype=torch.long)]) == 1.0  # no bigram: nothing repeats


def test_minillm_rows_carry_the_signature_statistics(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    d = tiny_config_dict(tiny_task, tmp_path / "run", "minillm", train={"max_steps": 2, "batch_size": 2, "grad_accum": 2},
                         minillm={"rollouts_per_step": 8, "ppo_epochs": 1})
    out = train(config_from_dict(d))
    for r in rows_of(out):
        assert 0 < r["rollout_distinct_2"] <= 1 and r["teacher_logprob"] < 0
        assert not any(k.startswith("warn_") or k == "skipped" for k in r), r
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 0
