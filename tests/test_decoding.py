"""The decoding package: the pruned Gumbel draw equals the full one, the stop hook, dropping
finished rows, kept logits and per-step KL, the packed teacher-forced layout, and the package's
import structure (the contract imports no backend; backends import only the contract)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch

from minillm.decoding import (
    BACKENDS,
    packed_sequence_batch,
    response_logits,
    row_seeds,
    sample,
    sequence_batch,
)
from minillm.decoding.contract import filter_logprobs, gumbel_argmax, gumbel_sample

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.mark.parametrize("V", [5, 64, 65, 3000, 50257])
def test_pruned_draw_equals_the_full_draw(V: int) -> None:
    """gumbel_argmax scores only the tokens that can still win: same token as scoring all of them,
    for flat (random-init) and peaked distributions, filtered ones, and many seeds and steps."""
    g = torch.Generator().manual_seed(V)
    for B, scale in ((1, 0.01), (16, 1.0), (33, 4.0), (8, 12.0)):
        lp = torch.log_softmax(torch.randn(B, V, generator=g) * scale, -1)
        seeds = torch.randint(-(2**62), 2**62, (B,), generator=g)
        for step, dist in ((0, lp), (7, lp), (3, filter_logprobs(lp, 0.7, 20, 0.9)), (5, filter_logprobs(lp, 1.0, 0, 0.3))):
            assert torch.equal(gumbel_argmax(dist, seeds, step), gumbel_sample(dist, seeds, step))


def test_pruned_draw_keeps_ties_and_one_hot_rows() -> None:
    """Rows with a single possible token, and exactly equal log-probabilities (ties are broken by the
    noise, as in the full draw)."""
    V = 4096
    lp = torch.full((3, V), -float("inf"))
    lp[0, 17] = 0.0  # greedy row
    lp[1] = torch.log(torch.full((V,), 1.0 / V))  # exactly uniform
    lp[2, :2] = torch.log(torch.tensor([0.5, 0.5]))
    seeds = row_seeds(5, range(3))
    for step in range(20):
        assert torch.equal(gumbel_argmax(lp, seeds, step), gumbel_sample(lp, seeds, step))


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    from minillm.data.task import corpus_texts
    from minillm.tiny import build_word_tokenizer, tiny_gpt2

    tok = build_word_tokenizer(corpus_texts())
    student = tiny_gpt2(tok, 1, 32, seed=1).eval()
    teacher = tiny_gpt2(tok, 2, 48, seed=0).eval()
    return {"tok": tok, "V": len(tok), "student": student, "teacher": teacher, "eos": tok.eos_token_id}


def _kw(m: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return dict(dict(max_new_tokens=16, stop_ids=[m["eos"]], pad_id=0, vocab_size=m["V"]), **kw)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [20], [30, 31, 32, 33]]


@pytest.mark.parametrize("engine", sorted(BACKENDS))
def test_all_done_hook_keeps_every_backend_stepping(models: dict[str, Any], engine: str) -> None:
    """Under FSDP every rank must run the same steps: a hook saying "another rank is not done" keeps
    the loop going past the local end, without changing what the rows drew."""
    stops = list(range(models["V"]))  # every row stops at its first token
    kw = _kw(models, max_new_tokens=40, stop_ids=stops, teacher=models["teacher"], alpha=0.2, engine=engine)
    seeds = row_seeds(1, range(len(PROMPTS)))
    calls: list[bool] = []

    def others_busy(local_done: bool) -> bool:
        calls.append(local_done)
        return False  # some other rank always has work left: run to the budget

    alone = sample(models["student"], PROMPTS, seeds, **kw)
    held = sample(models["student"], PROMPTS, seeds, all_done=others_busy, **kw)
    assert alone.response_ids.shape[1] == 1 and held.response_ids.shape[1] == 1  # cut to the longest real row
    assert torch.equal(alone.response_ids, held.response_ids)
    assert all(calls) and len(calls) >= 2  # asked at every check (each step; every 16 in the static engine)


def test_dropping_finished_rows_changes_nothing(models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain loop cuts finished rows out of its caches; the draws equal a loop that keeps them."""
    from minillm.decoding import plain

    the, dot = models["tok"].convert_tokens_to_ids(["the", "."])
    prompts = PROMPTS * 3
    seeds = row_seeds(2, range(len(prompts)))
    kw = _kw(models, max_new_tokens=24, stop_ids=[models["eos"], the, dot], teacher=models["teacher"], alpha=0.2, engine="eager")
    dropped: list[int] = []
    original = plain._Stepper.keep_rows
    monkeypatch.setattr(plain._Stepper, "keep_rows", lambda self, idx: (dropped.append(len(idx)), original(self, idx))[1])
    a = sample(models["student"], prompts, seeds, **kw)
    assert dropped, "some rows finish early and are dropped"
    monkeypatch.setattr(plain._Stepper, "can_drop_rows", lambda self: False)
    b = sample(models["student"], prompts, seeds, **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    for x, y in ((a.logq, b.logq), (a.logp, b.logp), (a.logmix, b.logmix), (a.kl, b.kl)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", sorted(BACKENDS))
def test_kept_logits_and_step_kl_match_teacher_forced_forwards(models: dict[str, Any], engine: str) -> None:
    r = sample(models["student"], PROMPTS, row_seeds(3, range(len(PROMPTS))), keep_logits=("student", "teacher"),
               **_kw(models, teacher=models["teacher"], alpha=0.2, engine=engine))
    seq = sequence_batch(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    P, R = r.prompt_ids.shape[1], r.response_ids.shape[1]
    mask = r.response_mask.bool()
    with torch.no_grad():
        q = response_logits(models["student"](**seq).logits, P, R)
        p = response_logits(models["teacher"](**seq).logits, P, R)
    assert r.logits_q is not None and r.logits_p is not None and r.kl is not None
    torch.testing.assert_close(r.logits_q[mask], q[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.logits_p[mask], p[mask], rtol=1e-4, atol=1e-4)
    lq, lp = torch.log_softmax(q.double(), -1), torch.log_softmax(p.double(), -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    torch.testing.assert_close(r.kl[mask].double(), kl[mask], rtol=1e-4, atol=1e-5)
    assert (r.kl[~mask] == 0).all()
    # only what was asked for is kept
    r2 = sample(models["student"], PROMPTS, row_seeds(3, range(len(PROMPTS))), keep_logits=("student",), **_kw(models, engine=engine))
    assert r2.logits_q is not None and r2.logits_p is None and r2.kl is None


def test_packed_layout_gives_the_same_response_logits(models: dict[str, Any]) -> None:
    """Rows moved to the left (prompt, response, padding) predict the response exactly like the
    left-padded layout, in a batch only as wide as its longest prompt + response."""
    from minillm.data.instruct import collate_prompts
    from minillm.decoding import Rollout

    p_ids, p_mask = collate_prompts(PROMPTS, 0)  # prompt lengths 5, 2, 3, 1, 4
    lengths_R = torch.tensor([2, 9, 16, 1, 5])  # the longest prompt has a short response
    ids = torch.randint(3, models["V"], (len(PROMPTS), 16), generator=torch.Generator().manual_seed(0))
    mask_R = (torch.arange(16)[None] < lengths_R[:, None]).float()
    r = Rollout(p_ids, p_mask, ids * mask_R.long(), mask_R, mask_R, None, mask_R, row_seeds(0, range(5)))
    seq = sequence_batch(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    packed, resp_pos = packed_sequence_batch(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    lengths = r.prompt_mask.sum(-1) + r.response_mask.sum(-1)
    assert packed["input_ids"].shape[1] == int(lengths.max()) < seq["input_ids"].shape[1]
    assert torch.equal(packed["attention_mask"].sum(-1), lengths.long())
    mask = r.response_mask.bool()
    with torch.no_grad():
        ref = response_logits(models["teacher"](**seq).logits, r.prompt_ids.shape[1], r.response_ids.shape[1])
        out = models["teacher"](**packed).logits
    got = out.gather(1, resp_pos[..., None].expand(-1, -1, out.shape[-1]))
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-4, atol=1e-5)


def test_backends_depend_on_the_contract_only() -> None:
    """No import cycle: the contract imports no backend, and a backend no other backend."""
    root = Path(__file__).resolve().parents[1] / "src" / "minillm" / "decoding"

    def imports(name: str) -> set[str]:
        tree = ast.parse((root / name).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imports("contract.py") if m.startswith("minillm.decoding")}
    for backend in ("plain.py", "static.py"):
        assert {m for m in imports(backend) if m.startswith("minillm.decoding")} == {"minillm.decoding.contract"}


def test_static_engine_attends_over_the_filled_part_only(models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 5 tokens: each step's caches are views cut to the window's end, and the draws
    equal the plain loop's (also with the warm-up that graph capture runs in every window)."""
    from minillm.decoding import Decoding, static

    lengths: list[int] = []
    real_view = static._window_view
    monkeypatch.setattr(static, "_window_view", lambda cache, n: (lengths.append(n), real_view(cache, n))[1])
    seeds = row_seeds(6, range(len(PROMPTS)))
    kw = _kw(models, max_new_tokens=18, teacher=models["teacher"], alpha=0.2)
    want = sample(models["student"], PROMPTS, seeds, engine="eager", **kw)
    d = Decoding(18, (models["eos"],), 0, models["V"], alpha=0.2)
    for warm in (0, 2):
        got = static.decode(models["student"], PROMPTS, seeds, d, models["teacher"], use_graph=False, window=5, warm_up_steps=warm)
        assert torch.equal(got.response_ids, want.response_ids)
        torch.testing.assert_close(got.logq, want.logq, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.kl, want.kl, rtol=1e-4, atol=1e-5)
    P = max(len(p) for p in PROMPTS)
    assert sorted(set(lengths)) == [P + 5, P + 10, P + 15]  # three cut windows, then the full length
