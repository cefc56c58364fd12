"""Supervised fine-tuning: cross-entropy on response tokens only (the paper's "SFT w/o KD")."""

from __future__ import annotations

from typing import Any

from minillm.config import Config
from minillm.data import RunData
from minillm.data.instruct import EpochSampler, collate_lm
from minillm.methods.base import Batch, Experience, Method, Outputs, Term, chunks, register_method
from minillm.models import Models


class DataMethod(Method):
    """A method that trains on the instruction data under teacher forcing, one update per step."""

    def __init__(self, cfg: Config, models: Models, data: RunData) -> None:
        super().__init__(cfg, models, data)
        self.sampler = EpochSampler(len(data.train), cfg.seed)

    def collect(self, step: int) -> Experience:
        t = self.cfg.train
        items = [self.data.train[i] for i in self.sampler.take(t.sequences_per_step)]
        pad = self.models.tokenizer.pad_token_id
        micro = [self.add_pretrain(collate_lm(c, pad)) for c in chunks(items, t.batch_size)]
        return Experience([micro], {"epoch": self.sampler.epoch + self.sampler.pos / self.sampler.n})

    def response_outputs(self, model: Any, batch: Batch) -> Outputs:
        """The outputs ``(B, L-1, .)`` that predict ``batch['targets']`` (hidden states + head, or logits)."""
        return self.forward_outputs(model, batch["input_ids"], batch["attention_mask"]).shifted()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sampler.load_state_dict(state["sampler"])


@register_method("sft")
class SFT(DataMethod):
    """L = mean over response tokens of -log q(y_t | y_<t, x) (+ pt_coef * L_PT)."""

    def loss_terms(self, model: Any, batch: Batch) -> dict[str, Term]:
        out = self.response_outputs(model, batch)
        dev = out.x.device
        logprob = self.terms(out, batch["loss_mask"].to(dev), targets_BT=batch["targets"].to(dev))["logprob"]
        return {"ce": Term(-logprob, "loss_mask"), **self.pt_terms(model, batch)}
