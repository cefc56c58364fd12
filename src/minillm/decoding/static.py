"""Static KV caches, with one decode step of student *and* teacher (plus the teacher mix, filtering
and the seeded Gumbel draw) captured in a single CUDA graph and replayed per token.

Attention reads only the filled part of the cache: the decode runs in windows of ``window``
tokens, each with views of the preallocated caches cut to the window's end (one graph per
window on CUDA), so a step attends over at most ``window`` positions more than it has filled,
not the whole preallocated length. A transformers version whose cache layers cannot be viewed
this way decodes over the full length, as before.

It draws like the plain loop (:mod:`minillm.decoding.plain`) - the same hashed noise per (row
seed, step, token) - so on the same logits it picks the same tokens; the static cache attends over
the whole preallocated length under a mask, which can move logits by float rounding, so in bf16 a
near-tied draw may rarely differ. On CPU (no graphs) it runs the same static-cache step eagerly,
which is how the tests check it against the plain loop.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from minillm.data.instruct import collate_prompts
from minillm.decoding.contract import (
    Decoding,
    Rollout,
    cache_kwarg,
    draw,
    draw_distribution,
    gumbel_sample,
    step_kl,
)


def _static_cache(model: Any, max_len: int) -> Any:
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older transformers: explicit batch size, device and dtype
        p = next(model.parameters())
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len, device=p.device, dtype=p.dtype)


class _StaticModel:
    """One model's static-cache forward over preallocated inputs."""

    def __init__(self, model: Any, max_len: int, vocab_size: int, autocast: torch.dtype | None) -> None:
        self.model, self.V, self.autocast, self.max_len = model, vocab_size, autocast, max_len
        self.cache = _static_cache(model, max_len)
        self.cache_kw = cache_kwarg(model)
        self.takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def __call__(self, ids: torch.Tensor, attn_BL: torch.Tensor, pos: torch.Tensor, cache_pos: torch.Tensor,
                 cache: Any = None) -> torch.Tensor:
        """The next-token logits ``(B, V)`` in the model's output dtype (``cache``: a window view)."""
        kw: dict[str, Any] = {self.cache_kw: self.cache if cache is None else cache}
        if self.takes_cache_position:
            kw["cache_position"] = cache_pos
        ctx = torch.autocast(ids.device.type, dtype=self.autocast) if self.autocast else torch.autocast(ids.device.type, enabled=False)
        with ctx:
            out = self.model(input_ids=ids, attention_mask=attn_BL, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1, : self.V]


@torch.no_grad()
def decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    seeds: torch.Tensor,
    d: Decoding,
    teacher: Any = None,
    *,
    use_graph: bool | None = None,
    check_every: int = 16,
    warm_up_steps: int = 0,
    window: int | None = None,
) -> Rollout:
    """Static-cache (and, on CUDA, graph-replayed) decoding with the contract's settings ``d``.

    ``d.all_done`` is consulted every ``check_every`` tokens. ``window``: tokens per attention
    window (default: a quarter of ``max_new_tokens``, at least 32; ``max_new_tokens`` or more: one
    window over the whole cache). ``warm_up_steps`` (eager path only) runs and undoes that many
    steps first in every window, as graph capture does: the tests use it to check that the undo is
    exact on CPU.
    """
    if d.no_repeat_ngram_size:
        raise ValueError("generation.no_repeat_ngram_size needs the plain loop (engine: eager)")
    if d.alpha > 0 and teacher is None:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs a teacher")
    device = next(model.parameters()).device
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    ids_BP, attn_BP = collate_prompts(prompts, d.pad_id)
    B, P = ids_BP.shape
    G = d.max_new_tokens
    L = P + G
    attn_BL = torch.zeros(B, L, dtype=torch.long, device=device)
    attn_BL[:, :P] = attn_BP.to(device)
    pos_BP = (attn_BL[:, :P].cumsum(-1) - 1).clamp(min=0)
    seeds = seeds.to(device)
    models = [_StaticModel(model, L, d.vocab_size, d.autocast)]
    if teacher is not None:
        models.append(_StaticModel(teacher, L, d.vocab_size, None))
    stop = torch.tensor(sorted(set(d.stop_ids)) or [-1], device=device)

    # static buffers the step reads and writes in place
    tok_B1 = torch.zeros(B, 1, dtype=torch.long, device=device)
    pos_B1 = pos_BP[:, -1:].clone()
    t_idx = torch.zeros(1, dtype=torch.long, device=device)  # decode step t
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    out_tok = torch.full((B, G), d.pad_id, dtype=torch.long, device=device)
    out_mask, out_logq, out_logp, out_mix, out_kl = (torch.zeros(B, G, device=device) for _ in range(5))
    keep = [name in d.keep_logits for name in ("student", "teacher")[: len(models)]]
    kept: dict[int, torch.Tensor] = {}  # model index -> (B, G, V) logits, for the models d.keep_logits names
    cache_pos = torch.zeros(1, dtype=torch.long, device=device)

    def record(logits: list[torch.Tensor]) -> None:
        logq_V = F.log_softmax(logits[0].float(), dim=-1)
        logp_V = F.log_softmax(logits[1].float(), dim=-1) if len(logits) > 1 else None
        logpi_V = draw_distribution(logq_V, logp_V, d)
        y = gumbel_sample(logpi_V, seeds, t_idx) if use_graph else draw(logpi_V, seeds, int(t_idx))
        y = torch.where(done_B, torch.full_like(y, d.pad_id), y)
        live = (~done_B).float()
        col = t_idx.expand(B, 1)
        out_tok.scatter_(1, col, y[:, None])
        out_mask.scatter_(1, col, live[:, None])
        out_logq.scatter_(1, col, (logq_V.gather(-1, y[:, None]) * live[:, None]))
        out_mix.scatter_(1, col, (logpi_V.gather(-1, y[:, None]) * live[:, None]).float())
        if logp_V is not None:
            out_logp.scatter_(1, col, (logp_V.gather(-1, y[:, None]) * live[:, None]))
            out_kl.scatter_(1, col, (step_kl(logq_V, logp_V) * live)[:, None])
        for i, lg in enumerate(logits):
            if keep[i]:
                if i not in kept:
                    kept[i] = torch.zeros(B, G, lg.shape[-1], dtype=lg.dtype, device=device)
                kept[i].index_copy_(1, t_idx, lg[:, None])
        done_B.logical_or_(torch.isin(y, stop))
        tok_B1.copy_(y[:, None])

    # prefill, eager: fills the caches and draws token 0
    ids_dev = ids_BP.to(device)
    record([m(ids_dev, attn_BL, pos_BP, torch.arange(P, device=device)) for m in models])

    slots: list[Any] = [None] * len(models)  # the caches a step uses: window views of the real ones
    attn_now = [attn_BL]  # the mask a step passes: the window's columns of attn_BL

    def step() -> None:
        # token t (already drawn) enters the caches at position P + t
        attn_BL.scatter_(1, (t_idx + P).expand(B, 1), 1)
        pos_B1.add_(1)
        cache_pos.copy_(t_idx + P)
        t_idx.add_(1)
        record([m(tok_B1, attn_now[0], pos_B1, cache_pos, slots[i]) for i, m in enumerate(models)])

    state = [t_idx, pos_B1, attn_BL, done_B, tok_B1, cache_pos, out_tok, out_mask, out_logq, out_logp, out_mix, out_kl, *kept.values()]
    width = window if window is not None else max(32, -(-G // 4))
    pool = None
    t, stopped = 1, False
    while t < G and not stopped:
        # steps t .. last write at positions P + t - 1 .. P + last - 1: the window ends at P + last
        last = min(G - 1, t + width - 1)
        end = P + last if last < G - 1 else L
        views = [_window_view(m.cache, end) if end < L else m.cache for m in models]
        if any(v is None for v in views):  # this cache cannot be viewed: one window over the full length
            views, last, end = [m.cache for m in models], G - 1, L
        slots[:], attn_now[0] = views, attn_BL[:, :end]
        run = step
        if use_graph:
            graph = _capture(step, state, models, slots, end, pool)
            pool, run = graph.pool(), graph.replay
        elif warm_up_steps:
            warm_up(step, state, models, slots, end, warm_up_steps)
        for k in range(t, last + 1):
            if k % check_every == 0 and d.stop(bool(done_B.all())):
                stopped = True
                break
            run()
        t = last + 1
    n = int(out_mask.sum(0).nonzero().max()) + 1 if bool(out_mask.any()) else 0
    return Rollout(
        prompt_ids=ids_BP, prompt_mask=attn_BP, response_ids=out_tok[:, :n].cpu(), response_mask=out_mask[:, :n].cpu(),
        logq=out_logq[:, :n].cpu(), logp=out_logp[:, :n].cpu() if teacher is not None else None,
        logmix=out_mix[:, :n].cpu(), seeds=seeds.cpu(), kl=out_kl[:, :n].cpu() if teacher is not None else None,
        logits_q=kept[0][:, :n] if 0 in kept else None, logits_p=kept[1][:, :n] if 1 in kept else None,
    )


def _window_view(cache: Any, length: int) -> Any:
    """A view of a filled static cache that reads and writes only its first ``length`` positions
    (the same buffers, cut); None when this transformers' cache is not made of plain static layers."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not StaticLayer or not getattr(layer, "is_initialized", False) for layer in layers):
        return None
    view = copy.copy(cache)
    view.layers = []
    for layer in layers:
        cut = copy.copy(layer)  # shares the write counter (a tensor advanced in place) with the real layer
        cut.keys, cut.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        cut.max_cache_len = length
        view.layers.append(cut)
    return view


def warm_up(step: Any, state: list[torch.Tensor], models: list[_StaticModel], slots: list[Any], length: int, runs: int = 2) -> None:
    """Run ``step`` ``runs`` times (library handles, lazy allocations) against throwaway caches of
    ``length`` in ``slots``, then restore the state buffers: the real caches are never touched, so no
    transformers version's cache bookkeeping has to be rewound."""
    saved = [s.clone() for s in state]
    real = list(slots)
    try:
        slots[:] = [_static_cache(m.model, length) for m in models]
        for _ in range(runs):
            step()
    finally:
        slots[:] = real
        for s, v in zip(state, saved):
            s.copy_(v)


def _capture(step: Any, state: list[torch.Tensor], models: list[_StaticModel], slots: list[Any], length: int,
             pool: Any = None) -> torch.cuda.CUDAGraph:
    """Capture ``step`` in a CUDA graph (sharing ``pool`` with earlier windows' graphs), warmed up on
    a side stream, leaving ``state`` unchanged."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up(step, state, models, slots, length)
    torch.cuda.current_stream().wait_stream(side)
    saved = [s.clone() for s in state]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    for s, v in zip(state, saved):  # capture records kernels without running them; restore anyway
        s.copy_(v)
    return graph
