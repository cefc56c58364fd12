"""Resuming: an interrupted run ends exactly where an uninterrupted one does (weights and metrics),
a changed config is refused, ``train.resume=false`` starts over, checkpoints are pruned atomically."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import minillm.trainer as trainer_mod
from conftest import tiny_config_dict
from minillm.checkpoint import Checkpointer, read_state
from minillm.config import config_from_dict
from minillm.errors import UserError
from minillm.trainer import train

TIMING = {"step_time_s", "tokens_per_s", "rollout_time_s", "score_time_s", "teacher_cache_gb"}  # costs, not results
# MiniLLM: 8 rollouts, 2 x 2 sequences per step, 2 PPO epochs -> one rollout phase feeds 4 steps,
# so the step-2 checkpoint falls in the middle of an experience; "sft_pt" adds the L_PT corpus, read at
# every step, whose stream position must be restored too
_MINI = {"train": {"batch_size": 2, "grad_accum": 2}, "minillm": {"rollouts_per_step": 8, "ppo_epochs": 2}}
SECTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "sft": ("sft", {}),
    "minillm": ("minillm", _MINI),
    "sft_pt": ("sft", {"data": {"pretrain": "PRETRAIN"}}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def cfg_for(task: dict[str, Path], out: Path, variant: str, **train_over: Any) -> Any:
    method, sections = SECTIONS[variant]
    d = tiny_config_dict(task, out, method, **copy.deepcopy(sections))
    if d["data"].get("pretrain") == "PRETRAIN":
        d["data"]["pretrain"] = str(task["pretrain"])
    d["train"].update(train_over)
    return config_from_dict(d)


def rows_of(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# A MiniLLM run resumed in the middle of a rollout phase recomputes that phase's teacher logits
# teacher-forced (the ones kept from the decode are not checkpointed): equal up to float rounding
# (measured: 2.7e-6 relative on a step's loss), not to the last bit.
RESUME_REL = {"minillm": 1e-5}


def assert_same_run(a: Path, b: Path, steps: int = 4, rel: float | None = None, atol: float = 1e-7,
                    metric_abs: float = 1e-9) -> None:
    """Same metrics rows (timings aside, within ``rel`` / ``metric_abs``) and the same final weights
    (within ``rel`` / ``atol``); ``rel`` defaults by the reference run's variant (its folder name)."""
    rel = RESUME_REL.get(a.name, 1e-6) if rel is None else rel
    ra, rb = rows_of(a), rows_of(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(1, steps + 1))
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys(), (x["step"], set(x) ^ set(y))
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=rel, abs=metric_abs), (x["step"], k)
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rel, atol=atol)


@pytest.fixture(scope="module")
def reference(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted 4-step runs, one per method."""
    root = tmp_path_factory.mktemp("ref")
    return {v: train(cfg_for(tiny_task, root / v, v)) for v in SECTIONS}


@pytest.mark.parametrize("variant", list(SECTIONS))
def test_resume_after_a_shorter_run(variant: str, tiny_task: dict[str, Path], tmp_path: Path, reference: dict[str, Path]) -> None:
    out = tmp_path / "run"
    train(cfg_for(tiny_task, out, variant, max_steps=2))
    assert [p.name for p in Checkpointer(out / "checkpoints", 2).all()] == ["step_00000002"]
    train(cfg_for(tiny_task, out, variant, max_steps=4))  # same output_dir: continues from step 2
    assert_same_run(reference[variant], out)


@pytest.mark.parametrize("variant", list(SECTIONS))
def test_resume_after_a_crash(variant: str, tiny_task: dict[str, Path], tmp_path: Path, reference: dict[str, Path],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real = trainer_mod.optimise
    calls = {"n": 0}

    def crash_on_third(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # step 3, after the step-2 checkpoint
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "optimise", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_for(tiny_task, out, variant))
    assert [r["step"] for r in rows_of(out)] == [1, 2]
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"loss": 4.2, "st')  # and a row cut off mid-write by the crash
    monkeypatch.setattr(trainer_mod, "optimise", real)
    train(cfg_for(tiny_task, out, variant))
    assert_same_run(reference[variant], out)


def test_resume_drops_rows_logged_after_the_last_checkpoint(tiny_task: dict[str, Path], tmp_path: Path,
                                                            reference: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while saving step 4 leaves rows 3 and 4 in metrics.jsonl; the resumed run redoes them once."""
    out = tmp_path / "run"
    real = Checkpointer.save

    def fail_at_4(self: Checkpointer, step: int, *args: Any) -> Path:
        if step == 4:
            raise RuntimeError("disk full")
        return real(self, step, *args)

    monkeypatch.setattr(Checkpointer, "save", fail_at_4)
    with pytest.raises(RuntimeError, match="disk full"):
        train(cfg_for(tiny_task, out, "minillm"))
    assert [r["step"] for r in rows_of(out)] == [1, 2, 3, 4]
    monkeypatch.setattr(Checkpointer, "save", real)
    train(cfg_for(tiny_task, out, "minillm"))
    assert_same_run(reference["minillm"], out)


def test_changed_config_is_refused_and_resume_false_starts_over(tiny_task: dict[str, Path], tmp_path: Path,
                                                                 reference: dict[str, Path]) -> None:
    out = tmp_path / "run"
    train(cfg_for(tiny_task, out, "sft", max_steps=2))
    with pytest.raises(UserError) as e:
        train(cfg_for(tiny_task, out, "sft", lr=5e-4))
    msg = str(e.value)
    assert str(out) in msg and "different config" in msg and "train.resume=false" in msg
    assert [r["step"] for r in rows_of(out)] == [1, 2]  # the refused run touched nothing

    # starting over with the reference config reproduces the reference run
    train(cfg_for(tiny_task, out, "sft", resume=False))
    assert_same_run(reference["sft"], out)
    # and a changed config with resume=false is allowed: it replaces the old run
    train(cfg_for(tiny_task, out, "sft", lr=5e-4, resume=False, max_steps=1))
    assert [r["step"] for r in rows_of(out)] == [1]


def test_checkpoints_pruned_and_atomic(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    out = train(cfg_for(tiny_task, tmp_path / "run", "sft", save_every=1, keep_last=2))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000004"]
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert leftovers == []
    state = read_state(out / "checkpoints" / "step_00000004")
    assert state["step"] == 4 and {"optimizer", "scheduler", "method", "rng"} <= set(state)
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))  # nothing pickled anywhere in the run
    # a checkpoint's model folder loads as a plain Hugging Face model
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_00000004" / "model")


def test_half_written_checkpoint_is_ignored(tiny_task: dict[str, Path], tmp_path: Path, reference: dict[str, Path]) -> None:
    """A crash during a save leaves only a .tmp_ folder: resuming skips it and the next save replaces it."""
    out = tmp_path / "run"
    train(cfg_for(tiny_task, out, "sft", max_steps=2))
    half = out / "checkpoints" / ".tmp_step_00000004"
    (half / "model").mkdir(parents=True)
    (half / "model" / "junk.safetensors").write_bytes(b"not a checkpoint")
    assert Checkpointer(out / "checkpoints", 2).latest().name == "step_00000002"
    train(cfg_for(tiny_task, out, "sft", max_steps=4))
    assert not half.exists()
    assert_same_run(reference["sft"], out)
