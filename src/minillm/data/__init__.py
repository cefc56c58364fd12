"""Data for a run: instruction examples (train / valid), their token ids, and the L_PT corpus."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from minillm.config import Config
from minillm.data.formats import Example, read_examples
from minillm.data.instruct import Encoded, EncodeStats, encode_examples
from minillm.data.pretrain import PretrainStream
from minillm.errors import UserError

log = logging.getLogger("minillm")

__all__ = ["Example", "Encoded", "RunData", "load_run_data", "read_examples", "split_examples"]


@dataclass
class RunData:
    train_examples: list[Example]
    train: list[Encoded]
    valid_examples: list[Example]
    valid: list[Encoded]
    pretrain: PretrainStream | None
    stats: dict[str, EncodeStats]


def split_examples(cfg: Config) -> tuple[list[Example], list[Example]]:
    """The run's (train, valid) examples: ``data.valid``, else ``data.valid_split``, else the tail of ``data.train``."""
    d = cfg.data
    if d.train is None:
        raise UserError("data.train: is required")
    train_ex = read_examples(d.train, d.split, d.columns, d.format)
    if d.valid is not None:
        valid_ex = read_examples(d.valid, d.valid_split or d.split, d.columns, d.format)
    elif d.valid_split is not None:
        valid_ex = read_examples(d.train, d.valid_split, d.columns, d.format)
    else:
        if len(train_ex) < 2:
            raise UserError(f"data.train: {d.train} has {len(train_ex)} example(s); too few to hold out validation (set data.valid)")
        n_valid = min(d.valid_size, max(1, len(train_ex) // 10))
        valid_ex, train_ex = train_ex[-n_valid:], train_ex[:-n_valid]
    return train_ex, valid_ex


def log_drops(cfg: Config, s_train: EncodeStats, s_valid: EncodeStats) -> None:
    """One line per data file: how many examples it gave, how many were used, and why the rest
    were dropped (or their responses cut)."""
    d = cfg.data
    per_file: dict[str, EncodeStats] = {}
    for source, s in ((d.train, s_train), (d.valid or d.train, s_valid)):
        per_file[str(source)] = per_file[str(source)] + s if str(source) in per_file else s
    for source, s in per_file.items():
        reasons = s.reasons(d.max_prompt_len, d.max_len)
        dropped = s.seen - s.kept
        line = f"{source}: {s.seen} examples, {s.kept} used" + (f"; {'; '.join(reasons)}" if reasons else "")
        (log.warning if dropped else log.info)("%s", line)


def load_run_data(cfg: Config, tokenizer: Any) -> RunData:
    """Read, split and tokenize the run's data with the paper's length rules."""
    d = cfg.data
    train_ex, valid_ex = split_examples(cfg)
    enc = dict(tokenizer=tokenizer, template=d.template, max_prompt_len=d.max_prompt_len, max_len=d.max_len)
    train, s_train = encode_examples(train_ex, **enc)
    valid, s_valid = encode_examples(valid_ex, **enc)
    if not train:
        why = "; ".join(s_train.reasons(d.max_prompt_len, d.max_len)) or "no examples"
        raise UserError(f"data.train: no usable example in {d.train}: {why}")
    if d.max_examples is not None:
        train = train[: d.max_examples]
    log_drops(cfg, s_train, s_valid)
    pretrain = None
    if d.pretrain is not None:
        pretrain = PretrainStream(d.pretrain, tokenizer, d.max_len, d.pretrain_text_key)
    return RunData(train_ex, train, valid_ex, valid, pretrain, {"train": s_train, "valid": s_valid})
