"""``minillm export RUN_DIR --out DIR``: a training checkpoint as a Hugging Face model folder.

It reads the run's newest checkpoint (or ``--step N``, or a checkpoint folder given as RUN_DIR) in
either of its forms (:mod:`minillm.checkpoint`): a distributed checkpoint written by any number of
ranks is consolidated in this one process, on CPU. DIR gets the student as safetensors + tokenizer,
loadable with ``AutoModelForCausalLM.from_pretrained`` or by vLLM; a LoRA student is merged
(W + s B A) and its adapter also written to ``DIR/adapter``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from minillm.checkpoint import DCP_DIR, Checkpointer, load_distributed, load_model_folder
from minillm.config import load_config
from minillm.errors import UserError
from minillm.lora import add_lora
from minillm.models import load_model
from minillm.parallel import save_hf

log = logging.getLogger("minillm")


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint folder to export: ``run_dir`` itself when it is one, else the newest intact
    one (or step ``step``) under ``run_dir/checkpoints``."""
    if (run_dir / "trainer_state.json").is_file() or (run_dir / "trainer_state.pt").is_file():
        return run_dir
    ckpter = Checkpointer(run_dir / "checkpoints", 1)
    ckpts = ckpter.all()
    if step is not None:
        ckpts = [c for c in ckpts if c.name == f"step_{step:08d}"]
    elif ckpts:  # the newest one that passes its manifest check (a damaged one is skipped, with a warning)
        latest = ckpter.latest_intact(set_aside=False)
        ckpts = [latest] if latest is not None else []
    if not ckpts:
        which = f"checkpoint of step {step}" if step is not None else "checkpoint"
        raise UserError(f"{run_dir}: no {which} here (expected RUN_DIR/checkpoints/step_N/ from `minillm train`)")
    return ckpts[-1]


def export(run_dir: Path, out: Path, step: int | None = None) -> Path:
    """Write the student of ``run_dir``'s checkpoint to ``out`` in Hugging Face format; return ``out``."""
    from transformers import AutoTokenizer

    run_dir, out = Path(run_dir), Path(out)
    ckpt = find_checkpoint(run_dir, step)
    config_path = ckpt.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; export needs the run's config.yaml next to its checkpoints/ folder")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UserError(f"{out}: exists and is not a model folder; pick another --out")
    cfg = load_config(config_path)
    student = load_model(cfg.student, "student", torch.device("cpu"), "student")  # the architecture (and a LoRA student's frozen base)
    if cfg.student.lora.r > 0:
        student = add_lora(student, cfg.student.lora)
    if (ckpt / DCP_DIR).is_dir():
        load_distributed(student, None, ckpt / DCP_DIR)
    else:
        load_model_folder(student, ckpt / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "model"))
    save_hf(student, tokenizer, out, student.state_dict())
    log.info("exported %s (%s) to %s", ckpt, "distributed checkpoint" if (ckpt / DCP_DIR).is_dir() else "one-process checkpoint", out)
    return out
