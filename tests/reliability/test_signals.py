"""SIGTERM and SIGINT (issue 7, defect 4), with real processes: a training run finishes its step,
writes a checkpoint, says where it is and how to resume, and exits 143 / 130; resuming ends where an
uninterrupted run does. A second signal exits at once. ``generate`` and ``eval`` exit 130 with one
line on Ctrl-C (before: click's bare ``aborted``, and SIGTERM ended the process without a word)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_config_dict
from test_resume import assert_same_run

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).resolve().parents[2] / "src")
STEPS = 30
# the same code as `python -m minillm`, with each optimizer step slowed down, so that a second
# signal surely comes while the first one's step is still running
SLOW = ("import sys, time; import minillm.trainer as t; real = t.optimise; "
        "t.optimise = lambda *a, **k: (time.sleep(1.0), real(*a, **k))[1]; from minillm.cli import main; main()")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


class Proc:
    """A child process whose stderr is collected line by line while it runs."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.p = subprocess.Popen(args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(iter(self.p.stderr.readline, "")), daemon=True)
        self._reader.start()

    def wait_for(self, ready: Any, what: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.p.poll() is None, f"exited ({self.p.returncode}) before {what}: {''.join(self.err)[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.05)

    def finish(self, timeout: float = 240.0) -> tuple[int, list[str]]:
        rc = self.p.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc, [ln.rstrip("\n") for ln in self.err if ln.strip()]


def _config(tiny_task: dict[str, Path], tmp_path: Path, out: Path, **train: Any) -> Path:
    d = tiny_config_dict(tiny_task, out, "sft")
    d["train"].update(max_steps=STEPS, eval_every=STEPS, save_every=STEPS, **train)  # no checkpoint but the signal's
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _has_row(out: Path) -> bool:
    m = out / "metrics.jsonl"
    return m.exists() and bool(m.read_text().strip())


def _train(path: Path, cwd: Path, code: str | None = None) -> Proc:
    return Proc([sys.executable, *(["-c", code] if code else ["-m", "minillm"]), "train", str(path)], cwd)


@pytest.fixture(scope="module")
def uninterrupted(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sig_ref")
    out = root / "ref"
    rc, err = _train(_config(tiny_task, root, out), root).finish()
    assert rc == 0, err
    return out


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_matches(sig: int, status: int, tiny_task: dict[str, Path], tmp_path: Path,
                                               uninterrupted: Path) -> None:
    out = tmp_path / "run"
    path = _config(tiny_task, tmp_path, out)
    proc = _train(path, tmp_path)
    proc.wait_for(lambda: _has_row(out), "metrics row")
    proc.p.send_signal(sig)
    rc, err = proc.finish()
    assert rc == status, err
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1, err  # save_every is the run's length: this one is the signal's
    step = int(ckpts[0].name.split("_")[1])
    assert 1 <= step < STEPS
    name = signal.Signals(sig).name
    assert err[-1] == (f"stopped by {name} after step {step}; checkpoint {ckpts[0]}; rerun the same command to resume: "
                       f"minillm train {path}"), err
    assert not (out / "final").exists()
    rc, err = _train(path, tmp_path).finish()  # the command the message gives
    assert rc == 0, err
    assert_same_run(uninterrupted, out, steps=STEPS)


def test_second_signal_exits_at_once(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _train(_config(tiny_task, tmp_path, out), tmp_path, code=SLOW)
    proc.wait_for(lambda: _has_row(out), "metrics row")
    proc.p.send_signal(signal.SIGTERM)
    proc.wait_for(lambda: any("SIGTERM received" in ln for ln in proc.err), "acknowledgement of the first signal")
    proc.p.send_signal(signal.SIGINT)  # within the step the first one waits for (each takes over a second)
    rc, err = proc.finish()
    assert rc == 143, err  # the status of the first signal: still a failure for the scheduler
    assert err[-1] == "SIGINT again: exiting now; the last finished checkpoint is kept", err
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("command, sig, status", [("generate", signal.SIGINT, 130), ("eval", signal.SIGINT, 130),
                                                  ("train", signal.SIGTERM, 143)])  # train: while it still loads
def test_signal_outside_the_loop_is_one_line(command: str, sig: int, status: int, tiny_task: dict[str, Path],
                                             tmp_path: Path) -> None:
    d = tiny_config_dict(tiny_task, tmp_path / "run", "sft", generation={"max_new_tokens": 64},
                         eval={"models": {"student": str(tiny_task["student"])}, "test": {"t": str(tiny_task["test"])},
                               "seeds": list(range(50))})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    gen = tmp_path / "gen.jsonl"
    args = ["--samples", "50", "--out", str(gen)] if command == "generate" else []
    # the process announces itself once its handlers are in place, then runs the real command
    code = ("import sys; from minillm import cli, stopping as s; real = s.install_interrupt_handlers; "
            "s.install_interrupt_handlers = lambda: (real(), print('READY', file=sys.stderr, flush=True)); cli.main()")
    proc = Proc([sys.executable, "-c", code, command, str(path), *args], tmp_path)
    if command == "generate":  # in the middle of the work: records are being written
        proc.wait_for(lambda: gen.exists() and bool(gen.read_text().strip()), "generated record")
    else:
        proc.wait_for(lambda: any("READY" in ln for ln in proc.err), "start")
    proc.p.send_signal(sig)
    rc, err = proc.finish()
    assert rc == status, err
    assert err[-1] == (f"interrupted by {signal.Signals(sig).name}; finished checkpoints and written records are kept, "
                       "rerun the same command to resume"), err
    assert not any("Traceback" in ln or ln.strip() in ("aborted", "Aborted!") for ln in err), err


# rank 1 alone gets SIGTERM, from itself, right after its second optimizer step
ONE_RANK = ("import os, signal; import minillm.trainer as t; real = t.optimise; n = [0]\n"
            "def slow(*a, **k):\n"
            "    out = real(*a, **k); n[0] += 1\n"
            "    if os.environ['RANK'] == '1' and n[0] == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return out\n"
            "t.optimise = slow\nfrom minillm.cli import main; main()")


def test_ranks_agree_to_stop_after_the_same_step(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """Two real ranks (gloo): only rank 1 is signalled, both stop after step 2 and write its checkpoint
    together; without the agreement rank 0 would wait in step 3's collectives until dist_timeout_s."""
    import socket

    out = tmp_path / "run"
    path = _config(tiny_task, tmp_path, out, device="cpu", dist_timeout_s=60.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        try:
            procs.append(Proc([sys.executable, "-c", ONE_RANK, "train", str(path)], tmp_path))
        finally:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(k, None)
    (rc0, err0), (rc1, err1) = procs[0].finish(), procs[1].finish()
    assert (rc0, rc1) == (143, 143), (err0[-5:], err1[-5:])
    ckpt = out / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [ckpt.name]
    assert (ckpt / "dcp").is_dir()  # written by both ranks
    assert err0[-1] == f"stopped by SIGTERM after step 2; checkpoint {ckpt}; rerun the same command to resume: minillm train {path}"
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
