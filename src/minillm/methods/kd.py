"""Token-level distillation baselines: word-level KD, naive reverse KL, GKD and DistiLLM.

Per response position t the student q and the teacher p each give a next-token distribution
(logits divided by ``kd.temperature``); ``kd.loss`` names the divergence D from
:data:`minillm.losses.DIVERGENCES`:

* ``forward_kl``: KL(p || q), word-level KD (the paper's "KD" baseline);
* ``reverse_kl``: KL(q || p) on teacher-forced data, without MiniLLM's policy gradient or
  stabilisers (the "naive reverse KL" ablation);
* ``jsd`` with ``kd.beta``: generalised JSD (GKD); ``tvd``: total variation;
* ``skew_forward_kl`` / ``skew_reverse_kl`` with ``kd.skew_alpha``: DistiLLM's skew KLs.

The loss of an optimizer step is

    L = ratio * mean_t D_t + (1 - ratio) * mean_t CE_t  (+ pt_coef * L_PT when data.pretrain is set)

with CE_t = -log q(y_t | y_<t, x) on the data's response and both means over the response tokens
of the whole step (the trainer's global normalisation). ``ratio`` = ``kd.ratio`` (the reference
code uses 0.5). D is taken at ``kd.temperature`` as is, without Hinton et al.'s T^2 factor; CE
always uses temperature 1.

On-policy steps (GKD's lambda = ``kd.onpolicy_fraction``): a seeded coin per step decides whether
the step's responses are the training data's (teacher forcing) or sampled by the student itself
(``generation.*`` settings, one seed per example and step, so a resumed run draws the same
responses). A sampled response is not ground truth, so such a step trains ``ratio * D`` only, with
no CE term; for pure GKD set ``kd.ratio=1``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from minillm.config import Config
from minillm.data import RunData
from minillm.data.instruct import Encoded, collate_lm
from minillm.decoding import row_seeds, sample, stop_token_ids
from minillm.errors import UserError
from minillm.losses import DIVERGENCES
from minillm.methods.base import Batch, Experience, Term, chunks, register_method
from minillm.methods.sft import DataMethod
from minillm.models import Models

log = logging.getLogger("minillm")

ONPOLICY_KEY = "onpolicy"  # batch flag: the responses were sampled by the student (no CE term)
_COIN_SALT = 0x6B64  # separates the per-step on-policy coin from other uses of (seed, step)


@register_method("kd")
class KD(DataMethod):
    """L = ratio * D(q, p) + (1 - ratio) * CE on data batches; ratio * D on student-sampled batches."""

    needs_teacher = True

    def __init__(self, cfg: Config, models: Models, data: RunData) -> None:
        super().__init__(cfg, models, data)
        self.k = cfg.kd
        if self.k.loss not in DIVERGENCES:
            raise UserError(f"kd.loss: unknown divergence {self.k.loss!r}; choose one of {sorted(DIVERGENCES)}")
        if self.k.onpolicy_fraction > 0 and self.k.ratio == 0:
            raise UserError(
                "kd.onpolicy_fraction: on-policy steps train only the divergence, which kd.ratio=0 switches off; "
                "raise kd.ratio (1 for pure GKD) or set kd.onpolicy_fraction=0"
            )
        self.stop_ids = stop_token_ids(models.tokenizer, models.student, models.vocab_size)
        # every divergence reads the parameters it needs and ignores the others
        self.div_params = {"temperature": self.k.temperature, "beta": self.k.beta, "skew_alpha": self.k.skew_alpha}

    # -- collect ---------------------------------------------------------------------------------
    def is_onpolicy(self, step: int) -> bool:
        """The step's coin: a pure function of (seed, step), so a resumed run makes the same choices."""
        f = self.k.onpolicy_fraction
        if f <= 0:
            return False
        return bool(np.random.default_rng([self.cfg.seed, step, _COIN_SALT]).random() < f)

    def collect(self, step: int) -> Experience:
        if not self.is_onpolicy(step):
            exp = super().collect(step)
            exp.metrics[ONPOLICY_KEY] = 0.0
            return exp
        t = self.cfg.train
        items = [self.data.train[i] for i in self.sampler.take(t.sequences_per_step)]
        sampled = self.sample_responses(items, step)
        pad = self.models.tokenizer.pad_token_id
        micro = []
        for c in chunks(sampled, t.batch_size):
            mb = self.add_pretrain(collate_lm(c, pad))
            mb[ONPOLICY_KEY] = torch.tensor(True)
            micro.append(mb)
        metrics = {
            "epoch": self.sampler.epoch + self.sampler.pos / self.sampler.n,
            ONPOLICY_KEY: 1.0,
            "sample_len": float(np.mean([len(x.response_ids) for x in sampled])),
        }
        return Experience([micro], metrics)

    def sample_responses(self, items: list[Encoded], step: int) -> list[Encoded]:
        """Replace each item's response by one the student samples (stop token kept, as in the data).

        Row seeds come from (run seed, example index, step), and each row is cut to its own budget
        min(generation.max_new_tokens, data.max_len - prompt length), so a response never depends on
        the other prompts of its batch.
        """
        g, d = self.cfg.generation, self.cfg.data
        student = self.models.student
        was_training = student.training
        student.eval()
        out: list[Encoded] = []
        for batch in chunks(self.models.dist.split(items), self.cfg.train.eval_batch_size):  # this rank's part
            caps = [min(g.max_new_tokens, d.max_len - len(x.prompt_ids)) for x in batch]
            r = sample(
                student, [x.prompt_ids for x in batch], row_seeds(self.cfg.seed, [x.index for x in batch], salt=step),
                max_new_tokens=max(caps), stop_ids=self.stop_ids, pad_id=self.models.tokenizer.pad_token_id,
                vocab_size=self.models.vocab_size, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                no_repeat_ngram_size=g.no_repeat_ngram_size, autocast=self.autocast, engine=g.engine,
            )
            for b, x in enumerate(batch):
                n = min(int(r.response_mask[b].sum()), caps[b])
                out.append(Encoded(x.prompt_ids, r.response_ids[b, :n].tolist(), x.index))
        student.train(was_training)
        return self.models.dist.gather(out)  # every rank: all responses, in the items' order

    # -- loss ------------------------------------------------------------------------------------
    def loss_terms(self, model: Any, batch: Batch) -> dict[str, Term]:
        """``kd``: D_t per response position (weight ``ratio``); ``ce``: -log q(y_t) (weight
        ``1 - ratio``, data batches only); ``pt`` as in SFT. All ``(B, L-1)`` over ``loss_mask``."""
        s_out = self.response_outputs(model, batch)
        with torch.no_grad():
            t_out = self.response_outputs(self.models.teacher, batch)
        dev = s_out.x.device
        mask_BT = batch["loss_mask"].to(dev)
        # only response positions are computed: prompt positions cost no vocabulary-sized softmax
        got = self.terms(s_out, mask_BT, targets_BT=batch["targets"].to(dev), divergence=self.k.loss, teacher=t_out,
                         **self.div_params)
        terms = {"kd": Term(got["divergence"], "loss_mask", self.k.ratio)}
        if not bool(batch.get(ONPOLICY_KEY, False)):
            terms["ce"] = Term(-got["logprob"], "loss_mask", 1.0 - self.k.ratio)
        terms.update(self.pt_terms(model, batch))
        return terms
