"""Validation during training: teacher-forced loss on responses, and sampled Rouge-L."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from minillm.config import Config
from minillm.data.formats import Example
from minillm.data.instruct import Encoded, collate_lm
from minillm.decoding import generate
from minillm.distributed import Dist
from minillm.losses import token_cross_entropy
from minillm.models import vocab_logits
from minillm.text_metrics import rouge_l


@torch.no_grad()
def response_loss(
    model: Any, items: Sequence[Encoded], pad_id: int, vocab_size: int, batch_size: int, autocast: torch.dtype | None = None
) -> tuple[float, int]:
    """Mean -log q over the response tokens of ``items`` (and the token count)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        b = collate_lm(items[start : start + batch_size], pad_id)
        ctx = torch.autocast(dev.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev), use_cache=False).logits
        ce = token_cross_entropy(vocab_logits(logits, vocab_size)[:, :-1], b["targets"].to(dev))
        mask = b["loss_mask"].to(dev)
        total += float((ce * mask).sum())
        count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1), count


def sampled_rouge(
    cfg: Config, model: Any, tokenizer: Any, vocab_size: int, items: Sequence[Encoded], examples: Sequence[Example],
    autocast: torch.dtype | None = None,
) -> tuple[float, list[str]]:
    """Rouge-L of one sampled response per prompt (generation.* settings, seed = run seed)."""
    g = cfg.generation
    ids = generate(
        model, [x.prompt_ids for x in items], [x.index for x in items], seed=cfg.seed, tokenizer=tokenizer,
        vocab_size=vocab_size, max_new_tokens=g.max_new_tokens, max_len=cfg.data.max_len,
        batch_size=cfg.train.eval_batch_size, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
        no_repeat_ngram_size=g.no_repeat_ngram_size, autocast=autocast, engine=g.engine,
    )
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
    refs = [examples[x.index].references or [examples[x.index].response or ""] for x in items]
    return rouge_l(texts, refs), texts


def validate(cfg: Config, model: Any, tokenizer: Any, vocab_size: int, items: Sequence[Encoded], examples: Sequence[Example],
             autocast: torch.dtype | None = None, dist: Dist | None = None) -> dict[str, float]:
    """``valid_loss`` always; ``valid_rouge_l`` when checkpoints are selected by Rouge-L. Under
    several ranks each scores a part of the items and the sums are added up: the same numbers as
    one process (a sharded model must be held gathered, see :func:`minillm.parallel.gathered`)."""
    dist = dist or Dist()
    items = list(items)[: cfg.train.eval_max_examples] if cfg.train.eval_max_examples else list(items)
    if not items:
        return {}
    mine = dist.split(items)
    loss, count = response_loss(model, mine, tokenizer.pad_token_id, vocab_size, cfg.train.eval_batch_size, autocast) if mine else (0.0, 0)
    sums = {"loss": loss * count, "tokens": count, "rouge": 0.0}
    if cfg.train.select_by == "rouge_l" and mine:
        sums["rouge"] = sampled_rouge(cfg, model, tokenizer, vocab_size, mine, examples, autocast)[0] * len(mine)
    sums = dist.sum_values(sums)
    out = {"valid_loss": sums["loss"] / max(sums["tokens"], 1)}
    if cfg.train.select_by == "rouge_l":
        out["valid_rouge_l"] = sums["rouge"] / len(items)
    return out
