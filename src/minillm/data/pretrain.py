"""The general-text corpus for the pre-training loss L_PT, streamed and packed into fixed blocks.

A ``.txt`` file gives one document per line (blank lines skipped); a ``.jsonl`` file one document per
record under ``text_key``. Documents are tokenized as they are read, joined with EOS and cut into
blocks of ``block_len`` tokens, so the corpus is never loaded whole. The stream's state is the
number of blocks handed out: a resumed run skips exactly those and continues with the same blocks.
At the end of the file the stream starts the next pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minillm.errors import UserError


class PretrainStream:
    """Packed LM blocks from a text corpus; ``next_batch(B)`` -> ``input_ids`` ``(B, block_len)``."""

    def __init__(self, path: str, tokenizer: Any, block_len: int, text_key: str = "text") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"data.pretrain: {self.path} not found (a .txt or .jsonl corpus)")
        self.tokenizer, self.block_len, self.text_key = tokenizer, block_len, text_key
        self.blocks_served = 0
        self._it = self._blocks()

    def _documents(self) -> Iterator[str]:
        jsonl = self.path.suffix in (".jsonl", ".json")
        with self.path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if not jsonl:
                    yield line.rstrip("\n")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{self.path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(self.text_key), str):
                    raise UserError(f"{self.path}:{lineno}: expected an object with a string field {self.text_key!r} (data.pretrain_text_key)")
                yield rec[self.text_key]

    def _blocks(self) -> Iterator[list[int]]:
        eos = self.tokenizer.eos_token_id
        buf: list[int] = []
        passes_without_block = 0
        while True:
            produced = False
            for doc in self._documents():
                buf.extend(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
                if eos is not None:
                    buf.append(eos)
                while len(buf) >= self.block_len:
                    yield buf[: self.block_len]
                    buf = buf[self.block_len :]
                    produced = True
            if not produced:
                passes_without_block += 1
                if passes_without_block > 1 or not buf:
                    raise UserError(f"data.pretrain: {self.path} holds fewer than {self.block_len} tokens; add text or lower data.max_len")

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The next ``batch_size`` blocks as an LM batch with ``pt_``-prefixed keys."""
        rows = [next(self._it) for _ in range(batch_size)]
        self.blocks_served += batch_size
        ids = torch.tensor(rows, dtype=torch.long)
        return {
            "pt_input_ids": ids,
            "pt_targets": ids[:, 1:].clone(),
            "pt_mask": torch.ones(ids.shape[0], ids.shape[1] - 1),
        }

    def state_dict(self) -> dict[str, int]:
        return {"blocks_served": self.blocks_served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._it = self._blocks()
        for _ in range(int(state["blocks_served"])):
            next(self._it)
        self.blocks_served = int(state["blocks_served"])
