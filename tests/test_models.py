"""Teacher/student pairs: embedding matrices padded to different sizes are accepted (only the
tokenizer's real vocabulary is compared and used), differing tokenizers are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config_dict
from minillm.config import config_from_dict
from minillm.errors import UserError
from minillm.models import check_same_vocabulary, vocab_logits


def test_padded_teacher_embeddings_are_accepted(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.trainer import train

    tok = AutoTokenizer.from_pretrained(tiny_task["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_task["teacher"])
    teacher.resize_token_embeddings(len(tok) + 64)  # like Qwen2.5's 152064 rows for 151665 tokens
    with torch.no_grad():  # make the padding rows the most likely tokens: they must still never be drawn
        teacher.get_output_embeddings().weight[len(tok):] = teacher.get_output_embeddings().weight[: 64] * 50
    padded = tmp_path / "padded-teacher"
    teacher.save_pretrained(padded)
    tok.save_pretrained(padded)
    assert teacher.get_output_embeddings().weight.shape[0] == len(tok) + 64

    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", method="minillm", teacher={"path": str(padded)}))
    out = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (out / "final" / "config.json").exists()


def test_vocab_logits_cuts_padding_rows() -> None:
    logits = torch.randn(2, 3, 10)
    assert vocab_logits(logits, 7).shape == (2, 3, 7)
    assert vocab_logits(logits, 10) is logits


def test_differing_tokenizers_are_refused() -> None:
    from minillm.tiny import build_word_tokenizer

    a = build_word_tokenizer(["one two three"])
    b = build_word_tokenizer(["one two four"])
    assert check_same_vocabulary(a, build_word_tokenizer(["one two three"])) == len(a)
    with pytest.raises(UserError, match="tokenizers differ"):
        check_same_vocabulary(a, b)
