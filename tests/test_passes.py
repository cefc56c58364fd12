"""Every model pass is made once (MiniLLM): what the decode computed is reused by score, the
teacher's logits are computed once per rollout phase and reused by every PPO epoch, and none of it
changes a value beyond float rounding against the reference path (teacher-forced re-scoring, the
teacher recomputed every epoch, materialised logits). Also: the fused / materialised loss paths
agree, and a model whose logits are not a plain linear map of its hidden state is detected."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_config_dict
from minillm.config import config_from_dict
from minillm.data import load_run_data
from minillm.methods.base import output_head
from minillm.methods.minillm import MiniLLM
from minillm.models import load_models
from minillm.trainer import optimise
from test_trainer import GradCatcher

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


class Calls:
    """Counts top-level forward calls of each model, per phase."""

    def __init__(self, models: Any) -> None:
        self.phase = "init"
        self.n: Counter[tuple[str, str]] = Counter()
        for name in ("student", "teacher"):
            getattr(models, name).register_forward_pre_hook(lambda mod, args, name=name: self.n.update([(self.phase, name)]))

    def __call__(self, phase: str, name: str) -> int:
        return self.n[(phase, name)]


def _method(task: dict[str, Path], out: Path, **minillm: Any) -> tuple[MiniLLM, Calls]:
    train = minillm.pop("train", {})
    cfg = config_from_dict(tiny_config_dict(task, out, "minillm", minillm={"ppo_epochs": 3, **minillm}, train=train))
    models = load_models(cfg, need_teacher=True)
    for model in (models.student, models.teacher):
        output_head(model, models.vocab_size)  # its one probe forward happens before the counting
    return MiniLLM(cfg, models, load_run_data(cfg, models.tokenizer)), Calls(models)


def _phase(method: MiniLLM, calls: Calls) -> dict[str, Any]:
    """One rollout phase and every update it plans, counting forwards; returns the statistics and the
    per-update loss terms."""
    calls.phase = "rollout"
    samples = method.rollout(method.next_prompts(), 0)
    calls.phase = "score"
    rows, stats = method.score(samples, 0)
    updates = method.plan(rows, 0)
    calls.phase = "update"
    terms = []
    for micro in updates:
        with torch.no_grad():
            got = [method.loss_terms(method.models.student, mb) for mb in micro]
        terms.append({k: sum(float((g[k].values * mb[g[k].mask]).sum()) for g, mb in zip(got, micro)) for k in got[0]})
    return {"stats": stats, "terms": terms, "micro": sum(len(u) for u in updates), "score_batches": -(-len(rows) // method.cfg.train.batch_size),
            "tokens": int(sum(len(s.response) for s in samples)), "rows": rows}


@pytest.fixture(scope="module")
def reference(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[float, dict[str, Any]]:
    """The reference path: both models teacher-forced in score, the teacher in every epoch, plain logits."""
    out = {}
    for alpha in (0.0, 0.2):
        m, calls = _method(tiny_task, tmp_path_factory.mktemp("ref"), alpha=alpha, rescore=True, teacher_cache="off",
                           train={"fused_loss": "off"})
        out[alpha] = _phase(m, calls)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k in ("reward", "reverse_kl", "seq_reverse_kl", "response_len"):
        assert a["stats"][k] == pytest.approx(b["stats"][k], rel=1e-4, abs=1e-6), k
    assert len(a["terms"]) == len(b["terms"])
    for ta, tb in zip(a["terms"], b["terms"]):
        for k in tb:
            assert ta[k] == pytest.approx(tb[k], rel=1e-4, abs=1e-5), k


def test_at_alpha_0_the_teacher_runs_once_per_rollout_batch(tiny_task: dict[str, Path], tmp_path: Path, reference: dict) -> None:
    m, calls = _method(tiny_task, tmp_path, alpha=0.0)
    got = _phase(m, calls)
    assert calls("rollout", "teacher") == 0 and calls("rollout", "student") > 0  # the student decodes alone
    assert calls("score", "teacher") == got["score_batches"] and calls("score", "student") == 0
    assert calls("update", "teacher") == 0 and calls("update", "student") == got["micro"]  # 3 epochs, one teacher pass
    assert m.cache.gigabytes() > 0
    _same(got, reference[0.0])
    ref_calls = reference[0.0]
    assert ref_calls["micro"] == got["micro"]


def test_at_alpha_positive_score_runs_no_model(tiny_task: dict[str, Path], tmp_path: Path, reference: dict) -> None:
    m, calls = _method(tiny_task, tmp_path, alpha=0.2)
    got = _phase(m, calls)
    assert calls("rollout", "teacher") == calls("rollout", "student") > 0  # side by side, once per token
    assert calls("score", "teacher") == calls("score", "student") == 0  # the decode recorded everything
    assert calls("update", "teacher") == 0  # its logits were kept by the decode
    _same(got, reference[0.2])


def test_over_budget_the_teacher_is_recomputed_every_epoch(tiny_task: dict[str, Path], tmp_path: Path, reference: dict) -> None:
    m, calls = _method(tiny_task, tmp_path, alpha=0.0, cache_gb=0.0)
    got = _phase(m, calls)
    assert m.cache.where is None and m.cache.gigabytes() == 0
    assert calls("update", "teacher") == got["micro"]
    assert calls("score", "student") == got["score_batches"]  # no kept logits: the KL statistic needs q
    _same(got, reference[0.0])


def test_a_resumed_phase_recomputes_what_the_cache_lost(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    m, calls = _method(tiny_task, tmp_path, alpha=0.2)
    rows, _ = m.score(m.rollout(m.next_prompts(), 0), 0)
    mb = m.plan(rows, 0)[0][0]
    with torch.no_grad():
        cached = m.loss_terms(m.models.student, mb)["single_step"].values
        m.cache.start(99)  # as after a restart: nothing cached for this phase
        calls.phase = "after"
        fresh = m.loss_terms(m.models.student, mb)["single_step"].values
    assert calls("after", "teacher") == 1
    torch.testing.assert_close(fresh, cached, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["minillm", "sft", "kd"])
def test_fused_and_materialised_losses_agree(tiny_task: dict[str, Path], tmp_path: Path, method: str) -> None:
    from minillm.methods import get_method

    rows = {}
    for mode in ("on", "off"):
        cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / mode, method, train={"fused_loss": mode},
                                                data={"pretrain": str(tiny_task["pretrain"])}, minillm={"pt_kd_ratio": 0.5}))
        models = load_models(cfg, need_teacher=method != "sft")
        meth = get_method(method)(cfg, models, load_run_data(cfg, models.tokenizer))
        exp = meth.collect(0)
        catcher = GradCatcher(models.student)
        rows[mode] = (optimise(meth, models.student, exp.updates[0], catcher, 0.0), catcher.grads[0])
    (on, g_on), (off, g_off) = rows["on"], rows["off"]
    for k in off:
        if k != "tokens":
            assert on[k] == pytest.approx(off[k], rel=1e-5, abs=1e-7), k
    assert {"pt"} <= set(off)
    for n in g_off:
        torch.testing.assert_close(g_on[n], g_off[n], rtol=1e-4, atol=1e-6)


def test_a_scaled_head_is_not_fused(tiny_task: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    class Scaled(GPT2LMHeadModel):
        def forward(self, *a: Any, **k: Any) -> Any:
            out = super().forward(*a, **k)
            out.logits = out.logits * 2.0  # a logit scale the head alone does not give
            return out

    plain = AutoModelForCausalLM.from_pretrained(tiny_task["student"])
    scaled = Scaled.from_pretrained(tiny_task["student"])
    V = plain.config.vocab_size
    assert output_head(plain, V) is not None
    assert output_head(scaled, V) is None
