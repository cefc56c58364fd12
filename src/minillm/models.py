"""Load teacher and student through transformers' public API; check they share a vocabulary.

A model path is a Hugging Face Hub id, a local folder, or a ``.gguf`` file (loaded with
``gguf_file=``, which needs the ``gguf`` package). Embedding matrices may be padded to different
sizes (Qwen2.5: 151936 vs 152064 rows); only the tokenizer's real vocabulary is compared, and
logits are cut to it (:func:`vocab_logits`) before any loss or sampling.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minillm.config import Config, ModelConfig
from minillm.distributed import Dist
from minillm.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda was asked for but no CUDA device is visible; use train.device=cpu")
    return dev


def resolve_dtype(name: str, device: torch.device, role: str) -> torch.dtype:
    """``auto``: float32 on CPU; on CUDA bf16 for a frozen teacher, float32 for a trained student
    (its forward runs under bf16 autocast, see :func:`autocast_dtype`)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and role == "teacher":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast_dtype(train_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the student's forward, or None to run in the weights' dtype."""
    if device.type != "cuda":
        return None
    if train_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if train_dtype == "float32" else _DTYPES[train_dtype]


def split_gguf(path: str) -> tuple[str, dict[str, Any]]:
    """A ``.gguf`` path -> (its folder, ``{"gguf_file": name}``); any other path -> (path, {})."""
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"{path}: GGUF file not found")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError(f"{path}: loading a .gguf file needs the 'gguf' package: pip install 'minillm[gguf]'") from None
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def _gguf_dequantize() -> dict[str, Any]:
    """Ask for a GGUF file's weights unpacked to plain float tensors. transformers >= 5 may otherwise
    keep them packed behind a quantizer, and such a model can be neither trained nor saved."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always dequantises GGUF weights
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_tokenizer(cfg: ModelConfig, key: str) -> Any:
    """The tokenizer of a model; a pad token is added as EOS when the tokenizer has none."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    if source is None:
        raise UserError(f"{key}.path: is required")
    where, extra = split_gguf(source)
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}.path: could not load a tokenizer from {source!r} ({_short(e)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"{key}.path: the tokenizer of {source!r} has no EOS token; responses could never end")
    return tok


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def load_model(cfg: ModelConfig, key: str, device: torch.device, role: str) -> Any:
    """An ``AutoModelForCausalLM`` on ``device``; a teacher comes frozen in eval mode."""
    from transformers import AutoModelForCausalLM

    if cfg.path is None:
        raise UserError(f"{key}.path: is required")
    where, extra = split_gguf(cfg.path)
    if extra:
        extra.update(_gguf_dequantize())
    dtype = resolve_dtype(cfg.dtype, device, role)
    if extra and not Path(where).exists():
        raise UserError(f"{key}.path: {cfg.path} not found")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **extra
        )
    except (OSError, ValueError) as e:
        hint = "" if os.path.exists(where) else " (not a local folder; Hub ids need network access)"
        raise UserError(f"{key}.path: could not load a causal LM from {cfg.path!r}{hint}: {_short(e)}") from None
    if cfg.adapter is not None:
        from minillm.lora import merge_adapter

        model = merge_adapter(model, cfg.adapter, key)
    model.to(device)
    if role == "teacher":
        model.eval()
        model.requires_grad_(False)
    return model


# --- checks before anything loads (called by minillm.preflight.check_paths) --------------------

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx")


_MODEL_FILES = ("config.json", "adapter_config.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "config.json")


def check_model_source(source: str, key: str, revision: str | None = None, tokenizer: bool = False) -> None:
    """Refuse at once a model (or ``tokenizer``) path that cannot load: a missing ``.gguf`` file, a
    folder without one in it, or a missing folder that is not a Hub id that can be reached now
    (asked once, without transformers' retries)."""
    from minillm.hub import check_hub_id

    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"{key}: {source}: GGUF file not found")
        return
    if p.is_dir():
        wanted = _TOKENIZER_FILES if tokenizer else _MODEL_FILES
        if not any((p / f).is_file() for f in wanted):
            what = "a tokenizer (tokenizer_config.json)" if tokenizer else "a model (config.json)"
            raise UserError(f"{key}: {source}: a folder without {what}; point it at a saved model "
                            "(a run's best/ or final/ folder, or one written by save_pretrained)")
        return
    if p.exists():
        raise UserError(f"{key}: {source}: a file; give a model folder, a .gguf file or a Hub id")
    check_hub_id(source, key, "model", revision)


def model_context(config: Any) -> tuple[int, str] | None:
    """(the longest sequence the model's positions cover, the config field saying so), or None
    when the config names no such limit."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _CONTEXT_KEYS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def check_context(cfg: ModelConfig, key: str, max_len: int) -> None:
    """Refuse a model whose context is shorter than ``data.max_len`` (GPT-2 would fail deep inside
    its position embedding; rotary models would silently run past what they were trained on).
    Reads only the model's config, before any weights load."""
    from transformers import AutoConfig

    where, extra = split_gguf(cfg.path or "")
    try:
        config = AutoConfig.from_pretrained(where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: could not read the model config of {cfg.path!r}: {_short(e)}") from None
    found = model_context(config)
    if found is not None and found[0] < max_len:
        n, name = found
        raise UserError(f"data.max_len: {max_len} tokens is longer than the context of {key} {cfg.path!r} ({n} tokens, "
                        f"config {name}); set data.max_len to at most {n} (with data.max_prompt_len below it) or pick a model "
                        "with a longer context")


def check_same_vocabulary(student_tok: Any, teacher_tok: Any) -> int:
    """Refuse a pair whose tokenizers differ; return the size of the shared real vocabulary."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = len(set(sv.items()) - set(tv.items()))
        only_t = len(set(tv.items()) - set(sv.items()))
        raise UserError(
            f"teacher.path / student.path: the tokenizers differ ({len(sv)} vs {len(tv)} tokens; {only_s} ids only in the "
            f"student's, {only_t} only in the teacher's). MiniLLM compares distributions token by token, so both models "
            "must share one tokenizer; pick a student from the teacher's family"
        )
    return len(sv)


def vocab_logits(logits_BTV: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cut padded embedding rows off the logits, keeping the tokenizer's real vocabulary."""
    return logits_BTV if logits_BTV.shape[-1] == vocab_size else logits_BTV[..., :vocab_size]


@dataclass
class Models:
    """The models of a run. ``vocab_size`` is the real vocabulary shared by both tokenizers."""

    student: Any
    teacher: Any | None
    tokenizer: Any
    vocab_size: int
    device: torch.device
    dist: Dist = field(default_factory=Dist)  # this process's rank in the run (a world of one by default)


def load_models(cfg: Config, need_teacher: bool, device: torch.device | None = None) -> Models:
    """Load the student (and the teacher when the method needs one) and check the pair; on
    ``device`` when given (a distributed run stages models in host memory), else on ``train.device``."""
    device = device or resolve_device(cfg.train.device)
    tok = load_tokenizer(cfg.student, "student")
    vocab = len(tok.get_vocab())
    teacher = None
    if need_teacher:
        if cfg.teacher.path is None:
            raise UserError(f"teacher.path: is required by method {cfg.method!r}")
        vocab = check_same_vocabulary(tok, load_tokenizer(cfg.teacher, "teacher"))
        teacher = load_model(cfg.teacher, "teacher", device, "teacher")
    student = load_model(cfg.student, "student", device, "student")
    for name, m in (("student", student), ("teacher", teacher)):
        if m is not None and m.get_output_embeddings().weight.shape[0] < vocab:
            raise UserError(f"{name}.path: the model's output layer has fewer rows than the tokenizer has tokens")
    return Models(student, teacher, tok, vocab, device)


def save_student(model: Any, tokenizer: Any, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save in Hugging Face format (safetensors + tokenizer), written to a temp folder then renamed;
    ``state_dict`` (e.g. gathered from a sharded model) replaces the model's own."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    write_folder(out, write)


def write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Fill folder ``out`` through ``write(tmp)`` on a temp folder, then swap it in: a reader sees
    the old folder or the new one, never half of one (:func:`minillm.atomic.replace_folder_atomic`)."""
    from minillm.atomic import replace_folder_atomic

    replace_folder_atomic(out, write)
