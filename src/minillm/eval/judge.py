"""LLM-as-judge feedback (the paper's GPT-4 score), off by default.

For each example the judge sees the instruction, the reference answer and the model's answer and
replies with two 1-10 ratings on its first line, "reference model". The reported score is

    score = sum_i model_rating_i / sum_i reference_rating_i x 100

over the examples whose reply parsed; replies that do not parse are counted as failures and left
out of both sums. A test set without references (Vicuna) gets a single-answer prompt and the
score is the mean rating x 10 (a 0-100 scale; not comparable with the paired score).

A judge is any callable ``messages -> reply text`` (OpenAI chat ``messages``). Two are provided:
:class:`OpenAICompatibleJudge` (``POST {base_url}/v1/chat/completions`` through ``urllib``, any
OpenAI-compatible server, e.g. vLLM or llama.cpp's server) and :class:`LocalModelJudge` (a
transformers causal LM answering greedily). ``eval.judge`` selects one: ``openai:<model>@<base_url>``
or a local model path (:func:`make_judge`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from minillm.errors import UserError

log = logging.getLogger("minillm")

Judge = Callable[[list[dict[str, str]]], str]

__all__ = [
    "Judge",
    "JudgeResult",
    "LocalModelJudge",
    "OpenAICompatibleJudge",
    "judge_messages",
    "judge_score",
    "make_judge",
    "parse_scores",
]

SYSTEM_PROMPT = "You grade answers to instructions carefully, fairly and consistently."

PAIRED_PROMPT = """Here is an instruction, followed by two answers to it.

[Instruction]
{instruction}

[Answer 1]
{reference}
[End of Answer 1]

[Answer 2]
{answer}
[End of Answer 2]

Rate how well each answer follows the instruction: its helpfulness, relevance, accuracy and level of detail. Give each answer an overall score from 1 to 10, where a higher score is better.
On the first line of your reply write only the two scores, for Answer 1 and Answer 2 in that order, separated by a space. Then, from the second line on, explain your rating briefly, without letting the order of the answers sway you."""

SINGLE_PROMPT = """Here is an instruction, followed by an answer to it.

[Instruction]
{instruction}

[Answer]
{answer}
[End of Answer]

Rate how well the answer follows the instruction: its helpfulness, relevance, accuracy and level of detail. Give it an overall score from 1 to 10, where a higher score is better.
On the first line of your reply write only the score. Then, from the second line on, explain your rating briefly."""


def judge_messages(instruction: str, answer: str, reference: str | None) -> list[dict[str, str]]:
    """The chat messages for one rating: paired with ``reference``, single-answer without."""
    if reference is None:
        user = SINGLE_PROMPT.format(instruction=instruction, answer=answer)
    else:
        user = PAIRED_PROMPT.format(instruction=instruction, reference=reference, answer=answer)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*/\s*10\b)?")
_LABEL = re.compile(r"\b(?:answer|assistant)\s*\d+\b", re.IGNORECASE)


def parse_scores(reply: str, n: int = 2) -> tuple[float, ...] | None:
    """The ``n`` ratings on the first non-empty line of ``reply`` ("8 6", "8, 6", "8/10 6/10",
    "Answer 1: 8, Answer 2: 6"), or None when that line does not hold exactly ``n`` numbers
    within [0, 10]."""
    line = next((ln for ln in reply.strip().splitlines() if ln.strip()), "")
    line = _LABEL.sub(" ", line)  # "Answer 1: 8, Answer 2: 6"
    values = tuple(float(m.group(1)) for m in _NUMBER.finditer(line))
    if len(values) != n or not all(0 <= v <= 10 for v in values):
        return None
    return values


@dataclass
class JudgeResult:
    """``score`` (None when no reply parsed); ``mode`` is "paired" or "single"."""

    score: float | None
    mode: str
    rated: int
    failures: int
    skipped: int  # examples without a reference in a paired set
    model_total: float = 0.0
    reference_total: float = 0.0
    ratings: list[tuple[float, ...] | None] = field(default_factory=list, repr=False)
    failed_replies: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "mode": self.mode, "rated": self.rated, "failures": self.failures,
                "skipped": self.skipped, "model_total": self.model_total, "reference_total": self.reference_total}


def judge_score(judge: Judge, instructions: Sequence[str], references: Sequence[Sequence[str]], answers: Sequence[str]) -> JudgeResult:
    """Rate every answer with ``judge`` (see the module docstring for the score).

    ``references[i]`` lists example i's references (the first is shown); a set where no example
    has one is rated in single-answer mode. A judge that raises counts as a failure.
    """
    if not len(instructions) == len(references) == len(answers):
        raise ValueError("instructions, references and answers must have the same length")
    paired = any(len(r) > 0 for r in references)
    res = JudgeResult(score=None, mode="paired" if paired else "single", rated=0, failures=0, skipped=0)
    single_total = 0.0
    for instr, refs, ans in zip(instructions, references, answers):
        if paired and not refs:
            res.skipped += 1
            res.ratings.append(None)
            continue
        try:
            reply = judge(judge_messages(instr, ans, refs[0] if paired else None))
        except (OSError, ValueError, RuntimeError) as e:
            reply = f"<judge error: {e}>"
        scores = parse_scores(reply, 2 if paired else 1)
        res.ratings.append(scores)
        if scores is None:
            res.failures += 1
            if len(res.failed_replies) < 5:
                res.failed_replies.append(reply[:200])
            continue
        res.rated += 1
        if paired:
            res.reference_total += scores[0]
            res.model_total += scores[1]
        else:
            single_total += scores[0]
    if res.failures:
        log.warning("judge: %d of %d replies did not parse (e.g. %r)", res.failures, res.failures + res.rated,
                    res.failed_replies[0] if res.failed_replies else "")
    if paired:
        res.score = 100.0 * res.model_total / res.reference_total if res.reference_total > 0 else None
    else:
        res.model_total = single_total
        res.score = 10.0 * single_total / res.rated if res.rated else None
    return res


class OpenAICompatibleJudge:
    """A chat model behind an OpenAI-compatible HTTP API (``POST /v1/chat/completions``).

    ``api_key_env`` names the environment variable holding the key (sent as a Bearer token);
    unset or empty sends none (local servers need none). Greedy (temperature 0) by default.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", *,
                 temperature: float = 0.0, max_tokens: int = 256, timeout: float = 120.0, retries: int = 2,
                 backoff_s: float = 1.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"eval.judge: base URL {base_url!r} must start with http:// or https://")
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.api_key_env = model, api_key_env
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.retries, self.backoff_s = retries, backoff_s

    def __call__(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return str(data["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last = e
                if e.code in (400, 401, 403, 404):  # a request or credential mistake will not heal on retry
                    raise UserError(f"eval.judge: {self.url} answered HTTP {e.code} ({e.reason}); check the model name and {self.api_key_env}") from None
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise RuntimeError(f"judge request to {self.url} failed after {self.retries + 1} tries: {last}")


class LocalModelJudge:
    """A local transformers causal LM as the judge, answering greedily (top-1) to ``max_new_tokens``.

    Uses the tokenizer's chat template when it has one, else the messages' contents joined by
    blank lines.
    """

    def __init__(self, path: str, device: str = "auto", max_new_tokens: int = 64) -> None:
        from minillm.config import ModelConfig
        from minillm.models import load_model, load_tokenizer, resolve_device

        mc = ModelConfig(path=path)
        self.tokenizer = load_tokenizer(mc, "eval.judge")
        self.model = load_model(mc, "eval.judge", resolve_device(device), "teacher")
        self.vocab_size = len(self.tokenizer.get_vocab())
        self.max_new_tokens = max_new_tokens

    def __call__(self, messages: list[dict[str, str]]) -> str:
        from minillm.decoding import generate

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok("\n\n".join(m["content"] for m in messages) + "\n\n", add_special_tokens=True)["input_ids"]
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", 4096)
        if len(ids) + self.max_new_tokens > int(limit):  # counted as a failed rating by judge_score
            raise RuntimeError(f"the judge prompt ({len(ids)} tokens) does not fit the judge model's {limit} positions")
        (out,) = generate(self.model, [ids], [0], seed=0, tokenizer=tok, vocab_size=self.vocab_size,
                          max_new_tokens=self.max_new_tokens, max_len=int(limit), batch_size=1, top_k=1)
        return tok.decode(out, skip_special_tokens=True)


def make_judge(spec: str, api_key_env: str | None = "OPENAI_API_KEY", device: str = "auto") -> Judge:
    """``openai:<model>@<base_url>`` -> :class:`OpenAICompatibleJudge`; anything else is a local
    model path -> :class:`LocalModelJudge`."""
    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        model, sep, base = rest.partition("@")
        if not sep or not model or not base:
            raise UserError(f"eval.judge: {spec!r} should read openai:<model>@<base_url>, e.g. openai:gpt-4@https://api.openai.com")
        return OpenAICompatibleJudge(base, model, api_key_env)
    return LocalModelJudge(spec, device=device)
