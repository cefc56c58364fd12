"""A checkpoint never runs code: the trainer state is JSON + safetensors, and an older pickled
``trainer_state.pt`` is read with ``weights_only=True`` only (issue 7, defect 1)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_config_dict
from minillm.checkpoint import Checkpointer, read_state
from minillm.config import config_from_dict
from minillm.errors import UserError
from minillm.methods.base import Experience
from minillm.statefile import load_state, save_state, state_files
from minillm.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this object runs ``open(marker, 'w')``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (open, (self.marker, "w"))


def _craft(path: Path, marker: Path) -> None:
    torch.save({"step": 2, "rng": _Payload(marker)}, path)
    assert not marker.exists()


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_state_round_trip_keeps_every_type(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    shared = torch.arange(6.0)
    state = {
        "optimizer": opt.state_dict(),  # int keys, 0-d step tensors
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "floats": [float("nan"), float("inf"), -float("inf"), 1e-300, 0.1],
        "nested": {"a": (1, (2, "x"), None), "b": [True, False], (1, 2): "tuple key", 3: "int key"},
        "__tensor__": "a user key that looks like a tag",
        "tensors": [shared, shared[2:], torch.zeros(0), torch.tensor(True), torch.ones(2, dtype=torch.bfloat16)],
        "empty": {}, "np_scalars": [np.float32(0.5), np.int64(7)],
    }
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    expected = dict(state, np_scalars=[0.5, 7])
    _same(expected, back)
    # what was stored is a copy: changing the live tensors afterwards does not reach the file
    shared.add_(1)
    assert torch.equal(load_state(tmp_path, "s")["tensors"][0], torch.arange(6.0))
    # the restored optimizer state loads into a fresh optimizer
    torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1).load_state_dict(back["optimizer"])
    # the structure file is strict JSON: no NaN / Infinity literals
    text = state_files(tmp_path, "s")[0].read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_state_refuses_objects(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot store a Experience"):
        save_state({"exp": Experience([])}, tmp_path, "s")
    with pytest.raises(TypeError, match="cannot store a _Payload"):
        save_state([_Payload(tmp_path / "m")], tmp_path, "s")


@pytest.mark.parametrize("damage", ["missing_tensors", "cut_json", "cut_tensors", "foreign_json", "dangling"])
def test_damaged_state_names_the_file(tmp_path: Path, damage: str) -> None:
    save_state({"x": torch.ones(3), "y": 1}, tmp_path, "s")
    js, st = state_files(tmp_path, "s")
    if damage == "missing_tensors":
        st.unlink()
    elif damage == "cut_json":
        js.write_text(js.read_text()[:10])
    elif damage == "cut_tensors":
        st.write_bytes(st.read_bytes()[:20])
    elif damage == "foreign_json":
        js.write_text(json.dumps({"state": {}}))
    else:
        js.write_text(json.dumps({"format": "minillm-state-1", "state": {"__tensor__": "99"}}))
    with pytest.raises(ValueError) as e:
        load_state(tmp_path, "s")
    assert str(js if damage in ("cut_json", "foreign_json", "dangling") else st) in str(e.value)


def _run_cfg(tiny_task: dict[str, Path], out: Path, steps: int = 2) -> Any:
    d = tiny_config_dict(tiny_task, out, "minillm", train={"batch_size": 2, "grad_accum": 2, "max_steps": steps,
                                                        "save_every": 2, "eval_every": 100})
    return config_from_dict(d)


def test_checkpoint_holds_no_pickle_and_resumes_mid_experience(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """A MiniLLM checkpoint in the middle of a rollout batch stores its unfinished PPO experience
    as tensors + JSON, and restores it as the same Experience."""
    out = train(_run_cfg(tiny_task, tmp_path / "run"))
    ckpt = Checkpointer(out / "checkpoints", 2).latest()
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "model", "trainer_state.json",
                                                    "trainer_state.safetensors"]
    state = read_state(ckpt)
    assert state["exp"] is not None and state["next_update"] == 2  # 8 rollouts / 4 per step x 2 epochs = 4 updates
    mb = state["exp"]["updates"][0][0]
    assert mb["response_ids"].dtype == torch.long and mb["logq_old"].dtype == torch.float32


def test_crafted_payload_next_to_a_safe_state_never_runs(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """The attack of issue 7: a trainer_state.pt with a __reduce__ payload dropped into a run's
    checkpoint folder. The resumed run reads the safe state beside it and never opens the pickle."""
    out = train(_run_cfg(tiny_task, tmp_path / "run"))
    marker = tmp_path / "pwned"
    _craft(Checkpointer(out / "checkpoints", 2).latest() / "trainer_state.pt", marker)
    train(_run_cfg(tiny_task, out, steps=4))
    assert not marker.exists()


def test_crafted_legacy_checkpoint_is_refused_in_one_line(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint folder holding only a pickled trainer_state.pt (the pre-0.2 layout) is read with
    weights_only=True: the payload is refused, not run, and the user gets one line naming the file."""
    out = train(_run_cfg(tiny_task, tmp_path / "run"))
    ckpt = Checkpointer(out / "checkpoints", 2).latest()
    for f in state_files(ckpt, "trainer_state"):
        f.unlink()
    (ckpt / "manifest.json").unlink()  # the pre-0.2 layout had no manifest
    marker = tmp_path / "pwned"
    _craft(ckpt / "trainer_state.pt", marker)
    with pytest.raises(UserError, match=r"trainer_state\.pt: refused to load") as e:
        train(_run_cfg(tiny_task, out, steps=4))
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_crafted_checkpoint_through_the_command_line(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """The same attack through a plain ``minillm train CONFIG``, in a real process."""
    cfg = tiny_config_dict(tiny_task, tmp_path / "run", "sft", train={"max_steps": 2, "save_every": 2, "eval_every": 100})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(config_from_dict(cfg))
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", 2).latest()
    for f in state_files(ckpt, "trainer_state"):
        f.unlink()
    (ckpt / "manifest.json").unlink()  # the pre-0.2 layout had no manifest
    marker = tmp_path / "pwned"
    _craft(ckpt / "trainer_state.pt", marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "minillm", "train", str(path), "train.max_steps=3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert not marker.exists()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "trainer_state.pt" in errors[0] and "Traceback" not in r.stderr


def test_legacy_plain_checkpoint_still_resumes(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """A pre-0.2 checkpoint with an honest trainer_state.pt (tensors, NumPy RNG state, an unfinished
    Experience) still resumes, through weights_only=True, to the same run as one written today."""
    ref = train(_run_cfg(tiny_task, tmp_path / "ref", steps=4))
    out = train(_run_cfg(tiny_task, tmp_path / "run"))
    ckpt = Checkpointer(out / "checkpoints", 2).latest()
    state = read_state(ckpt)
    e = state["exp"]
    state["exp"] = Experience(e["updates"], e["metrics"], e["once"])
    torch.save(state, ckpt / "trainer_state.pt")
    for f in state_files(ckpt, "trainer_state"):
        f.unlink()
    (ckpt / "manifest.json").unlink()  # the pre-0.2 layout had no manifest
    shutil.rmtree(out / "final")
    train(_run_cfg(tiny_task, out, steps=4))
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


@pytest.fixture
def group_of_one(tmp_path: Path) -> Any:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def _dcp_pair(tmp_path: Path) -> tuple[Any, Any, Path]:
    """A small model + optimizer after one step, saved as a distributed checkpoint."""
    from minillm.checkpoint import save_distributed

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    folder = tmp_path / "dcp"
    save_distributed(model, opt, folder)
    return model, opt, folder


def test_distributed_checkpoint_loads_through_the_safe_reader(group_of_one: Any, tmp_path: Path) -> None:
    from minillm.checkpoint import load_distributed

    model, opt, folder = _dcp_pair(tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    load_distributed(fresh, fresh_opt, folder)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_opt.param_groups[0]["lr"] == 0.1  # a non-tensor item, read through weights_only=True


def test_crafted_distributed_metadata_never_runs(group_of_one: Any, tmp_path: Path) -> None:
    """torch's own reader unpickles dcp/.metadata as it is: ours refuses any class outside the
    metadata's own, so a payload there is never built."""
    import pickle

    from minillm.checkpoint import load_distributed

    model, opt, folder = _dcp_pair(tmp_path)
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match=r"refused to load \(refused io\.open"):
        load_distributed(model, opt, folder)
    assert not marker.exists()


def test_crafted_distributed_item_never_runs(group_of_one: Any, tmp_path: Path) -> None:
    """A non-tensor item (here the optimizer's learning rate) holding a payload: PyTorch's default
    planner reads such items with weights_only=False; ours refuses it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from minillm.checkpoint import _state_dict_options, load_distributed

    model, opt, folder = _dcp_pair(tmp_path)
    marker = tmp_path / "pwned"
    msd, osd = get_state_dict(model, opt, options=_state_dict_options())
    osd["param_groups"][0]["lr"] = _Payload(marker)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    assert not marker.exists()
    with pytest.raises(UserError, match="refused to load"):
        load_distributed(model, opt, folder)
    assert not marker.exists()
