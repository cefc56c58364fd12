"""The pieces of distributed training that run in one process: how work is split over ranks, the
global normalisation of a step split over ranks, activation checkpointing, the decoding-engine
fallback for sharded models, FSDP2 in a world of one, and the layout keys' config checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import minillm.trainer as trainer_mod
from conftest import tiny_config_dict
from minillm.config import config_from_dict, load_config
from minillm.data import load_run_data
from minillm.distributed import Dist, init_distributed
from minillm.errors import UserError
from minillm.methods.sft import SFT
from minillm.models import load_models
from minillm.parallel import checkpoint_blocks, decoding_config
from minillm.trainer import _comparable_hash, build_optimizer, optimise, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_covers_every_item_once_in_order(world: int) -> None:
    for n in range(10):
        items = list(range(n))
        parts = [Dist(rank=r, world=world).split(items) for r in range(world)]
        assert [x for p in parts for x in p] == items  # gather() joins them in rank order: the global order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_share_deals_every_micro_batch_once_and_pads_to_equal_counts(world: int) -> None:
    for m in range(1, 8):
        mbs = [{"i": torch.tensor(i)} for i in range(m)]
        shares = [Dist(rank=r, world=world).share(mbs) for r in range(world)]
        assert {len(s) for s in shares} == {-(-m // world)}  # every rank runs the same number of passes
        real = sorted(int(mb["i"]) for s in shares for mb, is_real in s if is_real)
        assert real == list(range(m))
        assert all(mb is mbs[0] for s in shares for mb, is_real in s if not is_real)


class _Rank(Dist):
    """Rank ``rank`` of a world of ``world`` without a process group: reductions are left undone,
    so the test can add up what each rank computed."""

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        return dict(values)


def test_a_step_split_over_ranks_adds_up_to_the_one_process_step(tiny_task: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Three micro-batches with different token counts over two ranks (rank 1 runs a padding copy):
    the ranks' gradients and logged sums add up to the one-process step's, because every rank divides
    by the token count of the whole step."""
    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", "sft", train={"batch_size": 3, "grad_accum": 3}))
    models = load_models(cfg, need_teacher=False)
    method = SFT(cfg, models, load_run_data(cfg, models.tokenizer))
    mbs = method.collect(0).updates[0]
    assert len(mbs) == 3 and len({float(mb["loss_mask"].sum()) for mb in mbs}) > 1
    model = models.student
    opt, _ = build_optimizer(cfg, model, 10)
    seen: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(trainer_mod, "reduce_gradients",
                        lambda m, d: seen.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    monkeypatch.setattr(opt, "step", lambda *a, **k: None)  # keep the weights: every call sees the same model
    rows = [optimise(method, model, mbs, opt, 0.0, dist=d) for d in (Dist(), _Rank(rank=0, world=2), _Rank(rank=1, world=2))]
    one, r0, r1 = seen
    for name in one:
        torch.testing.assert_close(r0[name] + r1[name], one[name], rtol=1e-5, atol=1e-7)
    assert rows[1]["loss"] + rows[2]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6)
    assert rows[1]["ce"] + rows[2]["ce"] == pytest.approx(rows[0]["ce"], rel=1e-6)
    assert rows[1]["tokens"] + rows[2]["tokens"] == rows[0]["tokens"]  # the padding copy is not counted


def test_activation_checkpointing_recomputes_blocks_and_changes_nothing(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", "sft"))
    models = load_models(cfg, need_teacher=False)
    method = SFT(cfg, models, load_run_data(cfg, models.tokenizer))
    mb = method.collect(0).updates[0][0]

    def grads(model: Any) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        term = method.loss_terms(model, mb)["ce"]
        loss = (term.values * mb["loss_mask"]).sum() / mb["loss_mask"].sum()
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    model = models.student
    loss_plain, g_plain = grads(model)
    calls = [0]
    blocks = model.transformer.h
    for b in blocks:
        inner = b.forward
        b.forward = lambda *a, _f=inner, **k: (calls.__setitem__(0, calls[0] + 1), _f(*a, **k))[1]
    assert checkpoint_blocks(model) == len(blocks)
    loss_ckpt, g_ckpt = grads(model)
    assert calls[0] == 2 * len(blocks)  # each block ran again in backward
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-7)
    calls[0] = 0
    with torch.no_grad():
        method.loss_terms(model, mb)
    assert calls[0] == len(blocks)  # no recomputation without gradients (decoding, scoring)


def test_sharded_models_decode_with_the_plain_loop(tiny_task: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import minillm.parallel as parallel

    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", "minillm"))
    models = load_models(cfg, need_teacher=True)
    assert decoding_config(cfg, models) is cfg  # whole models: untouched
    monkeypatch.setattr(parallel, "is_sharded", lambda m: m is models.teacher)
    with caplog.at_level(logging.INFO, logger="minillm"):
        assert decoding_config(cfg, models).generation.engine == "eager"
    assert "because the teacher is FSDP-sharded" in caplog.text
    static = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", "minillm", generation={"engine": "static"}))
    with pytest.raises(UserError, match="generation.engine: static needs whole models, but the teacher is FSDP-sharded"):
        decoding_config(static, models)


def test_the_teacher_is_sized_before_it_is_loaded(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """train.teacher_sharding=auto decides from the architecture on the meta device, so a teacher
    too large for one GPU never has to be loaded whole to find that out."""
    from transformers import AutoModelForCausalLM

    from minillm.parallel import planned_weight_bytes

    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", "kd"))
    loaded = AutoModelForCausalLM.from_pretrained(tiny_task["teacher"])
    n = sum(p.numel() for p in loaded.parameters())
    assert planned_weight_bytes(cfg.teacher, torch.bfloat16) == 2 * n
    assert planned_weight_bytes(config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", "kd", teacher={"path": str(tmp_path)})).teacher,
                                torch.bfloat16) is None  # no config there: unknown, and auto then shards


def test_fsdp_in_one_process_equals_the_plain_run(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """``minillm train`` without torchrun and with train.parallel=fsdp opens a group of one; its run
    and its distributed checkpoints match the plain run's."""
    runs = {}
    for layout in ("ddp", "fsdp"):
        d = tiny_config_dict(tiny_task, tmp_path / layout, "sft", train={"max_steps": 2, "eval_every": 2, "save_every": 2, "parallel": layout})
        runs[layout] = train(config_from_dict(d))
    rows = [[json.loads(ln) for ln in (runs[k] / "metrics.jsonl").read_text().splitlines()] for k in ("ddp", "fsdp")]
    for a, b in zip(*rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert (runs["fsdp"] / "checkpoints" / "step_00000002" / "dcp").is_dir()
    assert not torch.distributed.is_initialized()  # the run closed the group it opened


def test_layout_keys_are_checked_and_do_not_block_resuming() -> None:
    for override, msg in [("train.parallel=zero3", "train.parallel: must be one of"),
                          ("train.teacher_sharding=half", "train.teacher_sharding: must be one of"),
                          ("train.dist_timeout_s=0", "train.dist_timeout_s: must be positive")]:
        with pytest.raises(UserError, match=msg):
            load_config(None, [override])
    base = _comparable_hash(load_config(None, []))
    for override in ("train.parallel=fsdp", "train.teacher_sharding=shard", "train.activation_checkpointing=true", "output_dir=elsewhere"):
        assert _comparable_hash(load_config(None, [override])) == base, override  # where it runs, not what it computes
    assert _comparable_hash(load_config(None, ["train.lr=1e-4"])) != base


def test_one_process_opens_no_group_and_a_pinned_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    d = init_distributed(load_config(None, []).train)
    assert (d.world, d.rank, d.main) == (1, 0, True) and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="train.device: cuda:1 would put every rank on one GPU"):
        init_distributed(load_config(None, ["train.device=cuda:1"]).train)


@pytest.mark.gpu
def test_fsdp_on_one_gpu_matches_ddp_in_bf16_and_exports(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """FSDP2 with one rank on one GPU (bf16 weights gathered for compute, float32 master weights and
    reductions; the teacher sharded too), against the whole-model run under bf16 autocast; then the
    consolidation of its distributed checkpoint."""
    from minillm.export import export
    from test_resume import weights

    runs = {}
    for layout in ("ddp", "fsdp"):
        d = tiny_config_dict(tiny_task, tmp_path / layout, "minillm", train={"device": "cuda", "parallel": layout, "teacher_sharding":
                                                                                "shard" if layout == "fsdp" else "whole"})
        runs[layout] = train(config_from_dict(d))
    rows = [[json.loads(ln) for ln in (runs[k] / "metrics.jsonl").read_text().splitlines()] for k in ("ddp", "fsdp")]
    for a, b in zip(*rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2, abs=1e-2)  # bf16 rounding of weights vs of activations
    final, exported = weights(runs["fsdp"] / "final"), weights(export(runs["fsdp"], tmp_path / "hf"))
    for k in final:
        torch.testing.assert_close(exported[k], final[k], rtol=0, atol=0)


def test_fused_losses_under_fsdp_fall_back_to_the_models_logits(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """With train.fused_loss=on and a sharded student, the losses take the model's own logits: a
    head taken while the weights are gathered (score re-scores the student inside the gathered
    rollout phase with minillm.rescore) would read freed memory once they are sharded again."""
    from minillm.methods.base import output_head
    from minillm.parallel import gathered

    rows = {}
    for layout in ("ddp", "fsdp"):
        d = tiny_config_dict(tiny_task, tmp_path / layout, "minillm", train={"max_steps": 2, "eval_every": 2, "save_every": 2,
                                                                                "parallel": layout, "fused_loss": "on"},
                             minillm={"rescore": True, "rollouts_per_step": 8, "ppo_epochs": 1})
        out = train(config_from_dict(d))
        rows[layout] = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["ddp"], rows["fsdp"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["single_step"] == pytest.approx(a["single_step"], rel=1e-5)
    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    from minillm.tiny import tiny_gpt2

    tok = AutoTokenizer.from_pretrained(tiny_task["student"])
    model = tiny_gpt2(tok, n_layer=1, n_embd=32, seed=1)
    assert output_head(model, len(tok)) is not None  # a plain GPT-2 head fuses
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sharded = tiny_gpt2(tok, n_layer=1, n_embd=32, seed=1)
        fully_shard(sharded)
        with gathered(sharded):  # the weights are plain tensors here, but only until the phase ends
            assert output_head(sharded, len(tok)) is None
    finally:
        tdist.destroy_process_group()
