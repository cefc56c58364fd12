"""MiniLLM: on-policy reverse-KL distillation by policy gradient (Gu et al. 2024, Sec. 2).

collect(step) = three named phases:

* **rollout**: sample ``rollouts_per_step`` responses from p~ = (1 - a) q + a p, each prompt with
  its own seed (:mod:`minillm.rollout`);
* **score**: one teacher-forced forward of student and teacher over each response gives
  log q_old(y_t), log p(y_t), the reward r_t = log p - log q_old and the detached advantage
  A_t = R_{t+1} (length-normalised, discounted from the response start;
  :func:`minillm.losses.future_returns`); the importance weight w_t = q(y_t) / p~(y_t) is the
  rollout's own, recorded when y_t was drawn;
* **plan**: ``ppo_epochs`` shuffled passes, each cut into optimizer steps of
  ``train.batch_size * train.grad_accum`` rollouts.

loss_terms = clipped policy gradient on A_t with ratio q_theta / p~ (the *long* term), the exact
single-step reverse KL sum_v q_theta(v) log(q_theta(v) / p(v)) weighted by w_t (the *single* term),
and pt_coef * L_PT. With ``single_step`` off, the return includes r_t itself and the sampled policy
gradient carries the whole reverse KL.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minillm.config import Config, MiniLLMConfig
from minillm.data import RunData
from minillm.data.instruct import EpochSampler, collate_prompts
from minillm.losses import (
    clipped_pg,
    future_returns,
    per_token,
    token_entropy,
    token_logprobs,
    whiten,
    whiten_padded,
)
from minillm.methods.base import Batch, Experience, Method, Term, chunks, register_method
from minillm.models import Models
from minillm.rollout import response_logits, row_seeds, sample, sequence_batch


@dataclass
class _Row:
    prompt: list[int]
    response: torch.Tensor  # (R,)
    logq_old: torch.Tensor
    logw: torch.Tensor  # log w_t = log q(y_t) - log p~(y_t), both recorded when y_t was drawn
    advantage: torch.Tensor


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


def collate_rollouts(rows: list[_Row], pad_id: int) -> Batch:
    """Left-padded prompts ``(B, P)`` + right-padded responses and per-token fields ``(B, R)``."""
    p_ids, p_mask = collate_prompts([r.prompt for r in rows], pad_id)
    R = max(len(r.response) for r in rows)
    B = len(rows)

    def pad(get: Any, fill: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((B, R), fill, dtype=dtype)
        for b, r in enumerate(rows):
            v = get(r)
            out[b, : len(v)] = v
        return out

    return {
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "response_ids": pad(lambda r: r.response, pad_id, torch.long),
        "response_mask": pad(lambda r: torch.ones(len(r.response)), 0.0, torch.float32),
        "logq_old": pad(lambda r: r.logq_old, 0.0, torch.float32),
        "logw": pad(lambda r: r.logw, 0.0, torch.float32),
        "advantage": pad(lambda r: r.advantage, 0.0, torch.float32),
    }


@register_method("minillm")
class MiniLLM(Method):
    needs_teacher = True
    dropout = False  # q_old and q_theta must be the same function at the start of each PPO pass

    def __init__(self, cfg: Config, models: Models, data: RunData) -> None:
        super().__init__(cfg, models, data)
        self.m = cfg.minillm
        self.sampler = EpochSampler(len(data.train), cfg.seed)
        tok = models.tokenizer
        self.pad_id = tok.pad_token_id
        self.stop_ids = sorted(i for i in {tok.eos_token_id, *_extra_eos(models.student)} if 0 <= i < models.vocab_size)

    def pt_coef(self) -> float:
        return self.m.pt_coef if self.data.pretrain is not None else 0.0

    # -- rollout -------------------------------------------------------------------------------
    def alpha(self, step: int) -> float:
        """``minillm.alpha_schedule`` at ``step`` over the run's length (the trainer sets ``max_steps``)."""
        return scheduled_alpha(self.m, step, self.max_steps or self.cfg.train.max_steps)

    def rollout(self, step: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Sample responses for the next ``rollouts_per_step`` prompts -> (prompt, response, log w).

        log w_t = log q(y_t) - log p~(y_t) comes from the sampling pass itself, so the importance
        weight is fixed at sampling time; with a = 0 and no temperature / top-k / top-p it is 1 up to
        rounding (p~ = q). p~ is the distribution actually sampled, after any filtering."""
        items = [self.data.train[i] for i in self.sampler.take(self.m.rollouts_per_step)]
        dist = self.models.dist
        items = dist.split(items)  # this rank's prompts: collect() gathers the scored rows back in global order
        g, d = self.cfg.generation, self.cfg.data
        out = []
        self.models.student.eval()
        for batch in chunks(items, self.m.rollout_batch_size):
            prompts = [x.prompt_ids for x in batch]
            # each row keeps its own budget, so its response never depends on its batch-mates
            caps = [min(g.max_new_tokens, d.max_len - len(p)) for p in prompts]
            # a sharded teacher's forward is a collective: every rank runs the same number of decode steps
            budget = int(dist.max_value(max(caps))) if dist.lockstep else max(caps)
            r = sample(
                self.models.student, prompts, row_seeds(self.cfg.seed, [x.index for x in batch], salt=step),
                max_new_tokens=budget, stop_ids=self.stop_ids, pad_id=self.pad_id,
                vocab_size=self.models.vocab_size, teacher=self.models.teacher, alpha=self.alpha(step),
                temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, autocast=self.autocast, engine=g.engine,
                all_done=dist.all_done if dist.lockstep else None,
            )
            for b, x in enumerate(batch):
                n = min(int(r.response_mask[b].sum()), caps[b])
                out.append((x.prompt_ids, r.response_ids[b, :n], r.logq[b, :n] - r.logmix[b, :n]))
        return out

    # -- score ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, rollouts: list[tuple[list[int], torch.Tensor, torch.Tensor]]) -> tuple[list[_Row], dict[str, float]]:
        """Teacher-forced log-probs of the sampled tokens, rewards, weights and advantages."""
        m = self.m
        rows, rewards_all = [], []
        kl_sum = kl_n = seq_rkl = 0.0
        for batch in chunks([r for r in rollouts if len(r[1]) > 0], self.cfg.train.batch_size):
            stub = [_Row(p, resp, torch.zeros(len(resp)), logw, torch.zeros(len(resp))) for p, resp, logw in batch]
            mb = collate_rollouts(stub, self.pad_id)
            s_logits, t_logits = self._pair_logits(self.models.student, mb), self._pair_logits(self.models.teacher, mb)
            ids, mask = mb["response_ids"].to(s_logits.device), mb["response_mask"].to(s_logits.device)
            logq = token_logprobs(s_logits, ids) * mask
            logp = token_logprobs(t_logits, ids) * mask
            w = torch.exp(mb["logw"].to(logq.device)) * mask
            kl = per_token("reverse_kl", s_logits, t_logits)
            kl_sum += float((kl * w).sum())
            kl_n += float(mask.sum())
            seq_rkl += float((w * (logq - logp)).sum())
            r = (logp - logq) * m.reward_scale
            if m.reward_clip is not None:
                r = r.clamp(-m.reward_clip, m.reward_clip)
            adv = future_returns(
                r, mask, gamma=m.gamma, length_norm=m.length_norm,
                include_current=m.include_current_reward or not m.single_step,
            )
            rewards_all.append(((r * mask).sum(), mask.sum()))
            for b, (p, resp, logw) in enumerate(batch):
                n = len(resp)
                rows.append(_Row(p, resp, logq[b, :n].cpu(), logw, adv[b, :n].cpu()))
        n_tok = max(kl_n, 1.0)
        stats = {
            "reward": float(sum(s for s, _ in rewards_all) / n_tok) if rewards_all else 0.0,
            "reverse_kl": kl_sum / n_tok,
            "seq_reverse_kl": seq_rkl / max(len(rows), 1),
            "response_len": float(np.mean([len(r[1]) for r in rollouts])) if rollouts else 0.0,
            "empty_responses": float(sum(len(r[1]) == 0 for r in rollouts)),
        }
        return rows, stats

    def _pair_logits(self, model: Any, mb: Batch) -> torch.Tensor:
        """Logits ``(B, R, V)`` predicting the response tokens; the prompt positions' logits are not computed."""
        seq = sequence_batch(mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"])
        R = mb["response_ids"].shape[1]
        # the last R + 1 positions are P - 1 .. P + R - 1; the first R of them predict the response
        logits = self.forward_logits(model, seq["input_ids"], seq["attention_mask"], seq["position_ids"], keep=R + 1)
        return response_logits(logits, 1, R)

    # -- plan ----------------------------------------------------------------------------------
    def collect(self, step: int) -> Experience:
        dist = self.models.dist
        t0 = time.perf_counter()
        rollouts = self.rollout(step)  # this rank's part of the prompts
        t1 = time.perf_counter()
        mine, stats = self.score(rollouts)
        rows = dist.gather(mine)  # every rank: all rows, in the order one process scores them
        n_tok = float(sum(len(r.response) for r in mine))
        stats = dist.mean_values(stats, {"reward": n_tok, "reverse_kl": n_tok, "seq_reverse_kl": len(mine), "response_len": len(rollouts)})
        if self.m.whiten == "rollout" and rows:  # over the whole rollout batch, as one process would
            flat = torch.cat([r.advantage for r in rows])
            white = whiten(flat[None], torch.ones_like(flat)[None])[0]
            for r, piece in zip(rows, torch.split(white, [len(r.response) for r in rows])):
                r.advantage = piece
        stats["alpha"] = self.alpha(step)
        t2 = time.perf_counter()
        t = self.cfg.train
        updates: list[list[Batch]] = []
        if rows:
            for epoch in range(self.m.ppo_epochs):
                order = np.random.default_rng([self.cfg.seed, step, epoch]).permutation(len(rows))
                for mini in chunks([rows[i] for i in order], t.sequences_per_step):
                    updates.append([self.add_pretrain(collate_rollouts(mb, self.pad_id)) for mb in chunks(mini, t.batch_size)])
        once = {"rollout_time_s": dist.max_value(t1 - t0), "score_time_s": dist.max_value(t2 - t1),
                "rollout_tokens": float(sum(len(r.response) for r in rows))}
        return Experience(updates, stats, once)

    # -- loss ----------------------------------------------------------------------------------
    def loss_terms(self, model: Any, batch: Batch) -> dict[str, Term]:
        m = self.m
        s_logits = self._pair_logits(model, batch)
        dev = s_logits.device
        ids, mask = batch["response_ids"].to(dev), batch["response_mask"].to(dev)
        logq = token_logprobs(s_logits, ids)
        logq_old = batch["logq_old"].to(dev)
        w = torch.exp(batch["logw"].to(dev)) * mask
        adv = batch["advantage"].to(dev)
        if m.whiten == "minibatch_padded":  # the reference code: per mini-batch, padding positions counted
            adv = whiten_padded(adv)
        pg, clipped = clipped_pg(logq, logq_old, w, adv, m.clip)
        terms = {
            "pg": Term(pg, "response_mask"),
            "clip_frac": Term(clipped, "response_mask", 0.0),
            "entropy": Term(token_entropy(s_logits), "response_mask", 0.0),
            "ratio": Term((torch.exp(logq - logq_old) * mask).detach(), "response_mask", 0.0),
        }
        if m.single_step:
            with torch.no_grad():
                t_logits = self._pair_logits(self.models.teacher, batch)
            kl = per_token("reverse_kl", s_logits, t_logits)
            terms["single_step"] = Term(kl * w if m.single_step_weight else kl, "response_mask")
        terms.update(self.pt_terms(model, batch, m.pt_kd_ratio))
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sampler.load_state_dict(state["sampler"])


def _extra_eos(model: Any) -> list[int]:
    """End-of-turn ids a model's generation config lists beside the tokenizer's EOS (chat models)."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
