"""The general-text corpus for the pre-training loss L_PT, streamed and packed into fixed blocks.

A ``.txt`` file gives one document per line (blank lines skipped); a ``.jsonl`` file one document per
record under ``text_key``. Documents are tokenized as they are read, joined with EOS and cut into
blocks of ``block_len`` tokens, so the corpus is never loaded whole. At the end of the file the
stream starts the next pass. The stream's state is where it stands in the file (byte offset, line)
and the tokens read but not yet served: a resumed run seeks there and continues with the same
blocks, without reading or tokenizing what came before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minillm.errors import UserError
from minillm.textio import decode_utf8, parse_json


class PretrainStream:
    """Packed LM blocks from a text corpus; ``next_batch(B)`` -> ``input_ids`` ``(B, block_len)``."""

    def __init__(self, path: str, tokenizer: Any, block_len: int, text_key: str = "text") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"data.pretrain: {self.path} not found (a .txt or .jsonl corpus)")
        self.tokenizer, self.block_len, self.text_key = tokenizer, block_len, text_key
        self.blocks_served = 0
        # where the stream stands after the last block served: next document's byte offset and line
        # number, and the tokens already read that no served block holds yet
        self._offset, self._line, self._buf = 0, 0, []
        self._it = self._blocks()

    def _documents(self, offset: int, line: int) -> Iterator[tuple[str, int, int]]:
        """(document, byte offset after it, its line number) from byte ``offset`` (line ``line``) on."""
        jsonl = self.path.suffix in (".jsonl", ".json")
        with self.path.open("rb") as fh:
            fh.seek(offset)
            for raw in iter(fh.readline, b""):
                offset += len(raw)
                line += 1
                text = decode_utf8(raw, self.path, line)
                if line == 1:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    continue
                if not jsonl:
                    yield text.rstrip("\r\n"), offset, line
                    continue
                rec = parse_json(text, f"{self.path}:{line}")
                if not isinstance(rec, dict) or not isinstance(rec.get(self.text_key), str):
                    raise UserError(f"{self.path}:{line}: expected an object with a string field {self.text_key!r} (data.pretrain_text_key)")
                yield rec[self.text_key], offset, line

    def _blocks(self) -> Iterator[list[int]]:
        eos = self.tokenizer.eos_token_id
        start, start_line, buf = self._offset, self._line, list(self._buf)
        passes_without_block = 0
        while True:
            produced, whole_pass = False, start == 0
            for doc, offset, line in self._documents(start, start_line):
                buf.extend(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
                if eos is not None:
                    buf.append(eos)
                while len(buf) >= self.block_len:
                    block, buf = buf[: self.block_len], buf[self.block_len :]
                    self._offset, self._line, self._buf = offset, line, buf
                    produced = True
                    yield block
            start, start_line = 0, 0  # the next pass
            if produced:
                passes_without_block = 0
            elif whole_pass:  # two whole passes in a row without a block: the corpus is too small
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

    def state_dict(self) -> dict[str, Any]:
        return {"blocks_served": self.blocks_served, "offset": self._offset, "line": self._line, "buf": list(self._buf)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.blocks_served = int(state["blocks_served"])
        self._offset, self._line, self._buf = int(state["offset"]), int(state["line"]), list(state["buf"])
        self._it = self._blocks()
