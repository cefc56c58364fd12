"""Token-level KD (``method: kd``): every divergence trains, the logged divergence matches a float64
reference, ratio=0 is SFT, on-policy steps sample their own responses, and resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config_dict
from minillm.config import config_from_dict
from minillm.data import load_run_data
from minillm.data.instruct import EpochSampler, collate_lm
from minillm.errors import UserError
from minillm.losses import DIVERGENCES
from minillm.methods.kd import KD
from minillm.models import load_models
from minillm.trainer import train


def kd_config(task: dict[str, Path], out: Path, steps: int = 2, **kd: object):
    return config_from_dict(tiny_config_dict(task, out, method="kd", kd=kd, train={"max_steps": steps, "eval_every": 100}))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
def test_every_divergence_trains(tiny_task, tmp_path, loss):
    out = train(kd_config(tiny_task, tmp_path / loss, loss=loss, beta=0.3, skew_alpha=0.2))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["kd"] > 0 and r["ce"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
        assert r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"], rel=1e-5)
    before, after = weights(tiny_task["student"]), weights(out / "final")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2


def test_logged_forward_kl_matches_float64_reference(tiny_task, tmp_path):
    T = 2.0
    cfg = kd_config(tiny_task, tmp_path / "fkl", steps=1, loss="forward_kl", ratio=1.0, temperature=T)
    row = metrics(train(cfg))[0]
    assert row["loss"] == pytest.approx(row["kd"], rel=1e-6)  # ratio 1: CE is logged, not trained

    # independent reference: the first step's data batches, both models in float64, KL from its definition
    models = load_models(cfg, need_teacher=True)
    data = load_run_data(cfg, models.tokenizer)
    t = cfg.train
    items = [data.train[i] for i in EpochSampler(len(data.train), cfg.seed).take(t.sequences_per_step)]
    num, den = 0.0, 0.0
    for start in range(0, len(items), t.batch_size):
        b = collate_lm(items[start : start + t.batch_size], models.tokenizer.pad_token_id)
        with torch.no_grad():
            s = models.student.double()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            p_logits = models.teacher.double()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        logp, logq = torch.log_softmax(p_logits / T, -1), torch.log_softmax(s / T, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        num += float((kl * b["loss_mask"]).sum())
        den += float(b["loss_mask"].sum())
    # float32 sums over the vocabulary cancel to ~1e-7 per token (eps x entropy); a wrong temperature,
    # mask or normalisation moves the value by far more
    assert row["kd"] == pytest.approx(num / den, rel=1e-4, abs=1e-6)


def test_ratio_zero_is_sft(tiny_task, tmp_path):
    kd_out = train(kd_config(tiny_task, tmp_path / "kd", ratio=0.0))
    sft_cfg = tiny_config_dict(tiny_task, tmp_path / "sft", method="sft", train={"max_steps": 2, "eval_every": 100})
    sft_out = train(config_from_dict(sft_cfg))
    for k, s in zip(metrics(kd_out), metrics(sft_out)):
        assert k["loss"] == pytest.approx(s["loss"], rel=1e-6)
        assert k["ce"] == pytest.approx(s["ce"], rel=1e-6)
    a, b = weights(kd_out / "final"), weights(sft_out / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_onpolicy_batches_are_student_samples_without_ce(tiny_task, tmp_path):
    cfg = kd_config(tiny_task, tmp_path / "op", onpolicy_fraction=1.0, ratio=1.0)
    models = load_models(cfg, need_teacher=True)
    data = load_run_data(cfg, models.tokenizer)
    method = KD(cfg, models, data)
    exp = method.collect(0)
    assert exp.metrics["onpolicy"] == 1.0
    items = [data.train[i] for i in EpochSampler(len(data.train), cfg.seed).take(cfg.train.sequences_per_step)]
    differ = 0
    for mb, start in zip(exp.updates[0], range(0, len(items), cfg.train.batch_size)):
        chunk = items[start : start + cfg.train.batch_size]
        for b, x in enumerate(chunk):
            n_prompt = len(x.prompt_ids)
            assert mb["input_ids"][b, :n_prompt].tolist() == x.prompt_ids  # same prompts as the data step
            resp = mb["input_ids"][b, n_prompt:][mb["attention_mask"][b, n_prompt:].bool()].tolist()
            assert int(mb["loss_mask"][b].sum()) == len(resp) >= 1
            differ += resp != x.response_ids
        terms = method.loss_terms(models.student, mb)
        assert "ce" not in terms and set(terms) == {"kd"}
    assert differ >= len(items) - 1  # a random student does not reproduce the references
    # the same step samples the same responses (seeds depend on example and step only)
    again = KD(cfg, models, load_run_data(cfg, models.tokenizer)).collect(0)
    for a, b in zip(exp.updates[0], again.updates[0]):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_resumed_mixed_run_equals_uninterrupted(tiny_task, tmp_path):
    fresh = train(kd_config(tiny_task, tmp_path / "fresh", steps=4, onpolicy_fraction=0.5))
    rows = metrics(fresh)
    kinds = [r["onpolicy"] for r in rows]
    assert 0.0 in kinds and 1.0 in kinds, kinds  # the test must cover both kinds of step
    assert all(("ce" in r) == (r["onpolicy"] == 0.0) for r in rows)

    train(kd_config(tiny_task, tmp_path / "split", steps=2, onpolicy_fraction=0.5))
    resumed = train(kd_config(tiny_task, tmp_path / "split", steps=4, onpolicy_fraction=0.5))
    assert [r["loss"] for r in metrics(resumed)] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    a, b = weights(fresh / "final"), weights(resumed / "final")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_bad_kd_settings_are_user_errors(tiny_task, tmp_path):
    cfg = kd_config(tiny_task, tmp_path / "bad", loss="kl_forward")
    models = load_models(cfg, need_teacher=True)
    data = load_run_data(cfg, models.tokenizer)
    with pytest.raises(UserError, match=r"kd.loss: unknown divergence 'kl_forward'; choose one of"):
        KD(cfg, models, data)
    cfg = kd_config(tiny_task, tmp_path / "bad", onpolicy_fraction=0.5, ratio=0.0)
    with pytest.raises(UserError, match="kd.onpolicy_fraction"):
        KD(cfg, models, data)


def test_pretrain_term_joins_the_loss(tiny_task, tmp_path):
    d = tiny_config_dict(tiny_task, tmp_path / "pt", method="kd", kd={"ratio": 0.3},
                         data={"pretrain": str(tiny_task["pretrain"])}, train={"max_steps": 1, "pt_coef": 0.7})
    row = metrics(train(config_from_dict(d)))[0]
    assert row["pt"] > 0
    assert row["loss"] == pytest.approx(0.3 * row["kd"] + 0.7 * row["ce"] + 0.7 * row["pt"], rel=1e-5)
