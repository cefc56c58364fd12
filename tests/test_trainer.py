"""The training loop: schedules, token-normalised accumulation, end-to-end SFT and MiniLLM runs,
pinned first-step losses, MiniLLM's ablation switches and the data position."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import GradCatcher, tiny_config_dict
from minillm.checkpoint import read_state
from minillm.config import Config, config_from_dict, load_config
from minillm.data import load_run_data
from minillm.data.instruct import Encoded, collate_lm
from minillm.methods.sft import SFT
from minillm.models import load_models
from minillm.trainer import build_optimizer, loss_scaler, optimise, resolve_max_steps, token_counts, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def read_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def run(task: dict[str, Path], out: Path, method: str, **sections: dict) -> tuple[Path, list[dict[str, Any]]]:
    cfg = config_from_dict(tiny_config_dict(task, out, method, **sections))
    out = train(cfg)
    return out, read_rows(out)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# --- learning-rate schedule ------------------------------------------------------------------


def _lrs(schedule: str, max_steps: int, warmup: int, lr: float = 1.0, min_lr: float = 0.0) -> list[float]:
    cfg = load_config(None, [f"train.schedule={schedule}", f"train.warmup={warmup}", f"train.lr={lr}", f"train.min_lr={min_lr}"])
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(cfg, model, max_steps)
    out = []
    for _ in range(max_steps):
        out.append(opt.param_groups[0]["lr"])  # the rate used by this optimizer step
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedule_shapes(schedule: str) -> None:
    lr, min_lr, warmup, steps = 1e-3, 1e-4, 4, 24
    got = _lrs(schedule, steps, warmup, lr, min_lr)
    # warm-up: a linear ramp that reaches lr at step `warmup`
    assert got[:warmup] == pytest.approx([lr * (k + 1) / (warmup + 1) for k in range(warmup)])
    assert got[warmup] == pytest.approx(lr)
    decay = got[warmup:]
    for k, v in enumerate(decay):
        frac = k / (steps - warmup)
        shape = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac}[schedule]
        expect = lr if schedule == "constant" else min_lr + (lr - min_lr) * shape
        assert v == pytest.approx(expect, rel=1e-9)
    assert all(a >= b - 1e-15 for a, b in zip(decay, decay[1:]))  # never rises after warm-up
    assert min(got) >= min_lr * (warmup == 0) - 1e-15
    if schedule == "cosine":
        assert got[warmup + (steps - warmup) // 2] == pytest.approx((lr + min_lr) / 2)


def test_schedule_floor_is_min_lr() -> None:
    got = _lrs("linear", 10, 0, 1.0, 0.25)
    assert got[0] == 1.0 and min(got) > 0.25 and got[-1] == pytest.approx(0.25 + 0.75 * 0.1)


def test_no_weight_decay_on_biases() -> None:
    cfg = load_config(None, ["train.weight_decay=0.1"])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt, _ = build_optimizer(cfg, model, 10)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


# --- gradient accumulation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_parts(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Any, Any]:
    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path_factory.mktemp("acc"), "sft"))
    models = load_models(cfg, need_teacher=False)
    return cfg, models, load_run_data(cfg, models.tokenizer)


def test_accumulation_is_normalised_by_global_token_count(sft_parts: tuple[Config, Any, Any]) -> None:
    cfg, models, data = sft_parts
    model, pad = models.student, models.tokenizer.pad_token_id
    method = SFT(cfg, models, data)
    # four sequences of very different response lengths
    p = data.train[0].prompt_ids
    resp = [data.train[i].response_ids for i in range(len(data.train))]
    resp.sort(key=len)
    long_resp = (resp[-1] * 4)[:40]
    items = [Encoded(p, resp[0][:1], 0), Encoded(p[:5], long_resp, 1), Encoded(p, resp[-1][:3], 2), Encoded(p[:9], long_resp[:25], 3)]
    n_tokens = 1 + 40 + 3 + 25

    catcher = GradCatcher(model)
    two = optimise(method, model, [collate_lm(items[:2], pad), collate_lm(items[2:], pad)], catcher, grad_clip=0.0)
    one = optimise(method, model, [collate_lm(items, pad)], catcher, grad_clip=0.0)
    g_two, g_one = catcher.grads

    # independent float64 reference: each sequence alone, unpadded; sum of -log q over response tokens / all tokens
    import copy

    ref_model = copy.deepcopy(model).double()
    ref_model.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for x in items:
        ids = torch.tensor([x.prompt_ids + x.response_ids])
        logp = torch.log_softmax(ref_model(input_ids=ids).logits[0, :-1, : models.vocab_size], -1)
        for t in range(len(x.prompt_ids) - 1, ids.shape[1] - 1):
            total = total - logp[t, ids[0, t + 1]]
    ref_loss = total / n_tokens
    ref_value = float(ref_loss.detach())
    ref_loss.backward()
    g_ref = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}

    assert two["loss"] == pytest.approx(ref_value, rel=1e-5)
    assert one["loss"] == pytest.approx(ref_value, rel=1e-5)
    assert set(g_two) == set(g_one) == set(g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_two[n].double(), g_ref[n], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g_one[n].double(), g_ref[n], rtol=1e-4, atol=1e-7)
    # the test has teeth: averaging each micro-batch on its own gives a visibly different gradient
    for c in (items[:2], items[2:]):
        optimise(method, model, [collate_lm(c, pad)], catcher, 0.0)
    naive = torch.cat([((catcher.grads[2][n] + catcher.grads[3][n]) / 2).flatten().double() for n in g_ref])
    ref = torch.cat([g_ref[n].flatten() for n in g_ref])
    assert float((naive - ref).norm() / ref.norm()) > 0.02  # measured: 0.054


def test_loss_scaling_unscales_before_clipping_and_skips_an_overflowed_step(sft_parts: tuple[Config, Any, Any]) -> None:
    """float16 autocast trains through a GradScaler: same update as unscaled, clipping on the true norm,
    and a step whose scaled gradients overflow changes nothing but the scale."""
    import copy

    cfg, models, data = sft_parts
    method, pad = SFT(cfg, models, data), models.tokenizer.pad_token_id
    batch = [collate_lm(data.train[:4], pad)]

    def run(scaler: torch.amp.GradScaler | None) -> tuple[dict[str, float], torch.nn.Module]:
        model = copy.deepcopy(models.student)
        out = optimise(method, model, batch, torch.optim.SGD(model.parameters(), lr=0.5), 0.1, scaler)
        return out, model

    assert not loss_scaler(method, models.student).is_enabled()  # float32 on CPU: no scaling
    fp16_method = copy.copy(method)
    fp16_method.autocast = torch.float16
    assert loss_scaler(fp16_method, models.student).is_enabled()  # float16 autocast over float32 weights
    assert not loss_scaler(fp16_method, copy.deepcopy(models.student).half()).is_enabled()  # cannot unscale fp16 grads
    plain, m_plain = run(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled, m_scaled = run(scaler)
    assert scaled["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5) and plain["grad_norm"] > 0.1  # clipped
    for a, b in zip(m_plain.parameters(), m_scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0**12
    overflow = torch.amp.GradScaler("cpu", init_scale=1e38)  # scaled gradients become inf
    _, m_over = run(overflow)
    for a, b in zip(models.student.parameters(), m_over.parameters()):
        assert torch.equal(a, b)
    assert overflow.get_scale() == pytest.approx(0.5e38)


def test_token_counts() -> None:
    mbs = [
        {"loss_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
         "pt_mask": torch.zeros(2, 2)},
        {"loss_mask": torch.tensor([[0.0, 1.0, 1.0]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pt_mask": torch.zeros(1, 2)},
    ]
    # integer masks are attention, not loss denominators; an all-zero mask counts 1 (no division by 0)
    assert token_counts(mbs) == {"loss_mask": 5.0, "pt_mask": 1.0}


# --- end-to-end runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    return run(tiny_task, tmp_path_factory.mktemp("sft") / "run", "sft")


@pytest.fixture(scope="module")
def minillm_run(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    return run(tiny_task, tmp_path_factory.mktemp("minillm") / "run", "minillm")


def _check_final(out: Path, task: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before, after = load_state(task["student"]), load_state(out / "final")
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, "training left most parameters untouched"
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("Add one and two .", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[0] == 1 and ids.shape[1] < gen.shape[1] <= ids.shape[1] + 4
    assert (out / "best").is_dir() and json.loads((out / "summary.json").read_text())["steps"] == 4


def test_sft_end_to_end(sft_run: tuple[Path, list[dict[str, Any]]], tiny_task: dict[str, Path]) -> None:
    out, rows = sft_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k in ("loss", "ce", "lr", "step_time_s", "tokens_per_s", "grad_norm", "epoch"):
            assert math.isfinite(r[k]), k
        assert r["loss"] == pytest.approx(r["ce"])  # no pre-training corpus: the loss is the CE alone
        assert r["lr"] == pytest.approx(1e-3)
    assert "valid_loss" in rows[1] and "valid_loss" in rows[3]  # eval_every=2
    assert rows[-1]["epoch"] == pytest.approx(4 * 8 / 120)
    _check_final(out, tiny_task)


def test_minillm_end_to_end(minillm_run: tuple[Path, list[dict[str, Any]]], tiny_task: dict[str, Path]) -> None:
    out, rows = minillm_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k in ("loss", "pg", "single_step", "clip_frac", "entropy", "grad_norm", "lr", "step_time_s", "tokens_per_s"):
            assert math.isfinite(r[k]), k
        assert r["loss"] == pytest.approx(r["pg"] + r["single_step"], rel=1e-5)
        assert 0 <= r["clip_frac"] <= 1
    # 8 rollouts, 8 sequences per step, 2 PPO epochs: a rollout phase every 2 steps; its statistics are
    # logged on both of its steps, its cost on the first
    stats = ("reward", "reverse_kl", "response_len", "seq_reverse_kl")
    for r in rows:
        for k in stats:
            assert math.isfinite(r[k]), k
        assert 0 < r["response_len"] <= 24 and r["reverse_kl"] >= 0
    for first, second in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert all(first[k] == second[k] for k in stats)
        assert math.isfinite(first["rollout_time_s"]) and "rollout_time_s" not in second
    assert rows[0]["reward"] != rows[2]["reward"]  # a new rollout phase, new statistics
    # the first update starts from q_old = q_theta: the ratio is the teacher-mix weight w_t alone
    assert rows[0]["single_step"] == pytest.approx(rows[0]["reverse_kl"], rel=1e-4)
    _check_final(out, tiny_task)


# Pinned first-step losses catch silent changes to the maths, the data pipeline or the sampler.
# They were computed once by running these very configs (seed 3, conftest's tiny task and models)
# with torch 2.13 / transformers 5.24 on CPU and printing rows[0]["loss"]. If a change is *meant*
# to alter them, rerun `pytest tests/test_trainer.py -k pinned` and copy the new values here.
# Last re-pinned when the task's long answers became 65-81 tokens (minillm.data.task, issue 10);
# with the task module before that change the merged code still gives the old values
# (4.905029058456421 and 0.025002727285027504), so only the data moved them.
PINNED_SFT_FIRST_LOSS = 4.969273090362549
PINNED_MINILLM_FIRST_LOSS = 0.05275880545377731


def test_pinned_sft_first_step_loss(sft_run: tuple[Path, list[dict[str, Any]]]) -> None:
    assert sft_run[1][0]["loss"] == pytest.approx(PINNED_SFT_FIRST_LOSS, rel=1e-4)


def test_pinned_minillm_first_step_loss(minillm_run: tuple[Path, list[dict[str, Any]]]) -> None:
    assert minillm_run[1][0]["loss"] == pytest.approx(PINNED_MINILLM_FIRST_LOSS, rel=1e-4)


# --- MiniLLM ablation switches ---------------------------------------------------------------


def _one_step(task: dict[str, Path], out: Path, **mini: Any) -> dict[str, Any]:
    data = {"pretrain": str(task["pretrain"])} if mini.pop("pretrain", False) else {}
    _, rows = run(task, out, "minillm", minillm=mini, data=data,
                  train={"max_steps": 1, "eval_every": 100, "save_every": 100, "eval_max_examples": 4})
    assert len(rows) == 1
    row = rows[0]
    assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    return row


@pytest.fixture(scope="module")
def base_row(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _one_step(tiny_task, tmp_path_factory.mktemp("abl") / "base")


# switch -> what must change in the first step relative to the default ("pg": the advantages moved,
# while the rollouts, hence the single-step term, stay the same)
ABLATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "single_step_off": ({"single_step": False}, "loss"),
    "length_norm_off": ({"length_norm": False}, "pg"),
    "alpha_0": ({"alpha": 0.0}, "rollout"),
    "clip_0": ({"clip": 0.0}, "clip"),
    "whiten_on": ({"whiten": True}, "pg"),
    "whiten_minibatch_padded": ({"whiten": "minibatch_padded"}, "pg"),
    "include_current_reward": ({"include_current_reward": True}, "pg"),
    "reward_clip": ({"reward_clip": 1e-3}, "pg"),
    "pt_kd": ({"pretrain": True, "pt_kd_ratio": 0.5}, "pt"),
    "gamma_095": ({"gamma": 0.95}, "pg"),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_minillm_ablation_switch(name: str, tiny_task: dict[str, Path], tmp_path: Path, base_row: dict[str, Any]) -> None:
    switch, effect = ABLATIONS[name]
    row = _one_step(tiny_task, tmp_path / "run", **switch)
    base = base_row
    if effect == "pg":
        assert row["single_step"] == pytest.approx(base["single_step"], rel=1e-6)  # same rollouts
        assert row["response_len"] == base["response_len"]
        assert abs(row["pg"] - base["pg"]) > 1e-6 * max(1.0, abs(base["pg"]))
    elif effect == "loss":
        assert "single_step" not in row
        assert row["loss"] == pytest.approx(row["pg"], rel=1e-6)
        assert row["pg"] != pytest.approx(base["pg"], rel=1e-3)  # the return now carries r_t
    elif effect == "rollout":
        # pure student sampling: w_t = 1, so the first ratio is exactly 1 and nothing clips
        assert row["ratio"] == pytest.approx(1.0, abs=1e-6) and row["clip_frac"] == 0.0
        assert (row["response_len"], row["loss"]) != (base["response_len"], pytest.approx(base["loss"]))
    elif effect == "clip":
        assert row["clip_frac"] == 0.0
        # clipping only matters where a ratio left [1 - eps, 1 + eps]
        if base["clip_frac"] == 0.0:
            assert row["loss"] == pytest.approx(base["loss"], rel=1e-6)
        else:
            assert row["loss"] != pytest.approx(base["loss"], rel=1e-6)
    elif effect == "pt":
        assert row["pt"] > 0 and row["pt_kd"] > 0
        assert row["loss"] == pytest.approx(row["pg"] + row["single_step"] + 0.5 * row["pt"] + 0.5 * row["pt_kd"], rel=1e-5)
        assert row["single_step"] == pytest.approx(base["single_step"], rel=1e-6)
    if name == "reward_clip":
        assert abs(row["reward"]) <= 1e-3 + 1e-9


# --- data position ---------------------------------------------------------------------------


def test_epochs_set_max_steps_sft(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    # 120 examples, 8 per step: 0.2 epochs = 24 examples = 3 steps
    out, rows = run(tiny_task, tmp_path / "run", "sft", train={"epochs": 0.2, "max_steps": 1000, "eval_every": 100})
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["epoch"] == pytest.approx(0.2)


def test_epochs_set_max_steps_minillm(tiny_task: dict[str, Path]) -> None:
    def steps(epochs: float, rollouts: int, bs: int, ga: int, ppo: int, n: int) -> int:
        d = tiny_config_dict(tiny_task, Path("unused"), "minillm", train={"epochs": epochs, "batch_size": bs, "grad_accum": ga},
                             minillm={"rollouts_per_step": rollouts, "ppo_epochs": ppo})
        return resolve_max_steps(config_from_dict(d), n)

    # 8 rollouts feed 2 PPO epochs x 2 steps of 4 = 4 steps, i.e. 2 new prompts per step
    assert steps(0.1, 8, 2, 2, 2, 120) == 6
    # the paper's setting: 256 rollouts, 64 per step, 4 PPO epochs -> 16 steps per 256 prompts
    assert steps(1.0, 256, 8, 8, 4, 1024) == 64
    assert steps(1.0, 8, 4, 2, 1, 120) == 15


def test_epochs_cover_the_data_minillm(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """Run to the end of 0.1 epochs; the sampler must have handed out at least 12 of the 120 prompts."""
    out, rows = run(tiny_task, tmp_path / "run", "minillm", train={"epochs": 0.1, "batch_size": 2, "grad_accum": 2,
                                                                     "eval_every": 100, "save_every": 100})
    assert len(rows) == 6
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    sampler = read_state(ckpt)["method"]["sampler"]
    assert sampler["epoch"] * 120 + sampler["pos"] >= 12


def test_metrics_log_writes_strict_json(tmp_path: Path) -> None:
    from minillm.trainer import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", keep_until=0)
    log.write({"step": 1, "loss": torch.tensor(0.5), "grad_norm": float("inf"), "x": np.float32(2.0), "y": float("nan")})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "Infinity" not in line and "NaN" not in line
    assert json.loads(line) == {"step": 1, "loss": 0.5, "grad_norm": None, "x": 2.0, "y": None}
