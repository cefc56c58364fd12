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
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from minillm.config import Config
from minillm.data import RunData
from minillm.fused import Head, head_terms
from minillm.models import Models, autocast_dtype, vocab_logits

log = logging.getLogger("minillm")

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


@dataclass
class Outputs:
    """A forward's result as the losses take it (:func:`minillm.fused.head_terms`): final hidden
    states ``(B, T, d)`` with the model's output layer ``head``, or logits ``(B, T, V)`` with
    ``head`` None. ``autocast`` is the compute dtype the forward ran under; the losses run under it too."""

    x: torch.Tensor
    head: Head | None
    autocast: torch.dtype | None = None

    def ctx(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.x.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    def at(self, pos_BR: torch.Tensor) -> Outputs:
        """The positions ``pos_BR`` of each row ``(B, R)``."""
        idx = pos_BR.to(self.x.device)[..., None].expand(-1, -1, self.x.shape[-1])
        return Outputs(self.x.gather(1, idx), self.head, self.autocast)

    def shifted(self) -> Outputs:
        """Every position but the last (the outputs that predict tokens 1 .. L-1)."""
        return Outputs(self.x[:, :-1], self.head, self.autocast)

    def logits(self) -> torch.Tensor:
        """The logits ``(B, T, V)``, materialised."""
        if self.head is None:
            return self.x
        with self.ctx():
            return self.head.logits(self.x)

    def materialised(self) -> Outputs:
        return self if self.head is None else Outputs(self.logits(), None, self.autocast)


FUSED_MIN_BYTES = 1 << 28  # train.fused_loss=auto fuses when a micro-batch's float32 logits would pass 256 MB


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
    def forward_outputs(
        self, model: Any, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor | None = None, keep: int = 0
    ) -> Outputs:
        """One forward, under autocast on GPU for the student. When the model's logits are a plain
        linear map of its last hidden state (:func:`output_head`), the hidden states ``(B, L, d)``
        and the head come back and no logits are computed here; otherwise the logits cut to the
        shared vocabulary, only the last ``keep`` positions when ``keep`` > 0."""
        dev = self.models.device
        ac = self.autocast if model is self.models.student else None
        kwargs: dict[str, Any] = {"position_ids": pos.to(dev)} if pos is not None else {}
        head = output_head(model, self.models.vocab_size) if self.cfg.train.fused_loss != "off" else None
        if head is not None:
            kwargs.update(output_hidden_states=True, logits_to_keep=1)
        elif keep and _takes_logits_to_keep(model):
            kwargs["logits_to_keep"] = keep
        ctx = torch.autocast(dev.type, dtype=ac) if ac else contextlib.nullcontext()
        with ctx:
            out = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False, **kwargs)
        if head is not None:
            return Outputs(out.hidden_states[-1], head, ac)
        logits = out.logits[:, -keep:] if keep else out.logits
        return Outputs(vocab_logits(logits, self.models.vocab_size), None, ac)

    def for_loss(self, out: Outputs, n_positions: int) -> Outputs:
        """``train.fused_loss``: keep the hidden states (fused, chunked recomputation) or materialise
        the logits of the ``n_positions`` the loss reads (faster while they are small)."""
        mode = self.cfg.train.fused_loss
        if out.head is None or mode == "on":
            return out
        if mode == "auto" and n_positions * out.head.vocab_size * 4 >= FUSED_MIN_BYTES:
            return out
        return out.materialised()

    def terms(self, out: Outputs, mask_BT: torch.Tensor, **kw: Any) -> dict[str, torch.Tensor]:
        """:func:`minillm.fused.head_terms` on ``out`` (fused or materialised, see :meth:`for_loss`)
        over the positions of ``mask_BT``; a teacher given as :class:`Outputs` is passed the same way."""
        teacher = kw.pop("teacher", None)
        n = int(mask_BT.sum())
        out = self.for_loss(out, n)
        if isinstance(teacher, Outputs):
            teacher = self.for_loss(teacher, n)
            kw.update(teacher_BTD=teacher.x, teacher_head=teacher.head)
        elif teacher is not None:
            kw["teacher_BTD"] = teacher
        with out.ctx():
            return head_terms(out.x, out.head, mask_BT=mask_BT, **kw)

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
        out = self.forward_outputs(model, ids, ones).shifted()
        coef = self.pt_coef()
        mask = batch["pt_mask"].to(out.x.device)
        targets = batch["pt_targets"].to(out.x.device)
        if kd_ratio <= 0 or self.models.teacher is None:
            return {"pt": Term(-self.terms(out, mask, targets_BT=targets)["logprob"], "pt_mask", coef)}
        with torch.no_grad():
            t_out = self.forward_outputs(self.models.teacher, ids, ones).shifted()
        got = self.terms(out, mask, targets_BT=targets, divergence="forward_kl", teacher=t_out)
        return {"pt": Term(-got["logprob"], "pt_mask", coef * (1 - kd_ratio)), "pt_kd": Term(got["divergence"], "pt_mask", coef * kd_ratio)}

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


_HEADS: weakref.WeakKeyDictionary[Any, Head | None] = weakref.WeakKeyDictionary()  # model -> its head or None: probed once


def output_head(model: Any, vocab_size: int) -> Head | None:
    """The model's output layer as a :class:`minillm.fused.Head` when its logits are exactly
    ``head(last hidden state)``, checked once per model on a short probe; None when they are not
    (a final soft-cap or logit scale, a head that is not one linear layer, sharded weights, no
    ``logits_to_keep``), and the losses then take the model's own logits."""
    if model in _HEADS:
        return _HEADS[model]
    head = _probe_head(model, vocab_size)
    _HEADS[model] = head
    if head is None:
        log.info("%s: logits are not a plain linear map of the last hidden state; losses use the model's logits",
                 type(model).__name__)
    return head


def _fsdp_sharded(model: Any) -> bool:
    """An FSDP2-sharded model: its weights may be swapped for gathered copies only during a
    forward, so a head taken from it outside that forward would read freed memory."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())


def _probe_head(model: Any, vocab_size: int) -> Head | None:
    if _fsdp_sharded(model):
        return None
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, torch.nn.Linear) or emb.weight.shape[0] < vocab_size or not _takes_logits_to_keep(model):
        return None
    if type(emb.weight.data) is not torch.Tensor:
        return None  # a sharded (DTensor) or otherwise wrapped weight: only the model's own forward can use it
    head = Head(emb.weight, emb.bias, vocab_size)
    dev = emb.weight.device
    ids = (torch.arange(6, device=dev) * 7919 % vocab_size)[None]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, output_hidden_states=True)
            ref = out.logits[..., :vocab_size].float()
            got = head.logits(out.hidden_states[-1]).float()
    except Exception:  # noqa: BLE001 - any failure means: use the model's own logits
        return None
    finally:
        model.train(was)
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    return head if got.shape == ref.shape and bool((got - ref).abs().max() <= tol) else None


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
