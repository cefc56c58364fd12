"""The static-cache engine draws the same tokens as the plain decode loop (CPU: eager steps;
tests/test_gpu.py checks the CUDA-graph replay)."""

from __future__ import annotations

import pytest
import torch

from minillm.decoding import row_seeds, sample


def _models(device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from minillm.data.task import corpus_texts
    from minillm.tiny import build_word_tokenizer, tiny_gpt2

    tok = build_word_tokenizer(corpus_texts())
    V = len(tok)
    student = tiny_gpt2(tok, 1, 32, seed=1).to(device).eval()
    teacher = tiny_gpt2(tok, 2, 48, seed=0).to(device).eval()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=0,
    )).to(device).eval()
    return tok, V, student, teacher, llama


def compare_engines(device: str, use_graph: bool | None = None) -> None:
    tok, V, student, teacher, llama = _models(device)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [20]]
    seeds = row_seeds(3, range(len(prompts)))
    cases = [(student, None, 0.0), (student, teacher, 0.2), (llama, None, 0.0)]
    for model, teacher_m, alpha in cases:
        kw = dict(max_new_tokens=20, stop_ids=[tok.eos_token_id], pad_id=0, vocab_size=V, teacher=teacher_m, alpha=alpha)
        a = sample(model, prompts, seeds, engine="eager", **kw)
        b = sample(model, prompts, seeds, engine="static", **kw)
        assert torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.response_mask, b.response_mask)
        torch.testing.assert_close(a.logq, b.logq, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.logmix, b.logmix, atol=1e-4, rtol=0)
        if teacher_m is not None:
            torch.testing.assert_close(a.logp, b.logp, atol=1e-4, rtol=0)


def test_static_engine_matches_plain_loop_on_cpu() -> None:
    compare_engines("cpu")


def test_static_engine_with_top_k_top_p_and_temperature() -> None:
    tok, V, student, teacher, _ = _models()
    prompts = [[5, 6, 7], [8]]
    seeds = row_seeds(9, range(2))
    kw = dict(max_new_tokens=12, stop_ids=[tok.eos_token_id], pad_id=0, vocab_size=V, teacher=teacher, alpha=0.3,
              temperature=0.7, top_k=20, top_p=0.9)
    a = sample(student, prompts, seeds, engine="eager", **kw)
    b = sample(student, prompts, seeds, engine="static", **kw)
    assert torch.equal(a.response_ids, b.response_ids)


def test_unknown_alpha_without_teacher_raises() -> None:
    tok, V, student, _, _ = _models()
    with pytest.raises(ValueError, match="teacher"):
        sample(student, [[5]], row_seeds(1, [0]), max_new_tokens=3, stop_ids=[], pad_id=0, vocab_size=V, alpha=0.2, engine="static")


def test_warm_up_is_undone_exactly() -> None:
    """Graph capture first runs warm-up steps and rewinds them; the draw must not change."""
    from minillm.decoding import Decoding
    from minillm.decoding.static import decode

    tok, V, student, teacher, llama = _models()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    seeds = row_seeds(4, range(2))
    for model, t, alpha in [(student, teacher, 0.2), (llama, None, 0.0)]:
        kw = dict(max_new_tokens=10, stop_ids=[tok.eos_token_id], pad_id=0, vocab_size=V, teacher=t, alpha=alpha)
        a = sample(model, prompts, seeds, engine="eager", **kw)
        d = Decoding(10, (tok.eos_token_id,), 0, V, alpha=alpha)
        b = decode(model, prompts, seeds, d, t, use_graph=False, warm_up_steps=3)
        assert torch.equal(a.response_ids, b.response_ids)


def test_auto_engine_falls_back_to_the_plain_loop_with_a_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`auto` tries the static engine (on CUDA); for a model it cannot run, it warns once and the
    plain loop draws the same tokens. An explicit `static` raises instead."""
    import minillm.decoding as decoding

    tok, V, student, _, _ = _models()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("static cache not supported by this architecture")

    monkeypatch.setitem(decoding.BACKENDS, "static", broken)
    monkeypatch.setattr(decoding, "_STATIC_FAILED", [])
    kw = dict(max_new_tokens=6, stop_ids=[tok.eos_token_id], pad_id=0, vocab_size=V)
    prompts, seeds = [[5, 6], [7]], row_seeds(1, [0, 1])
    with pytest.raises(RuntimeError, match="static cache"):
        sample(student, prompts, seeds, engine="static", **kw)
    monkeypatch.setattr(decoding, "_auto_engine", lambda device: "static" if not decoding._STATIC_FAILED else "eager")
    with caplog.at_level("WARNING", logger="minillm"):
        got = sample(student, prompts, seeds, engine="auto", **kw)
    assert "failed" in caplog.text and decoding._STATIC_FAILED
    want = sample(student, prompts, seeds, engine="eager", **kw)
    assert torch.equal(got.response_ids, want.response_ids)
