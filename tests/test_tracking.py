"""Tracking: TensorBoard event files read back, W&B offline, the periodic log line; and the
teacher-mix schedule, logged per step."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_config_dict
from minillm.config import config_from_dict, load_config
from minillm.errors import UserError
from minillm.methods.minillm import scheduled_alpha
from minillm.tracking import Tracker, format_duration, git_commit
from minillm.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_alpha_schedules() -> None:
    def at(schedule: str, step: int, total: int = 100, a: float = 0.4, end: float = 0.1) -> float:
        m = load_config(None, [f"minillm.alpha={a}", f"minillm.alpha_end={end}", f"minillm.alpha_schedule={schedule}"]).minillm
        return scheduled_alpha(m, step, total)

    assert [at("constant", s) for s in (0, 50, 100)] == [0.4, 0.4, 0.4]  # the paper: alpha_end unused
    assert [at("linear", s) for s in (0, 25, 100)] == pytest.approx([0.4, 0.325, 0.1])
    assert [at("cosine", s) for s in (0, 50, 100)] == pytest.approx([0.4, 0.25, 0.1])
    assert at("cosine", 25) == pytest.approx(0.1 + 0.3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert at("linear", 0, total=0) == 0.4
    with pytest.raises(UserError, match="minillm.alpha_schedule: must be one of"):
        load_config(None, ["minillm.alpha_schedule=exp"])
    with pytest.raises(UserError, match="minillm.alpha_end: must lie in"):
        load_config(None, ["minillm.alpha_end=1"])


@pytest.fixture(scope="module")
def tracked_run(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 MiniLLM steps (2 rollout phases of 2 steps), linear a 0.4 -> 0, into TensorBoard."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'minillm[tensorboard]')")
    d = tiny_config_dict(tiny_task, tmp_path_factory.mktemp("tb") / "run", "minillm",
                         minillm={"alpha": 0.4, "alpha_end": 0.0, "alpha_schedule": "linear"},
                         train={"report_to": ["tensorboard"], "max_steps": 2, "eval_max_examples": 4, "log_every": 1})
    train(config_from_dict(d))
    # resumed from step 2 (a tracking-only change does not block resuming): the events continue, none repeat
    d["train"].update(max_steps=4, log_every=10)
    return train(config_from_dict(d))


def test_alpha_schedule_is_logged_per_step(tracked_run: Path) -> None:
    rows = _rows(tracked_run)
    # phases start at steps 0 and 2 of 4: a = 0.4, then 0.4 + (0 - 0.4) * 2 / 4
    assert [r["alpha"] for r in rows] == pytest.approx([0.4, 0.4, 0.2, 0.2])


def test_tensorboard_events_hold_the_metrics_rows_config_and_commit(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = _rows(tracked_run)
    scalars = set(acc.Tags()["scalars"])
    for key in ("loss", "pg", "single_step", "reverse_kl", "alpha", "lr", "grad_norm", "valid_loss"):
        assert key in scalars, key
        logged = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        events = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in events] == [s for s, _ in logged]  # every step once, across the resumption
        assert [v for _, v in events] == pytest.approx([v for _, v in logged], rel=1e-6)
    texts = {t: acc.Tensors(t) for t in acc.Tags()["tensors"]}
    config = [e.tensor_proto.string_val[0].decode() for e in texts["config/text_summary"]]
    assert "alpha_schedule: linear" in config[-1] and "report_to:" in config[-1]
    commit = texts["git_commit/text_summary"][-1].tensor_proto.string_val[0].decode()
    assert commit == str(git_commit())


def test_wandb_offline_run_holds_the_metrics_and_config(tiny_task: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'minillm[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    d = tiny_config_dict(tiny_task, tmp_path / "run", train={"report_to": ["wandb"], "max_steps": 2})
    out = train(config_from_dict(d))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (out / "wandb" / "run_id").read_text().strip()
    wanted = [k.encode() for k in ("loss", "valid_loss", "lr", "git_commit", "tokens_per_s", str(tiny_task["student"]))]
    records = b""
    for _ in range(120):  # W&B's service writes the file asynchronously; on loaded cores it can lag finish()
        records = (runs[0] / f"run-{run_id}.wandb").read_bytes()  # protobuf records: keys and strings are plain bytes
        if all(k in records for k in wanted):
            break
        time.sleep(0.5)
    for key in wanted:  # the metrics, the commit and the resolved config (the student's path) went along
        assert key in records, key


def test_log_line_every_n_steps_without_a_terminal(tiny_task: dict[str, Path], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", train={"log_every": 2}))
    with caplog.at_level(logging.INFO, logger="minillm"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sft step")]
    assert [ln.split(" | ")[0] for ln in lines] == ["sft step 2/4 (50%)", "sft step 4/4 (100%)"]  # valid at 2 and 4 too
    parts = lines[0].split(" | ")
    assert parts[1].startswith("loss ") and "valid_loss" in lines[0] and parts[-2].endswith(" s/step")
    assert parts[-1].startswith("ETA ") and lines[-1].endswith("ETA 0s")


def test_no_log_line_under_a_live_bar_and_durations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class LiveBar:
        disable = False

    cfg = load_config(None, ["train.log_every=1"])
    with caplog.at_level(logging.INFO, logger="minillm"):
        Tracker(cfg, tmp_path, 10, 0, LiveBar()).log({"step": 1, "loss": 1.0})
        Tracker(cfg, tmp_path, 10, 0, None).log({"step": 1, "loss": 1.0})
    assert len([r for r in caplog.records if "step 1/10" in r.getMessage()]) == 1
    assert [format_duration(s) for s in (7.2, 95, 3725)] == ["7s", "1m35s", "1h02m"]


def test_bad_tracker_names_are_refused() -> None:
    with pytest.raises(UserError, match="train.report_to: unknown tracker 'mlflow'"):
        load_config(None, ["train.report_to=[mlflow]"])
    with pytest.raises(UserError, match="train.log_every: must be >= 0"):
        load_config(None, ["train.log_every=-1"])
