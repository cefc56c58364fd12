"""Data-parallel and sharded training on torch.distributed: real ``torchrun --nproc-per-node 2``
launches (gloo on CPU) against one-process runs of the same config and seed.

One launch runs every two-rank job in one process group (tests/dist_worker.py): SFT, KD (with
on-policy steps and L_PT), MiniLLM (a > 0, two PPO epochs, L_PT, Rouge-L selection) data-parallel,
the same MiniLLM with an FSDP2-sharded student and teacher and activation checkpointing, a resume on
two ranks, and rollouts whose ranks stop at very different lengths. The one-process references and
the resumes on one process run in this process. Every launch has a timeout, so a hang fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import tiny_config_dict
from dist_worker import truncate
from minillm.config import config_from_dict
from minillm.trainer import train
from test_resume import assert_same_run as same_run
from test_resume import rows_of, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 900  # the whole two-rank launch; a deadlock fails the test instead of stalling CI
MINILLM = {"train": {"batch_size": 2, "grad_accum": 2, "max_steps": 6, "save_every": 3, "eval_every": 3, "select_by": "rouge_l"},
           "minillm": {"rollouts_per_step": 8, "ppo_epochs": 2, "alpha": 0.2}}  # 4 steps per rollout phase: step 3 is mid-phase
FSDP = ["train.parallel=fsdp", "train.teacher_sharding=shard", "train.activation_checkpointing=true"]
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["c_attn"]}


def torchrun(script_args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def config_dicts(task: dict[str, Path], root: Path) -> dict[str, dict[str, Any]]:
    kd = tiny_config_dict(task, root / "kd", "kd", kd={"onpolicy_fraction": 0.5})
    mini = tiny_config_dict(task, root / "minillm", "minillm", **json.loads(json.dumps(MINILLM)))
    for d in (kd, mini):
        d["data"]["pretrain"] = str(task["pretrain"])
    lora = {**json.loads(json.dumps(mini)), "output_dir": str(root / "lora"), "student": {"path": str(task["student"]), "lora": LORA}}
    return {"sft": tiny_config_dict(task, root / "sft", "sft"), "kd": kd, "minillm": mini, "lora": lora}


@pytest.fixture(scope="module")
def runs(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two-rank launch and the one-process references."""
    root = tmp_path_factory.mktemp("dist")
    one, two = root / "one", root / "two"
    configs = {}
    for name, d in config_dicts(tiny_task, two).items():
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(d))
    two_m = two / "minillm"
    jobs = [
        {"kind": "train", "config": str(configs["sft"])},
        {"kind": "train", "config": str(configs["kd"])},
        {"kind": "train", "config": str(configs["minillm"])},
        {"kind": "train", "config": str(configs["minillm"]), "overrides": [f"output_dir={two / 'fsdp'}", *FSDP]},
        {"kind": "train", "config": str(configs["lora"]), "overrides": FSDP[:2]},
        {"kind": "truncate", "src": str(two_m), "dst": str(two / "resumed_on_2"), "step": 3},
        {"kind": "train", "config": str(configs["minillm"]), "overrides": [f"output_dir={two / 'resumed_on_2'}"]},
        {"kind": "lockstep", "config": str(configs["minillm"]),
         "overrides": ["train.teacher_sharding=shard", "train.batch_size=4", "generation.max_new_tokens=24"]},
    ]
    plan = root / "plan.json"
    plan.write_text(json.dumps({"timeout_s": 120, "out": str(root), "jobs": jobs}))
    proc = torchrun([str(ROOT / "tests" / "dist_worker.py"), str(plan)], LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reports = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    refs = {name: train(config_from_dict({**d, "output_dir": str(one / name)})) for name, d in config_dicts(tiny_task, one).items()}
    log = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long log lines
    return {"two": two, "one": refs, "reports": reports, "log": log, "configs": config_dicts(tiny_task, two)}


def assert_same_run(ref: Path, other: Path, steps: int) -> None:
    """Same metrics rows and final weights, up to float rounding: sums run in another order over ranks."""
    same_run(ref, other, steps, rel=1e-5, atol=2e-6, metric_abs=1e-6)


@pytest.mark.parametrize("name,ref,steps", [("sft", "sft", 4), ("kd", "kd", 4), ("minillm", "minillm", 6), ("fsdp", "minillm", 6),
                                           ("lora", "lora", 6)])
def test_two_ranks_equal_one_process(runs: dict[str, Any], name: str, ref: str, steps: int) -> None:
    assert_same_run(runs["one"][ref], runs["two"] / name, steps)
    summary = json.loads((runs["two"] / name / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == ("fsdp" if name in ("fsdp", "lora") else "ddp")
    if name == "lora":  # saved merged and as an adapter, from the full state dict gathered off the shards
        ref_adapter, adapter = weights(runs["one"][ref] / "final" / "adapter"), weights(runs["two"] / name / "final" / "adapter")
        assert ref_adapter.keys() == adapter.keys()
        for k in adapter:
            torch.testing.assert_close(adapter[k], ref_adapter[k], rtol=1e-5, atol=2e-6)


def test_the_runs_did_what_they_claim(runs: dict[str, Any]) -> None:
    """The comparisons above cover the paths asked for: on-policy KD steps, L_PT, teacher mixing,
    several PPO epochs, a second rollout phase, Rouge-L validation, and a sharded layout logged."""
    kd, mini = rows_of(runs["two"] / "kd"), rows_of(runs["two"] / "minillm")
    assert {r["onpolicy"] for r in kd} == {0.0, 1.0} and all("pt" in r for r in kd)
    assert all(r["pt"] > 0 and r["single_step"] > 0 for r in mini) and "valid_rouge_l" in mini[2]
    assert [r.get("rollout_tokens") is not None for r in mini] == [True, False, False, False, True, False]
    assert "teacher: FSDP2-sharded over 2 rank(s)" in runs["log"] and "student: " in runs["log"]
    assert "decoding with the plain loop, because the student and teacher are FSDP-sharded" in runs["log"]
    # a distributed checkpoint: every rank wrote its shard; config and tokenizer for the export
    ckpt = runs["two"] / "fsdp" / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "model" / "config.json").is_file() and not list((ckpt / "model").glob("*.safetensors"))
    # its manifest lists every rank's shard and the metadata, and they check out
    from minillm.checkpoint import MANIFEST, check_checkpoint

    listed = set(json.loads((ckpt / MANIFEST).read_text())["files"])
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "trainer_state.json"} <= listed
    assert check_checkpoint(ckpt) is None


@pytest.mark.parametrize("src", ["minillm", "fsdp"])
def test_resumed_on_one_process_equals_uninterrupted(runs: dict[str, Any], src: str, tmp_path: Path) -> None:
    """A two-rank run cut back to its step-3 checkpoint (mid rollout phase: the unfinished PPO
    experience is in it), resumed in one process; the FSDP run's checkpoint is a distributed one."""
    out = tmp_path / "resumed"
    truncate(runs["two"] / src, out, 3)
    train(config_from_dict({**runs["configs"]["minillm"], "output_dir": str(out)}))
    assert_same_run(runs["one"]["minillm"], out, 6)


def test_resumed_on_two_ranks_equals_uninterrupted(runs: dict[str, Any]) -> None:
    assert_same_run(runs["one"]["minillm"], runs["two"] / "resumed_on_2", 6)
    assert "resumed from" in runs["log"]


def test_ranks_that_stop_at_very_different_lengths_finish_together(runs: dict[str, Any]) -> None:
    """Rank 0's rows all stop at their first token, rank 1's never stop: with a sharded teacher
    every decode step is a collective, so rank 0 keeps stepping until rank 1 is done."""
    r0, r1 = (rep["jobs"][-1] for rep in runs["reports"])
    assert r0["lengths"] == [1, 1, 1, 1] and r1["lengths"] == [24, 24, 24, 24]
    assert r0["all_lengths"] == r1["all_lengths"] == [1] * 4 + [24] * 4
    assert r0["decode_teacher_calls"] == r1["decode_teacher_calls"] == 24  # the same forwards, so the same all-gathers
    assert r0["teacher_calls"] == r1["teacher_calls"] and r0["scored_rows"] == r1["scored_rows"] == 4


def test_without_lockstep_the_same_rollout_breaks(runs: dict[str, Any], tmp_path: Path) -> None:
    """The control: the same rollout with lockstep off. Rank 0 leaves the decode loop after one
    step while rank 1 still all-gathers teacher weights, so their collectives no longer match: Gloo
    aborts on the mismatch (NCCL would wait until train.dist_timeout_s, 10 s here); either way the
    launch fails instead of finishing."""
    cfg = tmp_path / "minillm.yaml"
    cfg.write_text(yaml.safe_dump({**runs["configs"]["minillm"], "output_dir": str(tmp_path / "run")}))
    plan = tmp_path / "plan.json"
    job = {"kind": "lockstep", "lockstep": False, "config": str(cfg),
           "overrides": ["train.teacher_sharding=shard", "train.batch_size=4", "generation.max_new_tokens=24"]}
    plan.write_text(json.dumps({"timeout_s": 10, "out": str(tmp_path), "jobs": [job]}))
    try:
        proc = torchrun([str(ROOT / "tests" / "dist_worker.py"), str(plan)], timeout=240)
        failed, out = proc.returncode != 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:  # a hang the collective timeout did not catch: still not a finished run
        failed, out = True, f"{e.stdout or ''}{e.stderr or ''} timed out"
    assert failed and out.count("lockstep=False rollout starts") == 2 and out.count("rollout finished") < 2
    assert "collective mismatch" in out or "timed out" in out.lower(), out[-3000:]


@pytest.mark.parametrize("name", ["fsdp", "lora"])
def test_export_consolidates_a_distributed_checkpoint(runs: dict[str, Any], name: str, tmp_path: Path) -> None:
    """``minillm export`` in one process: the two ranks' shards of the last checkpoint become the
    model that final/ holds (a LoRA run's checkpoint holds only the adapter: the base comes from
    student.path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.cli import main

    out = tmp_path / "hf"
    main(["export", str(runs["two"] / name), "--out", str(out)])
    for sub in ["", "adapter"] if name == "lora" else [""]:
        ref, got = weights(runs["two"] / name / "final" / sub), weights(out / sub)
        assert ref.keys() == got.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
