"""GPU-only checks (marker `gpu`; CPU CI skips them by name): the CUDA-graph rollout engine and a
training run under bf16 autocast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config_dict
from test_engine import compare_engines

pytestmark = pytest.mark.gpu


def test_graph_engine_matches_plain_loop_on_cuda() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    compare_engines("cuda", use_graph=True)


def test_minillm_trains_on_cuda_with_graph_rollouts(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    import json

    from minillm.config import config_from_dict
    from minillm.trainer import train

    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", method="minillm",
                                            train={"device": "cuda", "max_steps": 4}, generation={"engine": "static"}))
    out = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (out / "final" / "config.json").exists()


def test_windowed_graphs_match_plain_loop_on_cuda() -> None:
    """One CUDA graph per attention window (views of the caches cut to the window's end): the
    same draws as the plain loop."""
    from minillm.decoding import Decoding, row_seeds, sample
    from minillm.decoding.static import decode
    from test_engine import _models

    torch.backends.cuda.matmul.allow_tf32 = False
    tok, V, student, teacher, llama = _models("cuda")
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [20]]
    seeds = row_seeds(3, range(len(prompts)))
    for model, t, alpha in ((student, teacher, 0.2), (llama, None, 0.0)):
        want = sample(model, prompts, seeds, max_new_tokens=30, stop_ids=[tok.eos_token_id], pad_id=0, vocab_size=V,
                      teacher=t, alpha=alpha, engine="eager")
        got = decode(model, prompts, seeds, Decoding(30, (tok.eos_token_id,), 0, V, alpha=alpha), t, use_graph=True, window=7)
        assert torch.equal(got.response_ids, want.response_ids)
        torch.testing.assert_close(got.logq, want.logq, atol=1e-4, rtol=0)


def test_fused_head_under_bf16_autocast_matches_materialised_logits() -> None:
    from minillm.fused import Head, head_terms

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(2, 64, 128, device="cuda", generator=g).requires_grad_(True)
    w = (torch.randn(1000, 128, device="cuda", generator=g) * 0.1).requires_grad_(True)
    t = torch.randn(2, 64, 1000, device="cuda", generator=g).bfloat16()
    y = torch.randint(0, 1000, (2, 64), device="cuda", generator=g)
    res = []
    for fused in (True, False):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x = h if fused else Head(w, None, 1000).logits(h)
            out = head_terms(x, Head(w, None, 1000) if fused else None, targets_BT=y, divergence="reverse_kl", teacher_BTD=t)
            loss = (out["logprob"] + out["divergence"]).sum()
        res.append((float(loss), torch.autograd.grad(loss, [h, w])))
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-3)
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
