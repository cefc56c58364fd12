"""Build a student from a teacher by keeping N evenly spaced decoder layers (layer dropping).

The student keeps the teacher's width, vocabulary, embeddings, final norm and LM head, and N of its
L decoder layers, copied unchanged. Which layers (``kept_layers``): with half-up rounding,

    keep_j = round(j * (L - 1) / (N - 1)),   j = 0 .. N - 1       (N >= 2)

so the first (0) and the last (L - 1) layer are always kept and the gaps between kept layers differ
by at most one; N = 1 keeps layer 0 only. Since (L - 1) / (N - 1) >= 1 when N <= L, the indices are
strictly increasing and so distinct. Example: L = 30, N = 6 -> [0, 6, 12, 17, 23, 29].

Per-layer config lists (``layer_types`` of Qwen2 / Gemma-style configs, any ``*layer*`` list of
length L) are cut to the kept layers, and Qwen2's ``max_window_layers`` (layers below it use full
attention) becomes the number of kept layers below it, so every kept layer keeps its attention kind.

Supported: the Llama / Mistral / Qwen2 / Qwen3 family (``model.model.layers``) and GPT-2
(``model.transformer.h``). The result is saved in Hugging Face format (safetensors) with the
teacher's tokenizer and generation config, plus ``minillm_init.json`` recording the kept layers.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from minillm.config import ModelConfig
from minillm.errors import UserError
from minillm.models import load_model, save_student, split_gguf

log = logging.getLogger("minillm")

# model_type -> dotted path of the decoder-layer ModuleList inside the *ForCausalLM model
LAYER_LISTS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gpt2": "transformer.h",
}
RECORD = "minillm_init.json"


def kept_layers(n_teacher: int, n_student: int) -> list[int]:
    """Indices of the ``n_student`` teacher layers to keep: round(j (L-1) / (N-1)), half up.

    Exact integer arithmetic: floor((2 j (L-1) + (N-1)) / (2 (N-1))).
    """
    L, N = n_teacher, n_student
    if not 1 <= N <= L:
        raise ValueError(f"need 1 <= n_student <= n_teacher, got {N} and {L}")
    if N == 1:
        return [0]
    return [(2 * j * (L - 1) + (N - 1)) // (2 * (N - 1)) for j in range(N)]


def _load_config(source: str) -> Any:
    from transformers import AutoConfig

    where, extra = split_gguf(source)
    try:
        return AutoConfig.from_pretrained(where, **extra)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"--from: could not read a model config from {source!r}: {first}") from None


def _load_tokenizer(source: str) -> Any:
    """The teacher's tokenizer as stored (no pad token added: the student gets the same files)."""
    from transformers import AutoTokenizer

    where, extra = split_gguf(source)
    try:
        return AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"--from: could not load a tokenizer from {source!r}: {str(e).strip()[:300]}") from None


def _check_teacher(config: Any, source: str, layers: int) -> tuple[str, int]:
    """Refuse unsupported architectures and N outside 1..L; return (model_type, L)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYER_LISTS:
        archs = ", ".join(getattr(config, "architectures", None) or ["?"])
        raise UserError(f"--from: {source} is a {model_type!r} model ({archs}); init-student supports {', '.join(sorted(LAYER_LISTS))}")
    L = int(config.num_hidden_layers)
    if not 1 <= layers <= L:
        raise UserError(f"--layers: must lie in 1..{L} (the teacher's decoder layers), got {layers}")
    return model_type, L


def student_config(teacher_config: Any, keep: list[int]) -> Any:
    """A copy of the teacher's config describing ``len(keep)`` layers (per-layer lists cut to ``keep``)."""
    cfg = copy.deepcopy(teacher_config)
    L = teacher_config.num_hidden_layers
    for key, value in teacher_config.to_dict().items():
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == L:
            setattr(cfg, key, [value[i] for i in keep])
    mwl = getattr(teacher_config, "max_window_layers", None)
    if isinstance(mwl, int):
        cfg.max_window_layers = sum(i < mwl for i in keep)
    cfg.num_hidden_layers = len(keep)  # GPT-2 maps it onto n_layer
    if hasattr(cfg, "quantization_config"):  # a GGUF teacher was dequantised; the student is plain floats
        del cfg.quantization_config
    return cfg


def student_state_dict(teacher_state: dict[str, torch.Tensor], prefix: str, keep: list[int]) -> dict[str, torch.Tensor]:
    """Teacher tensors renamed for the student: ``{prefix}.{keep[j]}.*`` -> ``{prefix}.{j}.*``;
    tensors outside the layer list (embeddings, final norm, LM head) are kept as they are."""
    new_index = {old: new for new, old in enumerate(keep)}
    head = prefix + "."
    out: dict[str, torch.Tensor] = {}
    for name, tensor in teacher_state.items():
        if name.startswith(head):
            idx, rest = name[len(head) :].split(".", 1)
            if int(idx) in new_index:
                out[f"{head}{new_index[int(idx)]}.{rest}"] = tensor
        else:
            out[name] = tensor
    return out


def init_student(source: str, layers: int, out: Path) -> Path:
    """Load the teacher ``source`` (folder, Hub id or ``.gguf`` file), keep ``layers`` evenly spaced
    decoder layers (:func:`kept_layers`) and save the student in ``out``; return ``out``."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    teacher_dir = Path(split_gguf(source)[0])  # a GGUF file's folder, or the teacher's own folder
    if teacher_dir.exists() and out.resolve() == teacher_dir.resolve():
        raise UserError(f"--out: {out} would overwrite the teacher {source}; pick another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORD).exists())):
        raise UserError(f"--out: {out} exists and is not a student made by init-student; pick a new or empty folder")

    # check the architecture and N before loading a big teacher's weights; a GGUF file's config costs a
    # full parse of its metadata (seconds), so it is checked on the loaded model instead
    is_gguf = Path(source).suffix == ".gguf"
    if not is_gguf:
        _check_teacher(_load_config(source), source, layers)
    teacher = load_model(ModelConfig(path=source, dtype="float32"), "--from", torch.device("cpu"), "teacher")
    model_type, L = _check_teacher(teacher.config, source, layers)
    keep = kept_layers(L, layers)
    tokenizer = _load_tokenizer(source)
    prefix = LAYER_LISTS[model_type]
    s_cfg = student_config(teacher.config, keep)
    student = AutoModelForCausalLM.from_config(s_cfg, dtype=torch.float32)
    state = student_state_dict(teacher.state_dict(), prefix, keep)
    # strict: every student tensor must come from the teacher, and nothing may be left over
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    del teacher, state
    save_student(student, tokenizer, out)
    record = {"teacher": source, "teacher_layers": L, "kept_layers": keep, "model_type": model_type}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    n_params = sum(p.numel() for p in student.parameters())
    log.info("student: %d of %d layers %s, %.1fM parameters -> %s", layers, L, keep, n_params / 1e6, out)
    return out
