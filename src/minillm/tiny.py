"""Small models and tokenizers built in-process: the demo's models and the tests' fixtures.

Nothing here downloads anything: the tokenizer is a word-level ``tokenizers`` model over a given
corpus, the models are randomly initialised transformers configs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIALS = ["<pad>", "<unk>", "<eos>"]
_WORD = re.compile(r"\w+|[^\w\s]+")  # the same split as the Whitespace pre-tokenizer


def build_word_tokenizer(texts: Iterable[str], extra_specials: Iterable[str] = ()) -> Any:
    """A word-level fast tokenizer (words and punctuation) whose vocabulary covers ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for s in [*SPECIALS, *extra_specials]:
        vocab.setdefault(s, len(vocab))
    for text in texts:
        for w in _WORD.findall(text):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_gpt2(tokenizer: Any, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_positions: int = 512, seed: int = 0) -> Any:
    """A randomly initialised GPT-2 sized for ``tokenizer`` (dropout off: tiny data needs none)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_pair(model: Any, tokenizer: Any, out: Path) -> Path:
    """Save a model and tokenizer in Hugging Face format."""
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
