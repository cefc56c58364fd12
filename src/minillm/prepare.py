"""``minillm prepare dolly``: raw databricks-dolly-15k -> the paper's train / valid / test files.

The paper (Gu et al. 2024, Sec. 3.1 and App. B) drops the Dolly records whose prompt does not fit
the model's context, then holds out a validation and a test split and trains on the rest
(about 12.5K examples). The reference scripts take 1,000 validation records
(``--dev-num 1000``) and test on 500 (DollyEval); those are the defaults here.

Steps, all deterministic for a given ``seed``:

1. read every record (Dolly JSONL with ``instruction`` / ``context`` / ``response`` / ``category``,
   or any shape :func:`minillm.data.formats.record_to_example` accepts; a saved ``datasets`` folder
   or a Hub id works too);
2. drop records with an empty instruction or an empty response;
3. shuffle with ``numpy.random.default_rng(seed)``;
4. with a tokenizer, drop prompts longer than ``max_prompt_len`` tokens under the alpaca template,
   counted exactly as training counts them (:func:`minillm.data.instruct.encode_examples`).
   Filtering *after* the shuffle keeps the order of the surviving records the same for every
   tokenizer, so the GPT-2, OPT and LLaMA splits differ only by the records each one drops;
5. the first ``valid_size`` records are ``valid.jsonl``, the next ``test_size`` ``test.jsonl``,
   the rest ``train.jsonl``; ``stats.json`` records the counts, the drops and the settings.

Without a tokenizer no prompt is dropped for length: training skips (and counts) long prompts
itself, so one split serves every model family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from minillm.data.formats import Example, load_records, record_to_example
from minillm.data.instruct import render_prompt
from minillm.errors import UserError

DEFAULT_VALID_SIZE = 1000
DEFAULT_TEST_SIZE = 500
_TOKENIZE_CHUNK = 1024  # prompts tokenized per call: batched fast-tokenizer calls, bounded memory


def _to_record(ex: Example, raw: dict[str, Any]) -> dict[str, Any]:
    """The Dolly-shaped record written out (the category is kept when the source has one)."""
    rec: dict[str, Any] = {"instruction": ex.instruction, "context": ex.context, "response": ex.response}
    if isinstance(raw.get("category"), str):
        rec["category"] = raw["category"]
    return rec


def _read(source: str) -> tuple[list[tuple[Example, dict[str, Any]]], int, dict[str, int]]:
    """Usable (example, raw record) pairs in file order, the number read, and the drop counts."""
    kept: list[tuple[Example, dict[str, Any]]] = []
    dropped = {"empty_instruction": 0, "empty_response": 0}
    n_read = 0
    for where, raw in load_records(source, "train"):
        n_read += 1
        ex = record_to_example(raw, where)
        if ex.messages is not None:
            raise UserError(f"{where}: a chat ('messages') record; `prepare dolly` expects Dolly records with 'instruction' and 'response'")
        if not ex.instruction.strip():
            dropped["empty_instruction"] += 1
        elif ex.response is None or not ex.response.strip():
            dropped["empty_response"] += 1
        else:
            kept.append((ex, raw))
    if n_read == 0:
        raise UserError(f"{source}: no records found")
    return kept, n_read, dropped


def _prompt_lengths(examples: list[Example], tokenizer: Any) -> list[int]:
    """Token count of each alpaca prompt, with the special tokens training adds (e.g. LLaMA's BOS)."""
    lengths: list[int] = []
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        texts = [render_prompt(ex, "alpaca") for ex in examples[start : start + _TOKENIZE_CHUNK]]
        lengths.extend(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    return lengths


def _load_tokenizer(path: str) -> Any:
    from minillm.config import ModelConfig
    from minillm.models import load_tokenizer

    try:
        return load_tokenizer(ModelConfig(path=path), "tokenizer")
    except UserError as e:
        # load_tokenizer names a config key; here the value came from the --tokenizer option
        raise UserError(f"--tokenizer: {str(e).split(': ', 1)[-1]}") from None


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write atomically: a crash never leaves a half-written split behind."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prepare_dolly(
    source: str,
    out: Path,
    tokenizer: str | None = None,
    max_prompt_len: int = 256,
    seed: int = 10,
    valid_size: int = DEFAULT_VALID_SIZE,
    test_size: int = DEFAULT_TEST_SIZE,
) -> dict[str, Path]:
    """Split raw Dolly into ``out``/{train,valid,test}.jsonl and ``out``/stats.json.

    Args:
        source: a JSON/JSONL file, a saved ``datasets`` folder or a Hub dataset id.
        out: output folder (created; existing split files are replaced).
        tokenizer: a tokenizer (Hub id, folder or .gguf) used to drop prompts over
            ``max_prompt_len`` tokens under the alpaca template; ``None`` keeps every prompt.
        max_prompt_len: the paper's prompt budget (256 tokens).
        seed: shuffling seed (the reference scripts use 10).
        valid_size: records held out for validation (reference: 1,000).
        test_size: records held out for testing (the paper's DollyEval: 500).

    Returns:
        ``{"train": path, "valid": path, "test": path, "stats": path}``.
    """
    if valid_size < 1 or test_size < 1:
        raise UserError(f"--valid-size / --test-size: must be at least 1 (got {valid_size} and {test_size})")
    if max_prompt_len < 1:
        raise UserError(f"--max-prompt-len: must be positive (got {max_prompt_len})")
    pairs, n_read, dropped = _read(source)

    order = np.random.default_rng(seed).permutation(len(pairs))
    pairs = [pairs[i] for i in order]

    dropped["long_prompt"] = 0
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer)
        lengths = _prompt_lengths([ex for ex, _ in pairs], tok)
        dropped["long_prompt"] = sum(n > max_prompt_len for n in lengths)
        pairs = [p for p, n in zip(pairs, lengths) if n <= max_prompt_len]

    need = valid_size + test_size + 1
    if len(pairs) < need:
        raise UserError(
            f"{source}: {len(pairs)} usable records of {n_read} read (dropped: {dropped['empty_instruction']} empty "
            f"instructions, {dropped['empty_response']} empty responses, {dropped['long_prompt']} prompts over "
            f"{max_prompt_len} tokens); {valid_size} valid + {test_size} test + at least 1 train needs {need}. "
            f"Pass smaller --valid-size / --test-size (e.g. --valid-size {max(1, len(pairs) // 10)} "
            f"--test-size {max(1, len(pairs) // 10)})"
        )
    records = [_to_record(ex, raw) for ex, raw in pairs]
    splits = {
        "valid": records[:valid_size],
        "test": records[valid_size : valid_size + test_size],
        "train": records[valid_size + test_size :],
    }

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in ("train", "valid", "test"):
        paths[name] = out / f"{name}.jsonl"
        _write_jsonl(paths[name], splits[name])
    stats = {
        "source": str(source),
        "read": n_read,
        "dropped": dropped,
        "counts": {name: len(splits[name]) for name in ("train", "valid", "test")},
        "seed": seed,
        "tokenizer": tokenizer,
        "max_prompt_len": max_prompt_len if tokenizer is not None else None,
        "template": "alpaca",
    }
    paths["stats"] = out / "stats.json"
    paths["stats"].write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return paths
