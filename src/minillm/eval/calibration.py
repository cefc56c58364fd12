"""Calibration: expected calibration error (ECE) of a model's answer probabilities.

Records (JSONL, one per line): ``{"prompt": str, "choices": [str, ...], "answer": int}`` where
``answer`` indexes ``choices`` (a string equal to one of the choices is accepted too). The prompt
is rendered with the run's template (``data.template``) like any instruction, and the model's
probability of choice c is

    P(c | x) = exp(sum_t log q(c_t | x, c_<t)) / sum_c' exp(sum_t log q(c'_t | x, c'_<t))

(the choice's tokens only, no end-of-sequence). Confidence = max_c P(c | x); correct =
[argmax_c P(c | x) == answer]. With ``bins`` equal-width bins B_b = (b/M, (b+1)/M] (confidence 0
falls in the first bin),

    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|

where acc and conf are the mean correctness and mean confidence of the records in B_b.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from minillm.data.formats import Example, load_records
from minillm.data.instruct import Encoded, collate_lm, render_prompt
from minillm.errors import UserError
from minillm.losses import token_logprobs
from minillm.models import vocab_logits

__all__ = [
    "ChoiceRecord",
    "calibration_report",
    "choice_probabilities",
    "expected_calibration_error",
    "load_choice_records",
    "reliability_bins",
]


@dataclass
class ChoiceRecord:
    prompt: str
    choices: list[str]
    answer: int
    source: str = ""


def _bin_index(conf: float, bins: int) -> int:
    # bins (b/M, (b+1)/M]: count the inner edges strictly below conf; edges b/M are exact divisions,
    # so 0.3 lands in (0.2, 0.3] rather than in (0.3, 0.4] as ceil(0.3 * 10) - 1 would put it
    edges = [b / bins for b in range(1, bins)]
    return bisect.bisect_left(edges, conf)


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool | int], bins: int = 10) -> list[dict[str, float | int | None]]:
    """Reliability-diagram data: per equal-width bin ``lo``, ``hi``, ``count``, ``accuracy`` and mean
    ``confidence`` (both None for an empty bin)."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness flags")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    count = [0] * bins
    hits = [0.0] * bins
    conf_sum = [0.0] * bins
    for c, ok in zip(confidences, correct):
        if not 0.0 <= c <= 1.0 or math.isnan(c):
            raise ValueError(f"confidence {c} is not a probability")
        b = _bin_index(float(c), bins)
        count[b] += 1
        hits[b] += float(bool(ok))
        conf_sum[b] += float(c)
    return [
        {"lo": b / bins, "hi": (b + 1) / bins, "count": count[b],
         "accuracy": hits[b] / count[b] if count[b] else None,
         "confidence": conf_sum[b] / count[b] if count[b] else None}
        for b in range(bins)
    ]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool | int], bins: int = 10) -> float:
    """ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)| over ``bins`` equal-width bins (0 for N = 0)."""
    table = reliability_bins(confidences, correct, bins)
    n = len(confidences)
    if n == 0:
        return 0.0
    return sum(
        row["count"] / n * abs(row["accuracy"] - row["confidence"])  # type: ignore[operator]
        for row in table if row["count"]
    )


def load_choice_records(source: str) -> list[ChoiceRecord]:
    """Read multiple-choice records, validating each with its file and line."""
    out = []
    for where, rec in load_records(source):
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object with 'prompt', 'choices' and 'answer'")
        prompt = rec.get("prompt", rec.get("question"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string; found fields {sorted(rec)}")
        choices = rec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise UserError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        answer = rec.get("answer")
        if isinstance(answer, str):
            if answer not in choices:
                raise UserError(f"{where}: 'answer' {answer!r} is not one of the choices; give its index (0-based)")
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UserError(f"{where}: 'answer' must be a 0-based index into 'choices' (0..{len(choices) - 1}), got {answer!r}")
        out.append(ChoiceRecord(prompt, list(choices), answer, where))
    if not out:
        raise UserError(f"{source}: no records found")
    return out


@torch.no_grad()
def choice_probabilities(
    model: Any,
    tokenizer: Any,
    records: Sequence[ChoiceRecord],
    *,
    template: str,
    vocab_size: int,
    batch_size: int,
) -> list[list[float]]:
    """P(choice | prompt) for every record, normalised over its choices (see the module docstring)."""
    items: list[Encoded] = []
    owner: list[tuple[int, int]] = []
    add_special = template != "chat"  # a chat template inserts its own special tokens
    for r, rec in enumerate(records):
        prompt_ids = tokenizer(render_prompt(Example(instruction=rec.prompt), template, tokenizer), add_special_tokens=add_special)["input_ids"]
        for c, choice in enumerate(rec.choices):
            ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not ids:
                raise UserError(f"{rec.source}: choice {choice!r} has no tokens")
            items.append(Encoded(prompt_ids, ids, len(items)))
            owner.append((r, c))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    logp = [[0.0] * len(rec.choices) for rec in records]
    for start in range(0, len(items), batch_size):
        b = collate_lm(items[start : start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev), use_cache=False).logits
        lp_BT = token_logprobs(vocab_logits(logits, vocab_size)[:, :-1], b["targets"].to(dev))
        sums = (lp_BT.double() * b["loss_mask"].to(dev).double()).sum(-1).tolist()
        for k, s in enumerate(sums):
            r, c = owner[start + k]
            logp[r][c] = s
    model.train(was_training)
    out = []
    for row in logp:
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        out.append([math.exp(v - m) / z for v in row])
    return out


def calibration_report(probs: Sequence[Sequence[float]], answers: Sequence[int], bins: int = 10) -> dict[str, Any]:
    """``{"ece", "accuracy", "mean_confidence", "n", "bins": [...]}`` from per-record choice probabilities."""
    conf = [max(p) for p in probs]
    correct = [max(range(len(p)), key=p.__getitem__) == a for p, a in zip(probs, answers)]
    n = len(conf)
    return {
        "ece": expected_calibration_error(conf, correct, bins),
        "accuracy": sum(correct) / n if n else 0.0,
        "mean_confidence": sum(conf) / n if n else 0.0,
        "n": n,
        "bins": reliability_bins(conf, correct, bins),
    }
