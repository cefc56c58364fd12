"""The plain decode loop: one incremental forward per model and token over dynamic KV caches.

Runs any causal LM transformers can run with a cache, on any device; the reference the other
backends are tested against. Rows that have finished are dropped from the batch (their cache rows
cut away) once a quarter of the live rows are done, so the work shrinks with the batch; a row's
logits do not depend on the other rows, so this changes nothing but float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from minillm.data.instruct import collate_prompts
from minillm.decoding.contract import (
    Decoding,
    Rollout,
    ban_repeated_ngrams,
    cache_kwarg,
    draw,
    draw_distribution,
    step_kl,
)


class _Stepper:
    """Incremental forward with a dynamic KV cache for one model."""

    def __init__(self, model: Any, vocab_size: int, autocast: torch.dtype | None) -> None:
        from transformers import DynamicCache

        self.model, self.V = model, vocab_size
        self.cache = DynamicCache()
        self.kw = cache_kwarg(model)
        self.autocast = autocast
        self.logits: torch.Tensor | None = None  # the last step's logits (B, V), model dtype

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(ids.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1, **{self.kw: self.cache})
        self.logits = out.logits[:, -1, : self.V]
        return F.log_softmax(self.logits.float(), dim=-1)

    def can_drop_rows(self) -> bool:
        return callable(getattr(self.cache, "batch_select_indices", None))

    def keep_rows(self, idx: torch.Tensor) -> None:
        """Cut the cache to rows ``idx``."""
        self.cache.batch_select_indices(idx)


class _Record:
    """Per-step outputs of the whole batch ``(B, ...)``, written for the rows still in the loop."""

    def __init__(self, B: int, pad_id: int, device: torch.device) -> None:
        self.B, self.pad_id, self.device = B, pad_id, device
        self.cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("tok", "mask", "logq", "logp", "logmix", "kl", "lq", "lp")}

    def add(self, rows: torch.Tensor, values: dict[str, torch.Tensor | None]) -> None:
        for name, v in values.items():
            if v is None:
                continue
            fill = self.pad_id if name == "tok" else 0
            full = torch.full((self.B, *v.shape[1:]), fill, dtype=v.dtype, device=self.device)
            full[rows] = v
            self.cols[name].append(full)

    def stacked(self, name: str, to_cpu: bool = True) -> torch.Tensor | None:
        xs = self.cols[name]
        if not xs:
            return None
        out = torch.stack(xs, dim=1)
        return out.cpu() if to_cpu else out


def decode(model: Any, prompts: Sequence[Sequence[int]], seeds: torch.Tensor, d: Decoding, teacher: Any = None) -> Rollout:
    """Sample one response per prompt from (1 - alpha) q + alpha p with dynamic caches.

    ``teacher`` without ``alpha`` still scores every sampled token (``Rollout.logp``).
    """
    if d.alpha > 0 and teacher is None:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs a teacher")
    device = next(model.parameters()).device
    ids_BP, attn_BP = collate_prompts(prompts, d.pad_id)
    B = ids_BP.shape[0]
    attn = attn_BP.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    step_ids = ids_BP.to(device)
    seeds_dev = seeds.to(device)
    steppers = [_Stepper(model, d.vocab_size, d.autocast)]
    if teacher is not None:
        steppers.append(_Stepper(teacher, d.vocab_size, None))
    stop = torch.tensor(sorted(set(d.stop_ids)) or [-1], device=device)
    rows = torch.arange(B, device=device)  # the original rows still in the loop
    can_drop = all(s.can_drop_rows() for s in steppers)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    history: list[list[int]] = [[] for _ in range(B)]
    rec = _Record(B, d.pad_id, device)
    for t in range(d.max_new_tokens):
        logs = [s(step_ids, attn, pos) for s in steppers]
        logq_V, logp_V = logs[0], (logs[1] if len(logs) > 1 else None)
        logpi_V = draw_distribution(logq_V, logp_V, d)
        if d.no_repeat_ngram_size:
            # renormalise, so logmix stays the log-probability the token was actually drawn with
            logpi_V = F.log_softmax(ban_repeated_ngrams(logpi_V, [history[int(r)] for r in rows], d.no_repeat_ngram_size), dim=-1)
        y = draw(logpi_V, seeds_dev[rows], t)
        y = torch.where(done, torch.full_like(y, d.pad_id), y)
        live = (~done).float()
        pick = lambda lv, y=y, live=live: lv.gather(-1, y[:, None]).squeeze(-1) * live  # noqa: E731
        rec.add(rows, {
            "tok": y, "mask": live, "logq": pick(logq_V), "logmix": pick(logpi_V),
            "logp": pick(logp_V) if logp_V is not None else None,
            "kl": step_kl(logq_V, logp_V) * live if logp_V is not None else None,
            "lq": steppers[0].logits if "student" in d.keep_logits else None,  # rows past their end hold stale values: masked
            "lp": steppers[1].logits if "teacher" in d.keep_logits and teacher is not None else None,
        })
        if d.no_repeat_ngram_size:
            for b, r in enumerate(rows.tolist()):
                if not done[b]:
                    history[r].append(int(y[b]))
        done = done | torch.isin(y, stop)
        if d.stop(bool(done.all())):
            break
        step_ids = y[:, None]
        attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        n_done = int(done.sum())
        if can_drop and n_done and n_done * 4 >= len(rows) and n_done < len(rows):
            keep = (~done).nonzero().flatten()
            for s in steppers:
                s.keep_rows(keep)
            rows, done, step_ids, attn, pos = rows[keep], done[keep], step_ids[keep], attn[keep], pos[keep]
    mask = rec.stacked("mask")
    # as wide as the longest response (a loop held on by d.all_done steps past the local end)
    n = int(mask.sum(0).nonzero().max()) + 1 if mask is not None and bool(mask.any()) else 0

    def col(name: str, to_cpu: bool = True) -> torch.Tensor | None:
        v = rec.stacked(name, to_cpu)
        return None if v is None else v[:, :n]

    empty = torch.zeros(B, 0)
    return Rollout(
        prompt_ids=ids_BP,
        prompt_mask=attn_BP,
        response_ids=col("tok").long() if n else empty.long(),
        response_mask=col("mask") if n else empty,
        logq=col("logq") if n else empty,
        logp=(col("logp") if n else empty) if teacher is not None else None,
        logmix=col("logmix") if n else empty,
        seeds=seeds.cpu(),
        kl=(col("kl") if n else empty) if teacher is not None else None,
        logits_q=col("lq", to_cpu=False),
        logits_p=col("lp", to_cpu=False),
    )
