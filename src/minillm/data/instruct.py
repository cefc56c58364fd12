"""Prompt templates, tokenization with the paper's length rules, batching.

Length rules (paper, Sec. 3.1): a prompt longer than ``max_prompt_len`` tokens is *skipped* and
counted, never truncated; a response is cut so that prompt + response fits ``max_len`` (counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minillm.data.formats import Example
from minillm.errors import UserError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(ex: Example, template: str, tokenizer: Any = None) -> str:
    """The prompt text the model sees for ``ex`` under ``template`` (alpaca, chat or raw)."""
    if template == "raw":
        return ex.instruction + (f"\n{ex.context}" if ex.context else "")
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if ex.context.strip() else ALPACA_NO_INPUT
        return fmt.format(instruction=ex.instruction, context=ex.context)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("data.template: 'chat' needs a tokenizer with a chat template; use 'alpaca' or 'raw'")
        messages = ex.messages or [
            {"role": "user", "content": ex.instruction + (f"\n\n{ex.context}" if ex.context else "")}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise UserError(f"data.template: unknown template {template!r}")


@dataclass
class Encoded:
    """Token ids of one example; ``response_ids`` ends with EOS when the response was not cut."""

    prompt_ids: list[int]
    response_ids: list[int]
    index: int  # position in the example list (stable across runs: seeds sampling)


@dataclass
class EncodeStats:
    """What :func:`encode_examples` kept and dropped, by reason."""

    kept: int = 0
    skipped_long_prompt: int = 0
    truncated_response: int = 0
    no_response: int = 0
    empty_prompt: int = 0
    skipped_sources: list[str] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return self.kept + self.skipped_long_prompt + self.no_response + self.empty_prompt

    def __add__(self, other: EncodeStats) -> EncodeStats:
        return EncodeStats(
            self.kept + other.kept, self.skipped_long_prompt + other.skipped_long_prompt,
            self.truncated_response + other.truncated_response, self.no_response + other.no_response,
            self.empty_prompt + other.empty_prompt, (self.skipped_sources + other.skipped_sources)[:5],
        )

    def reasons(self, max_prompt_len: int, max_len: int) -> list[str]:
        """The non-zero drop and cut counts in words."""
        out = []
        if self.no_response:
            out.append(f"dropped {self.no_response} without a response")
        if self.empty_prompt:
            out.append(f"dropped {self.empty_prompt} with an empty prompt")
        if self.skipped_long_prompt:
            eg = f" (e.g. {', '.join(self.skipped_sources[:2])})" if self.skipped_sources else ""
            out.append(f"dropped {self.skipped_long_prompt} with a prompt over data.max_prompt_len={max_prompt_len} tokens{eg}")
        if self.truncated_response:
            out.append(f"cut {self.truncated_response} responses to fit data.max_len={max_len} tokens")
        return out


def _blank(ex: Example) -> bool:
    return not ex.instruction.strip() and not ex.context.strip()


def encode_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    template: str,
    max_prompt_len: int,
    max_len: int,
    require_response: bool = True,
) -> tuple[list[Encoded], EncodeStats]:
    """Tokenize examples with the paper's length rules. EOS closes every full response.

    An example whose instruction and context are blank, or whose prompt has no token, is dropped
    and counted (``empty_prompt``): there is nothing to answer, and a rollout cannot start from it."""
    stats = EncodeStats()
    out: list[Encoded] = []
    eos = tokenizer.eos_token_id
    is_chat = template == "chat"
    for i, ex in enumerate(examples):
        if ex.response is None and require_response:
            stats.no_response += 1
            continue
        if _blank(ex):
            stats.empty_prompt += 1
            continue
        text = render_prompt(ex, template, tokenizer)
        # a chat template already inserts its special tokens; other templates use the tokenizer's defaults
        prompt_ids = tokenizer(text, add_special_tokens=not is_chat)["input_ids"]
        if not prompt_ids:
            stats.empty_prompt += 1
            continue
        if len(prompt_ids) > max_prompt_len:
            stats.skipped_long_prompt += 1
            if len(stats.skipped_sources) < 5:
                stats.skipped_sources.append(ex.source)
            continue
        response_ids: list[int] = []
        if ex.response is not None:
            response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
            if eos is not None:
                response_ids = response_ids + [eos]
            room = max_len - len(prompt_ids)
            if len(response_ids) > room:
                response_ids = response_ids[:room]
                stats.truncated_response += 1
        out.append(Encoded(prompt_ids, response_ids, i))
    stats.kept = len(out)
    return out, stats


def collate_lm(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Teacher-forced batch, right-padded: the loss is on response tokens only.

    Returns ``input_ids``/``attention_mask`` ``(B, L)`` and ``targets``/``loss_mask`` ``(B, L-1)``,
    where ``targets[:, t] = input_ids[:, t+1]`` and ``loss_mask`` marks response targets.
    """
    L = max(len(x.prompt_ids) + len(x.response_ids) for x in items)
    B = len(items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    resp = torch.zeros((B, L), dtype=torch.bool)
    for b, x in enumerate(items):
        seq = x.prompt_ids + x.response_ids
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        resp[b, len(x.prompt_ids) : len(seq)] = True
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "targets": ids[:, 1:].clone(),
        "loss_mask": resp[:, 1:].float(),
    }


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for decoding -> ``input_ids`` and ``attention_mask`` ``(B, P)``."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, P - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attn[b, P - len(p) :] = 1
    return ids, attn


class EpochSampler:
    """Deterministic shuffled batches over ``n`` items: a fresh permutation per epoch, seeded by
    (seed, epoch). Its state is (epoch, position), so a resumed run draws the same batches."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n <= 0:
            raise UserError("the training set is empty after filtering (all prompts over data.max_prompt_len?)")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        """The next ``k`` indices, crossing into the next epoch when this one runs out."""
        out: list[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            step = min(k - len(out), self.n - self.pos)
            out.extend(int(i) for i in self._perm[self.pos : self.pos + step])
            self.pos += step
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()
