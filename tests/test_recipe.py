"""``minillm.recipe``: the table applied at load, explicit keys winning, config.yaml recording it; and
the reference recipe's loss and gradient on a fixed batch against a float64 computation written
from the reference code's definition (minibatch whitening with padding counted included)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import GradCatcher, tiny_config_dict
from minillm.config import RECIPES, Config, config_from_dict, load_config, save_config
from minillm.data import load_run_data
from minillm.losses import whiten_padded
from minillm.methods.minillm import MiniLLM, Sampled, collate_rollouts
from minillm.models import load_models
from minillm.trainer import build_optimizer, optimise

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def test_paper_recipe_is_exactly_the_defaults() -> None:
    assert RECIPES["paper"] == {}
    assert load_config(None, ["minillm.recipe=paper"]) == Config()


def test_reference_recipe_sets_its_table_and_explicit_keys_win(tmp_path: Path) -> None:
    cfg = load_config(None, ["minillm.recipe=reference"])
    m, t = cfg.minillm, cfg.train
    assert (m.reward_scale, m.reward_clip, m.gamma, m.include_current_reward) == (2.0, 100.0, 0.95, True)
    assert (m.whiten, m.single_step_weight, m.pt_kd_ratio, m.rescore) == ("minibatch_padded", False, 0.5, True)
    assert (t.adam_betas, t.weight_decay, t.weight_decay_on) == ([0.9, 0.95], 1e-6, "all")
    # what the reference code shares with the paper stays the paper's
    assert (m.alpha, m.clip, m.length_norm, m.single_step, m.ppo_epochs) == (0.2, 0.2, True, True, 4)

    p = tmp_path / "run.yaml"
    p.write_text("minillm:\n  recipe: reference\n  gamma: 0.9\ntrain:\n  weight_decay: 0.0\n")
    cfg = load_config(p, ["minillm.whiten=none"])
    assert (cfg.minillm.gamma, cfg.train.weight_decay, cfg.minillm.whiten) == (0.9, 0.0, "none")  # explicit keys win
    assert cfg.minillm.reward_scale == 2.0 and cfg.train.adam_betas == [0.9, 0.95]

    # config.yaml records the resolved values; reading it back gives the same config
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["minillm"]["recipe"] == "reference" and saved["minillm"]["reward_clip"] == 100.0
    assert saved["train"]["adam_betas"] == [0.9, 0.95] and saved["minillm"]["gamma"] == 0.9
    assert load_config(tmp_path / "config.yaml") == cfg


def test_recipe_errors_and_the_old_whiten_switch(tmp_path: Path) -> None:
    from minillm.errors import UserError

    p = tmp_path / "bad.yaml"
    p.write_text("method: minillm\nminillm:\n  recipe: lmops\n")
    with pytest.raises(UserError, match=r"bad.yaml:3: minillm.recipe: must be one of \('paper', 'reference'\)"):
        load_config(p)
    assert load_config(None, ["minillm.whiten=true"]).minillm.whiten == "rollout"  # before 0.2 a switch
    assert load_config(None, ["minillm.whiten=false"]).minillm.whiten == "none"
    with pytest.raises(UserError, match="minillm.whiten: must be one of"):
        load_config(None, ["minillm.whiten=batch"])


def test_reference_optimizer_decays_every_parameter() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt, _ = build_optimizer(load_config(None, ["minillm.recipe=reference"]), model, 10)
    decayed = [p for g in opt.param_groups if g["weight_decay"] == 1e-6 for p in g["params"]]
    assert len(decayed) == len(list(model.parameters())) and all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    opt, _ = build_optimizer(Config(), model, 10)  # the paper's: matrices only
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3] and opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_whiten_padded_is_the_reference_statistic() -> None:
    x = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])  # zeros are padding: counted
    vals = x.flatten().tolist()
    mean = sum(vals) / 6
    var = sum((v - mean) ** 2 for v in vals) / 6  # get_global_statistics: sum / count over every position
    want = [(v - mean) / math.sqrt(var + 1e-8) for v in vals]
    assert whiten_padded(x).flatten().tolist() == pytest.approx(want, rel=1e-6)
    assert whiten_padded(torch.tensor([[3.0]])).tolist() == [[0.0]]  # one position: no variance, no NaN


def _whiten_on_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]) if rank == 0 else torch.tensor([[3.0, 5.0]])
    torch.save(whiten_padded(x), f"{out}.{rank}")
    dist.destroy_process_group()


def test_whiten_padded_pools_every_rank(tmp_path: Path) -> None:
    """Under torch.distributed the statistics are over every rank's positions (the reference's
    get_global_statistics), so two ranks whiten as if their mini-batches were one."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_whiten_on_rank, args=(port, str(tmp_path / "w")), nprocs=2)
    got = torch.cat([torch.load(tmp_path / f"w.{r}").flatten() for r in (0, 1)])
    vals = [1.0, 2.0, 0.0, 4.0, 0.0, 0.0, 3.0, 5.0]
    mean = sum(vals) / 8
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 8 + 1e-8)
    assert got.tolist() == pytest.approx([(v - mean) / std for v in vals], rel=1e-6)


# --- the pinned loss and gradient ------------------------------------------------------------


def _naive_reference(student: Any, teacher: Any, batch: dict[str, torch.Tensor], prompts: list[list[int]],
                     responses: list[list[int]], logw: list[list[float]], count_padding: bool = True) -> torch.Tensor:
    """The reference recipe's loss in float64, token by token from its definition: r_t = clip(2 (log p
    - log q_old), +-100); A_t = sum_{t'>=t} 0.95^(t'-t) r_t' / (T - t); the mini-batch's A padded
    with zeros to its longest response and whitened over all B x R positions (variance: sum / count);
    loss = mean_t max(-A rho, -A clip(rho, 0.8, 1.2)) + mean_t KL(q || p) (unweighted) +
    0.5 CE + 0.5 KL(p || q) on the pre-training batch. Each sequence runs alone, unpadded.
    ``count_padding=False``: whitened over the real tokens only (for contrast)."""
    B, R = len(responses), max(len(r) for r in responses)
    logq_all, logq_old_all, single_all, adv = [], [], [], torch.zeros(B, R, dtype=torch.float64)
    for b, (p, y) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + y])
        lq = F.log_softmax(student(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(y) - 1], -1)
        with torch.no_grad():
            lp = F.log_softmax(teacher(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(y) - 1], -1)
        tgt = torch.tensor(y)
        logq = lq[torch.arange(len(y)), tgt]
        logp = lp[torch.arange(len(y)), tgt]
        r = (2.0 * (logp - logq.detach())).clamp(-100, 100)
        T = len(y)
        for t in range(T):
            adv[b, t] = sum(0.95 ** (u - t) * r[u] for u in range(t, T)) / (T - t)
        logq_all.append(logq)
        logq_old_all.append(logq.detach())
        single_all.append((lq.exp() * (lq - lp)).sum(-1))
    real = torch.tensor([[t < len(y) for t in range(R)] for y in responses])
    flat = adv.flatten() if count_padding else adv[real]
    mean = flat.mean()
    var = ((flat - mean) ** 2).sum() / flat.numel()
    white = (adv - mean) / torch.sqrt(var + 1e-8)
    n = sum(len(y) for y in responses)
    pg = single = torch.zeros((), dtype=torch.float64)
    for b, y in enumerate(responses):
        rho = torch.exp(logq_all[b] - logq_old_all[b]) * torch.tensor(logw[b], dtype=torch.float64).exp()
        A = white[b, : len(y)]
        pg = pg + torch.maximum(-A * rho, -A * rho.clamp(0.8, 1.2)).sum()
        single = single + single_all[b].sum()
    ids = batch["pt_input_ids"]
    lq = F.log_softmax(student(input_ids=ids).logits[:, :-1], -1)
    with torch.no_grad():
        lp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1], -1)
    ce = -lq.gather(-1, batch["pt_targets"][..., None])[..., 0].mean()
    fkl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return pg / n + single / n + 0.5 * ce + 0.5 * fkl


@pytest.fixture(scope="module")
def reference_parts(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    d = tiny_config_dict(tiny_task, tmp_path_factory.mktemp("ref"), "minillm", data={"pretrain": str(tiny_task["pretrain"])},
                         minillm={"recipe": "reference"}, train={"batch_size": 3, "grad_accum": 1})
    cfg = config_from_dict(d)
    models = load_models(cfg, need_teacher=True)
    data = load_run_data(cfg, models.tokenizer)
    return cfg, models, data


def test_reference_recipe_loss_and_gradient_are_pinned(reference_parts: tuple[Any, ...]) -> None:
    cfg, models, data = reference_parts
    method = MiniLLM(cfg, models, data)
    student, teacher = models.student, models.teacher
    student.train(False)
    # a fixed batch: three prompts, responses of 5, 2 and 7 tokens (padding in two rows), fixed w_t
    gen = torch.Generator().manual_seed(0)
    prompts = [data.train[i].prompt_ids for i in range(3)]
    responses = [torch.randint(3, models.vocab_size, (n,), generator=gen).tolist() for n in (5, 2, 7)]
    logw = [(0.3 * torch.randn(len(y), generator=gen)).tolist() for y in responses]
    # the reference recipe re-scores both models teacher-forced, so the decode's log q is not read
    assert cfg.minillm.rescore and not method.reuse_q and not method.reuse_p
    samples = [Sampled(p, torch.tensor(y), torch.full((len(y),), float("nan")), torch.tensor(w))
               for p, y, w in zip(prompts, responses, logw)]
    rows, _ = method.score(samples, step=0)
    batch = method.add_pretrain(collate_rollouts(rows, method.pad_id))
    assert batch["response_mask"].sum() < batch["response_mask"].numel()  # padding is there to be counted

    catcher = GradCatcher(student)
    row = optimise(method, student, [batch], catcher, grad_clip=0.0)
    got = catcher.grads[0]

    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    pt = {k: v for k, v in batch.items() if k.startswith("pt_")}
    want_loss = _naive_reference(s64, t64, pt, prompts, responses, logw)
    want_loss.backward()
    assert row["loss"] == pytest.approx(want_loss.item(), rel=1e-5)
    assert set(row) >= {"pg", "single_step", "pt", "pt_kd"}
    for name, p in s64.named_parameters():
        if p.grad is None:
            continue
        err = float((got[name].double() - p.grad).norm() / p.grad.norm().clamp(min=1e-30))
        assert err < 1e-4, (name, err)  # float32 against float64

    # counting the padding is what moves the gradient: whitening over the real tokens only differs
    s64.zero_grad()
    _naive_reference(s64, t64, pt, prompts, responses, logw, count_padding=False).backward()
    moved = sum(float((got[n].double() - p.grad).norm() ** 2) for n, p in s64.named_parameters() if p.grad is not None)
    total = sum(float(p.grad.norm() ** 2) for p in s64.parameters() if p.grad is not None)
    assert math.sqrt(moved / total) > 0.1  # 27% on this batch (torch 2.13, CPU)
