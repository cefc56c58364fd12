"""MiniLLM: on-policy reverse-KL distillation by policy gradient (Gu et al. 2024, Sec. 2).

collect(step) = three named phases:

* **rollout**: sample ``rollouts_per_step`` responses from p~ = (1 - a) q + a p, each prompt with
  its own seed (:mod:`minillm.decoding`);
* **score**: log q_old(y_t), log p(y_t), the reward r_t = log p - log q_old and the detached
  advantage A_t = R_{t+1} (length-normalised, discounted from the response start;
  :func:`minillm.losses.future_returns`); the importance weight w_t = q(y_t) / p~(y_t) is the
  rollout's own, recorded when y_t was drawn;
* **plan**: ``ppo_epochs`` shuffled passes, each cut into optimizer steps of
  ``train.batch_size * train.grad_accum`` rollouts, each step's micro-batches length-sorted.

Every model pass is made once. The decode already computed log q(y_t) (and, with a > 0, log p(y_t)
and both full distributions) when it drew y_t, so ``score`` reuses them instead of running the
models again teacher-forced; exact up to float rounding in float32. Where the student decodes in
reduced precision (bf16 / fp16 autocast, static-cache graphs) its log q_old is recomputed
teacher-forced, so the PPO ratio starts at exactly 1; ``minillm.rescore`` recomputes both, as
the reference code does. At a = 0 the student decodes alone and ``score`` runs the teacher once.
The teacher's full logits for the single-step term are computed once per rollout phase (kept from
the decode with a > 0, from score's teacher pass with a = 0) and reused by every PPO epoch when
they fit ``minillm.cache_gb`` (:class:`TeacherCache`); otherwise each epoch recomputes them.

Under ``torchrun`` each rank decodes and scores its contiguous part of the prompts; the scored
rows are gathered back in the order one process makes them, so every rank plans the same global
experience and the trainer deals its micro-batches out (:mod:`minillm.distributed`). With a
sharded teacher the ranks decode in lockstep (every rank issues the same collectives).

loss_terms = clipped policy gradient on A_t with ratio q_theta / p~ (the *long* term), the exact
single-step reverse KL sum_v q_theta(v) log(q_theta(v) / p(v)) weighted by w_t (the *single* term),
and pt_coef * L_PT. With ``single_step`` off, the return includes r_t itself and the sampled policy
gradient carries the whole reverse KL.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minillm.config import Config, MiniLLMConfig
from minillm.data import RunData
from minillm.data.instruct import Encoded, EpochSampler, collate_prompts
from minillm.decoding import packed_sequence_batch, row_seeds, sample
from minillm.losses import clipped_pg, future_returns, whiten, whiten_padded
from minillm.methods.base import Batch, Experience, Method, Outputs, Term, chunks, register_method
from minillm.models import Models

log = logging.getLogger("minillm")


@dataclass
class Sampled:
    """One sampled response and what the decode recorded for it (per token ``(R,)``)."""

    prompt: list[int]
    response: torch.Tensor
    logq: torch.Tensor  # log q(y_t) when y_t was drawn
    logw: torch.Tensor  # log w_t = log q(y_t) - log p~(y_t), both recorded when y_t was drawn
    logp: torch.Tensor | None = None  # log p(y_t): the teacher decoded alongside (a > 0)
    kl: torch.Tensor | None = None  # KL(q || p) of each step's distributions, likewise
    logits_q: torch.Tensor | None = None  # (R, V) the student's logits, kept by the decode (a = 0)
    logits_p: torch.Tensor | None = None  # (R, V) the teacher's, kept by the decode (a > 0)


@dataclass
class _Row:
    prompt: list[int]
    response: torch.Tensor  # (R,)
    logq_old: torch.Tensor
    logw: torch.Tensor
    advantage: torch.Tensor
    index: int = -1  # position in its rollout phase: the key of its cached teacher logits


def scheduled_alpha(m: MiniLLMConfig, step: int, total: int) -> float:
    """The teacher-mix strength of a rollout phase starting after ``step`` of ``total`` optimizer steps,
    f = step / total: ``constant`` a; ``linear`` a + (a_end - a) f; ``cosine``
    a_end + (a - a_end) (1 + cos(pi f)) / 2 (a = ``alpha``, a_end = ``alpha_end``)."""
    f = min(1.0, max(0.0, step / total)) if total > 0 else 0.0
    if m.alpha_schedule == "linear":
        return m.alpha + (m.alpha_end - m.alpha) * f
    if m.alpha_schedule == "cosine":
        return m.alpha_end + (m.alpha - m.alpha_end) * 0.5 * (1 + math.cos(math.pi * f))
    return m.alpha


def collate_rollouts(rows: list[_Row], pad_id: int, phase: int | None = None) -> Batch:
    """Left-padded prompts ``(B, P)`` + right-padded responses and per-token fields ``(B, R)``;
    with ``phase``, the rows' keys into that phase's :class:`TeacherCache`."""
    p_ids, p_mask = collate_prompts([r.prompt for r in rows], pad_id)
    R = max(len(r.response) for r in rows)
    B = len(rows)

    def pad(get: Any, fill: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((B, R), fill, dtype=dtype)
        for b, r in enumerate(rows):
            v = get(r)
            out[b, : len(v)] = v
        return out

    batch = {
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "response_ids": pad(lambda r: r.response, pad_id, torch.long),
        "response_mask": pad(lambda r: torch.ones(len(r.response)), 0.0, torch.float32),
        "logq_old": pad(lambda r: r.logq_old, 0.0, torch.float32),
        "logw": pad(lambda r: r.logw, 0.0, torch.float32),
        "advantage": pad(lambda r: r.advantage, 0.0, torch.float32),
    }
    if phase is not None and all(r.index >= 0 for r in rows):
        batch["row_index"] = torch.tensor([r.index for r in rows], dtype=torch.long)
        batch["phase"] = torch.tensor([phase], dtype=torch.long)
    return batch


def _pad_rows(values: list[torch.Tensor], R: int) -> torch.Tensor:
    """Per-row tensors ``(R_b, ...)`` -> one zero-padded ``(B, R, ...)`` on the first one's device."""
    out = values[0].new_zeros((len(values), R, *values[0].shape[1:]))
    for b, v in enumerate(values):
        out[b, : len(v)] = v.to(out.device, non_blocking=True)
    return out


class TeacherCache:
    """The teacher's logits ``(R_b, V)`` of one rollout phase's rows, for the single-step term of
    every PPO epoch: on the compute device, or in pinned host memory (copied in per micro-batch).

    Keys are (phase, row index); a micro-batch whose rows are not all here (a run resumed in the
    middle of a phase) makes its caller recompute them."""

    def __init__(self, where: str | None) -> None:
        self.where = where  # "device", "host" or None (off)
        self.phase: int | None = None
        self.rows: dict[int, torch.Tensor] = {}

    def start(self, phase: int) -> None:
        self.phase, self.rows = phase, {}

    def put(self, index: int, logits_RV: torch.Tensor) -> None:
        if self.where == "host" and logits_RV.device.type == "cuda":
            logits_RV = logits_RV.to("cpu").pin_memory()
        self.rows[index] = logits_RV

    def gigabytes(self) -> float:
        return sum(v.numel() * v.element_size() for v in self.rows.values()) / 1e9

    def batch(self, mb: Batch, R: int, device: torch.device) -> torch.Tensor | None:
        """The micro-batch's teacher logits ``(B, R, V)`` on ``device``, or None when not all cached."""
        if "row_index" not in mb or self.phase is None or int(mb["phase"][0]) != self.phase:
            return None
        keys = mb["row_index"].tolist()
        if not all(k in self.rows for k in keys):
            return None
        return _pad_rows([self.rows[k] for k in keys], R).to(device, non_blocking=True)


@register_method("minillm")
class MiniLLM(Method):
    needs_teacher = True
    dropout = False  # q_old and q_theta must be the same function at the start of each PPO pass

    def __init__(self, cfg: Config, models: Models, data: RunData) -> None:
        super().__init__(cfg, models, data)
        self.m = m = cfg.minillm
        self.sampler = EpochSampler(len(data.train), cfg.seed)
        tok = models.tokenizer
        self.pad_id = tok.pad_token_id
        self.stop_ids = sorted(i for i in {tok.eos_token_id, *_extra_eos(models.student)} if 0 <= i < models.vocab_size)
        student_dtype = next(models.student.parameters()).dtype
        reduced = self.autocast is not None or student_dtype not in (torch.float32, torch.float64)
        self.reuse_q = not m.rescore and not reduced  # log q_old from the decode (exact up to float32 rounding)
        # the teacher decodes alongside when some rollout phase mixes it in (minillm.alpha_schedule)
        self.mixing = m.alpha > 0 or (m.alpha_schedule != "constant" and m.alpha_end > 0)
        self.reuse_p = not m.rescore and self.mixing  # log p(y_t) and the KL statistic from the decode
        where, cache_bytes = self._cache_place()
        self.cache = TeacherCache(where)
        if where is None and models.dist.world > 1 and m.single_step:
            log.info("minillm: teacher logits are recomputed every PPO epoch under %d ranks: each rank trains on "
                     "rows other ranks decoded, so a per-rank cache would miss", models.dist.world)
        self.keep_p = where is not None and self.mixing and not m.rescore  # the decode's teacher logits are the cache
        q_bytes = self._phase_logits_bytes(models.student, self.autocast)
        self.keep_q = not self.mixing and self.reuse_q and q_bytes + cache_bytes <= m.cache_gb * 1e9
        log.info(
            "minillm: log q_old %s; log p %s; teacher logits for the single-step term %s",
            "from the decode" if self.reuse_q else "teacher-forced in score",
            "from the decode" if self.reuse_p else "from one teacher pass in score",
            "not needed" if not m.single_step else
            f"computed once per rollout phase, kept on the {where} ({cache_bytes / 1e9:.2f} GB at most)" if where else
            f"recomputed every PPO epoch ({cache_bytes / 1e9:.2f} GB would pass minillm.cache_gb={m.cache_gb} or minillm.teacher_cache=off)",
        )

    def pt_coef(self) -> float:
        return self.m.pt_coef if self.data.pretrain is not None else 0.0

    # -- memory plan -----------------------------------------------------------------------------
    def _phase_logits_bytes(self, model: Any, autocast: torch.dtype | None) -> int:
        """The largest size a rollout phase's logits of ``model`` can take (rollouts x budget x V)."""
        dtype = autocast or next(model.parameters()).dtype
        g, d = self.cfg.generation, self.cfg.data
        per = min(g.max_new_tokens, d.max_len) * self.models.vocab_size * torch.empty((), dtype=dtype).element_size()
        return self.m.rollouts_per_step * per

    def _cache_place(self) -> tuple[str | None, int]:
        """Where the teacher cache goes (None: recompute every epoch) and its largest size in bytes."""
        m, dev = self.m, self.models.device
        size = self._phase_logits_bytes(self.models.teacher, None)
        budget = m.cache_gb * 1e9
        # several ranks: a micro-batch mixes rows decoded on every rank, and a cache miss on one rank
        # only would also break the lockstep of a sharded teacher
        if not m.single_step or m.teacher_cache == "off" or size > budget or self.models.dist.world > 1:
            return None, size
        fits_device = dev.type != "cuda" or size <= 0.5 * torch.cuda.mem_get_info(dev)[0]
        if m.teacher_cache in ("auto", "device") and fits_device:
            return "device", size
        if m.teacher_cache in ("auto", "host") and dev.type == "cuda":
            return "host", size
        return None, size

    # -- rollout -------------------------------------------------------------------------------
    def alpha(self, step: int) -> float:
        """``minillm.alpha_schedule`` at ``step`` over the run's length (the trainer sets ``max_steps``)."""
        return scheduled_alpha(self.m, step, self.max_steps or self.cfg.train.max_steps)

    def next_prompts(self) -> list[Encoded]:
        """The next ``rollouts_per_step`` training examples (their prompts are sampled)."""
        return [self.data.train[i] for i in self.sampler.take(self.m.rollouts_per_step)]

    def rollout(self, items: list[Encoded], step: int) -> list[Sampled]:
        """Sample one response per item, each from its own seed (example index, rollout round).

        log w_t = log q(y_t) - log p~(y_t) comes from the sampling pass itself, so the importance
        weight is fixed at sampling time; with a = 0 and no temperature / top-k / top-p it is 1 up to
        rounding (p~ = q). p~ is the distribution actually sampled, after any filtering. The teacher
        decodes alongside only when some phase mixes it in (a > 0, or a schedule away from 0; at a = 0
        throughout nothing it would compute there is used)."""
        g, d, m = self.cfg.generation, self.cfg.data, self.m
        teacher = self.models.teacher if self.mixing else None
        dist = self.models.dist
        lockstep = dist.lockstep and teacher is not None  # a sharded teacher's forward is a collective
        out = []
        self.models.student.eval()
        for batch in chunks(items, m.rollout_batch_size):
            prompts = [x.prompt_ids for x in batch]
            # each row keeps its own budget, so its response never depends on its batch-mates
            caps = [min(g.max_new_tokens, d.max_len - len(p)) for p in prompts]
            # in lockstep every rank runs the same number of decode steps: the largest budget of any rank
            budget = int(dist.max_value(max(caps))) if lockstep else max(caps)
            r = sample(
                self.models.student, prompts, row_seeds(self.cfg.seed, [x.index for x in batch], salt=step),
                max_new_tokens=budget, stop_ids=self.stop_ids, pad_id=self.pad_id,
                vocab_size=self.models.vocab_size, teacher=teacher, alpha=self.alpha(step),
                temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, autocast=self.autocast, engine=g.engine,
                keep_logits=(("student",) if self.keep_q else ()) + (("teacher",) if self.keep_p else ()),
                all_done=dist.all_done if lockstep else None,
            )
            for b, x in enumerate(batch):
                n = min(int(r.response_mask[b].sum()), caps[b])
                cut = lambda v, b=b, n=n: None if v is None else v[b, :n]  # noqa: E731
                out.append(Sampled(x.prompt_ids, r.response_ids[b, :n], r.logq[b, :n], r.logq[b, :n] - r.logmix[b, :n],
                                   cut(r.logp), cut(r.kl), cut(r.logits_q) if self.keep_q else None,
                                   cut(r.logits_p) if self.keep_p else None))
        return out

    # -- score ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, samples: list[Sampled], step: int) -> tuple[list[_Row], dict[str, float]]:
        """log q_old, log p, rewards, weights and advantages of the sampled tokens; the KL statistics;
        the teacher cache of the phase. Model passes only where the decode did not already give the
        value (see the module doc), in length-sorted micro-batches."""
        m = self.m
        real = [i for i, s in enumerate(samples) if len(s.response) > 0]
        need_p = not self.reuse_p  # logp (and the KL statistic's p) from one teacher pass
        need_q = not self.reuse_q or (not self.reuse_p and not self.keep_q)  # q for log q_old / the KL statistic
        self.cache.start(step)
        by_index: dict[int, _Row] = {}
        rewards_sum = kl_sum = kl_n = seq_rkl = logp_sum = 0.0
        order = sorted(range(len(real)), key=lambda j: len(samples[real[j]].prompt) + len(samples[real[j]].response))
        for js in chunks(order, self.cfg.train.batch_size):
            batch = [samples[real[j]] for j in js]
            mb = collate_rollouts([_Row(s.prompt, s.response, s.logq, s.logw, s.logq) for s in batch], self.pad_id)
            dev = self.models.device
            ids, mask = mb["response_ids"].to(dev), mb["response_mask"].to(dev)
            R = ids.shape[1]
            s_out = self._response_outputs(self.models.student, mb) if need_q else None
            t_out = self._response_outputs(self.models.teacher, mb) if need_p else None
            if need_p and self.cache.where is not None:
                t_out = t_out.materialised()  # these logits are the cache
                for b, j in enumerate(js):
                    self.cache.put(j, t_out.x[b, : len(batch[b].response)])
            elif self.keep_p:
                for b, j in enumerate(js):
                    self.cache.put(j, batch[b].logits_p)
            logq = mb["logq_old"].to(dev) if self.reuse_q else self.terms(s_out, mask, targets_BT=ids)["logprob"]
            if self.reuse_p:
                logp, kl = _pad_rows([s.logp for s in batch], R).to(dev), _pad_rows([s.kl for s in batch], R).to(dev)
            else:
                # one pass over the teacher's logits: log p(y_t) and KL(q || p), written as forward_kl(p; q)
                q = s_out if s_out is not None else _pad_rows([s.logits_q for s in batch], R)
                got = self.terms(t_out, mask, targets_BT=ids, divergence="forward_kl", teacher=q)
                logp, kl = got["logprob"], got["divergence"]
            logq, logp, kl = logq * mask, logp * mask, kl * mask
            w = torch.exp(mb["logw"].to(dev)) * mask
            kl_sum += float((kl * w).sum())
            kl_n += float(mask.sum())
            logp_sum += float(logp.sum())  # already masked
            seq_rkl += float((w * (logq - logp)).sum())
            r = (logp - logq) * m.reward_scale
            if m.reward_clip is not None:
                r = r.clamp(-m.reward_clip, m.reward_clip)
            adv = future_returns(
                r, mask, gamma=m.gamma, length_norm=m.length_norm,
                include_current=m.include_current_reward or not m.single_step,
            )
            rewards_sum += float((r * mask).sum())
            for b, (j, s) in enumerate(zip(js, batch)):
                n = len(s.response)
                by_index[j] = _Row(s.prompt, s.response, logq[b, :n].float().cpu(), s.logw, adv[b, :n].cpu(), j)
        rows = [by_index[j] for j in range(len(real))]
        n_tok = max(kl_n, 1.0)
        stats = {
            "reward": rewards_sum / n_tok if rows else 0.0,
            "reverse_kl": kl_sum / n_tok,
            "seq_reverse_kl": seq_rkl / max(len(rows), 1),
            "response_len": float(np.mean([len(s.response) for s in samples])) if samples else 0.0,
            "empty_responses": float(sum(len(s.response) == 0 for s in samples)),
            "teacher_logprob": logp_sum / n_tok,  # with collect's rollout_distinct_2: the reward-hacking signature
        }
        return rows, stats

    def _response_outputs(self, model: Any, mb: Batch) -> Outputs:
        """One teacher-forced forward over the micro-batch's rows packed to the left (prompt,
        response, padding): the outputs ``(B, R, .)`` at the positions that predict the response."""
        seq, resp_pos = packed_sequence_batch(mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"])
        L = seq["input_ids"].shape[1]
        keep = L - int(resp_pos[:, 0].min())  # without a fusable head: logits from the first response position on
        out = self.forward_outputs(model, seq["input_ids"], seq["attention_mask"], seq["position_ids"], keep=keep)
        return out.at(resp_pos - (L - out.x.shape[1]))

    # -- plan ----------------------------------------------------------------------------------
    def collect(self, step: int) -> Experience:
        dist = self.models.dist
        t0 = time.perf_counter()
        samples = self.rollout(dist.split(self.next_prompts()), step)  # this rank's part of the prompts
        t1 = time.perf_counter()
        mine, stats = self.score(samples, step)
        rows = dist.gather(mine)  # every rank: all rows, in the order one process scores them
        for i, r in enumerate(rows):
            r.index = i  # one process's keys; a world of one caches, so its keys are already these
        n_tok = float(sum(len(r.response) for r in mine))
        stats = dist.mean_values(stats, {"reward": n_tok, "reverse_kl": n_tok, "seq_reverse_kl": len(mine),
                                         "response_len": len(samples), "teacher_logprob": n_tok})
        # over every rank's rollouts, as one process counts them (an empty response has no bigram)
        stats["rollout_distinct_2"] = distinct_2([r.response for r in rows])
        if self.m.whiten == "rollout" and rows:  # over the whole rollout batch, as one process would
            flat = torch.cat([r.advantage for r in rows])
            white = whiten(flat[None], torch.ones_like(flat)[None])[0]
            for r, piece in zip(rows, torch.split(white, [len(r.response) for r in rows])):
                r.advantage = piece
        stats["alpha"] = self.alpha(step)
        t2 = time.perf_counter()
        once = {"rollout_time_s": dist.max_value(t1 - t0), "score_time_s": dist.max_value(t2 - t1),
                "rollout_tokens": float(sum(len(r.response) for r in rows)),
                "teacher_cache_gb": dist.max_value(self.cache.gigabytes())}
        return Experience(self.plan(rows, step), stats, once)

    def plan(self, rows: list[_Row], step: int) -> list[list[Batch]]:
        """``ppo_epochs`` shuffled passes over the rows, in optimizer steps of ``sequences_per_step``;
        within a step the rows are sorted by length before they are cut into micro-batches (the
        step's gradient is a sum over its rows, so only the padding changes), except under
        ``minillm.whiten: minibatch_padded``, whose statistic depends on which rows share a micro-batch."""
        t = self.cfg.train
        updates: list[list[Batch]] = []
        for epoch in range(self.m.ppo_epochs if rows else 0):
            order = np.random.default_rng([self.cfg.seed, step, epoch]).permutation(len(rows))
            for mini in chunks([rows[i] for i in order], t.sequences_per_step):
                if self.m.whiten != "minibatch_padded":  # the reference's micro-batches are the shuffled ones
                    mini = sorted(mini, key=lambda r: len(r.prompt) + len(r.response))
                updates.append([self.add_pretrain(collate_rollouts(mb, self.pad_id, step)) for mb in chunks(mini, t.batch_size)])
        return updates

    # -- loss ----------------------------------------------------------------------------------
    def loss_terms(self, model: Any, batch: Batch) -> dict[str, Term]:
        m = self.m
        s_out = self._response_outputs(model, batch)
        dev = s_out.x.device
        ids, mask = batch["response_ids"].to(dev), batch["response_mask"].to(dev)
        teacher: Outputs | torch.Tensor | None = None
        if m.single_step:
            teacher = self.cache.batch(batch, ids.shape[1], dev)
            if teacher is None:
                with torch.no_grad():
                    teacher = self._response_outputs(self.models.teacher, batch)
        got = self.terms(s_out, mask, targets_BT=ids, entropy=True, divergence="reverse_kl" if m.single_step else None,
                         teacher=teacher)
        logq = got["logprob"]
        logq_old = batch["logq_old"].to(dev)
        w = torch.exp(batch["logw"].to(dev)) * mask
        adv = batch["advantage"].to(dev)
        if m.whiten == "minibatch_padded":  # the reference code: per mini-batch, padding positions counted
            adv = whiten_padded(adv)
        pg, clipped = clipped_pg(logq, logq_old, w, adv, m.clip)
        terms = {
            "pg": Term(pg, "response_mask"),
            "clip_frac": Term(clipped, "response_mask", 0.0),
            "entropy": Term(got["entropy"], "response_mask", 0.0),
            "ratio": Term((torch.exp(logq - logq_old) * mask).detach(), "response_mask", 0.0),
        }
        if m.single_step:
            kl = got["divergence"]
            terms["single_step"] = Term(kl * w if m.single_step_weight else kl, "response_mask")
        terms.update(self.pt_terms(model, batch, m.pt_kd_ratio))
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sampler.load_state_dict(state["sampler"])


def distinct_2(responses: list[torch.Tensor]) -> float:
    """Distinct token bigrams over all bigrams of ``responses`` (1.0 with no bigram at all)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for r in responses:
        ids = r.tolist()
        pairs = list(zip(ids, ids[1:]))
        seen.update(pairs)
        total += len(pairs)
    return len(seen) / total if total else 1.0


def _extra_eos(model: Any) -> list[int]:
    """End-of-turn ids a model's generation config lists beside the tokenizer's EOS (chat models)."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
