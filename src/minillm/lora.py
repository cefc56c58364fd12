"""LoRA through ``peft``: a student that trains low-rank adapters instead of its weights, and a
model given as a LoRA adapter on a base model.

A LoRA layer computes W x + s B A x with the base weight W frozen, A ``(r, in)`` and B ``(out, r)``
trained, and s = alpha / r (Hu et al. 2021). Saving writes both forms: the merged weights
W + s B A (a plain Hugging Face model: any tool loads it) and the adapter (A, B and peft's
``adapter_config.json``; small, and loadable on the base with ``PeftModel.from_pretrained``).

The merge works on state dicts, so it runs the same on a whole model and on the full state dict
gathered from an FSDP-sharded one, and it never touches the training weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from minillm.config import LoraConfig
from minillm.errors import UserError

ADAPTER = "default"  # peft's name for the one adapter a model carries
ADAPTER_FILE = "adapter_model.safetensors"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UserError("student.lora / adapter: LoRA needs the 'peft' package: pip install 'minillm[lora]'") from None
    return peft


def is_lora(model: Any) -> bool:
    """Whether ``model`` is a peft model (carries adapters)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def add_lora(model: Any, cfg: LoraConfig) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (B = 0: the model's function is unchanged) and freeze
    every base weight. Only linear layers are adapted."""
    peft = _peft()
    targets = list(cfg.target_modules) or None
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"student.lora.target_modules: {str(e).splitlines()[0][:300]}") from None
    for name, m in _lora_layers(wrapped):
        if not hasattr(m, "lora_A") or ADAPTER not in m.lora_A:
            raise UserError(f"student.lora.target_modules: {name} is not a linear layer; adapt linear layers only "
                            "(e.g. q_proj, v_proj, or c_attn for GPT-2)")
    return wrapped


def merge_adapter(model: Any, adapter: str, key: str) -> Any:
    """``model`` with the LoRA adapter folder ``adapter`` merged into its weights (a plain model again)."""
    peft = _peft()
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{key}.adapter: {adapter} holds no adapter_config.json (a folder written by peft's save_pretrained)")
    try:
        wrapped = peft.PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{key}.adapter: could not apply {adapter} to {key}.path ({str(e).splitlines()[0][:300]})") from None
    return wrapped.merge_and_unload()


def _lora_layers(model: Any) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merged_state_dict(model: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict (Hugging Face names) with every adapter merged: W + s B A.

    ``state_dict`` is the peft model's (its own, or the full one gathered from shards); the layers'
    scaling and orientation (GPT-2's Conv1D stores W transposed) come from ``model``'s modules."""
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if ".lora_" in k:
            continue
        out[k.removeprefix(prefix).replace(".base_layer.", ".")] = v
    for name, m in _lora_layers(model):
        a, b = state_dict[f"{name}.lora_A.{ADAPTER}.weight"], state_dict[f"{name}.lora_B.{ADAPTER}.weight"]
        delta = (b.double() @ a.double()) * m.scaling[ADAPTER]
        if m.fan_in_fan_out:
            delta = delta.T
        key = f"{name.removeprefix(prefix)}.weight"
        out[key] = (out[key].double() + delta).to(out[key].dtype)
    return out


def save_adapter(model: Any, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """Write the adapter (peft's file names and format) from ``state_dict``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    model.peft_config[ADAPTER].save_pretrained(str(folder))


def load_adapter_weights(model: Any, folder: Path) -> None:
    """Load an adapter written by :func:`save_adapter` into ``model``'s adapters."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / ADAPTER_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {ADAPTER_FILE}: this checkpoint holds no LoRA adapter (was student.lora.r set?)")
    result = set_peft_model_state_dict(model, load_file(str(path)), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{folder}: the adapter does not fit the student (unexpected {unexpected[:3]}); "
                        "student.lora must match the run that wrote it")

