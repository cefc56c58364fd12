"""What a method is: a small object that builds batches and per-token loss terms for the one loop.

The loop (``minillm.trainer``) calls, in order:

1. ``collect(step)`` -> :class:`Experience`: read data, or roll out and score (on-policy methods).
   An experience holds one or more *updates*; each update is the list of micro-batches of one
   optimizer step (PPO epochs x mini-batches for MiniLLM, a single update for SFT).
2. ``loss_terms(model, micro_batch)`` -> ``{name: Term}``: per-token values ``(B, T)`` and the
   name of the mask they are averaged over. The trainer reduces every term the same way: summed
   over masked tokens and divided by that mask's token count over the *whole* update, so gradient
   accumulation is normalised by the global token count, not per micro-batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from minillm.config import Config
from minillm.data import RunData
from minillm.losses import per_token, token_cross_entropy
from minillm.models import Models, autocast_dtype, vocab_logits

Batch = dict[str, torch.Tensor]


@dataclass
class Term:
    """Per-token values ``(B, T)`` averaged over ``batch[mask]``; ``coef`` 0 means logged only."""

    values: torch.Tensor
    mask: str
    coef: float = 1.0


@dataclass
class Experience:
    """The work of one collect phase: ``updates[i]`` is the micro-batch list of one optimizer step."""

    updates: list[list[Batch]]
    metrics: dict[str, float] = field(default_factory=dict)  # statistics of this experience: logged on each of its steps
    once: dict[str, float] = field(default_factory=dict)  # costs of collecting it (times, counts): logged on its first step


class Method:
    """Base class. Subclasses set ``name``/``needs_teacher`` and implement collect and loss_terms."""

    name = "base"
    needs_teacher = False
    dropout = True  # train-mode forward (dropout on); on-policy methods turn it off so ratios start at 1
    max_steps = 0  # the run's optimizer steps, set by the trainer (schedules over training); 0 = train.max_steps

    def __init__(self, cfg: Config, models: Models, data: RunData) -> None:
        self.cfg, self.models, self.data = cfg, models, data
        self.autocast = autocast_dtype(cfg.train.dtype, models.device)

    # -- phases -------------------------------------------------------------------------------
    def collect(self, step: int) -> Experience:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_terms(self, model: Any, batch: Batch) -> dict[str, Term]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared pieces --------------------------------------------------------------------------
    def forward_logits(
        self, model: Any, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor | None = None, keep: int = 0
    ) -> torch.Tensor:
        """Logits ``(B, L, V)`` cut to the shared vocabulary, under autocast on GPU; with ``keep`` > 0
        only the last ``keep`` positions ``(B, keep, V)`` are computed (the prompt's logits are never
        materialised when only the response needs them)."""
        dev = self.models.device
        ctx = torch.autocast(dev.type, dtype=self.autocast) if self.autocast and model is self.models.student else contextlib.nullcontext()
        kwargs: dict[str, Any] = {"position_ids": pos.to(dev)} if pos is not None else {}
        if keep and _takes_logits_to_keep(model):
            kwargs["logits_to_keep"] = keep
        with ctx:
            out = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False, **kwargs)
        logits = out.logits[:, -keep:] if keep else out.logits
        return vocab_logits(logits, self.models.vocab_size)

    def pt_coef(self) -> float:
        """Weight of the pre-training LM term (0 without a corpus)."""
        return self.cfg.train.pt_coef if self.data.pretrain is not None else 0.0

    def add_pretrain(self, batch: Batch) -> Batch:
        """Attach a batch of pre-training blocks (``pt_*`` keys) when the method uses L_PT."""
        if self.pt_coef() > 0 and self.data.pretrain is not None:
            batch.update(self.data.pretrain.next_batch(self.cfg.train.batch_size))
        return batch

    def pt_terms(self, model: Any, batch: Batch, kd_ratio: float = 0.0) -> dict[str, Term]:
        """L_PT: next-token cross-entropy on the general corpus. With ``kd_ratio`` r > 0 (the
        reference code's L_PT), (1 - r) CE + r KL(p || q) to the teacher on the same batch, from one
        student forward."""
        if "pt_input_ids" not in batch:
            return {}
        ids = batch["pt_input_ids"]
        ones = torch.ones_like(ids)
        logits = self.forward_logits(model, ids, ones)[:, :-1]
        ce = token_cross_entropy(logits, batch["pt_targets"].to(logits.device))
        coef = self.pt_coef()
        if kd_ratio <= 0 or self.models.teacher is None:
            return {"pt": Term(ce, "pt_mask", coef)}
        with torch.no_grad():
            t_logits = self.forward_logits(self.models.teacher, ids, ones)[:, :-1]
        fkl = per_token("forward_kl", logits, t_logits)
        return {"pt": Term(ce, "pt_mask", coef * (1 - kd_ratio)), "pt_kd": Term(fkl, "pt_mask", coef * kd_ratio)}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.data.pretrain is not None:
            state["pretrain"] = self.data.pretrain.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.data.pretrain is not None and "pretrain" in state:
            self.data.pretrain.load_state_dict(state["pretrain"])


def _takes_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available as ``method: NAME`` in configs."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    """Split a list into consecutive pieces of ``size`` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]
