"""Checks at the top of ``train``, ``eval`` and ``generate``, before any model loads.

:func:`check_paths` looks at every path the command will read: data files and Hub datasets, the
pre-training corpus, test sets, the calibration file, model folders, GGUF files, Hub model ids
(one request each, no retries; none with ``HF_HUB_OFFLINE`` set) and tokenizer paths; then it
reads each model's config (not its weights) and refuses a model whose context is shorter than
``data.max_len``. So a typo in the last path of a config costs a second, not two model loads.
"""

from __future__ import annotations

from pathlib import Path

from minillm.config import TEACHER_METHODS, Config, ModelConfig
from minillm.data.records import check_data_source
from minillm.errors import UserError
from minillm.models import check_context, check_model_source

COMMANDS = ("train", "eval", "generate")


def _models(cfg: Config, command: str, model: str) -> list[tuple[str, ModelConfig]]:
    """(the config key of its path, model) for every model the command loads."""
    if command == "train":
        return [("student.path", cfg.student)] + ([("teacher.path", cfg.teacher)] if cfg.method in TEACHER_METHODS else [])
    if command == "generate":
        return [(f"{model}.path", cfg.teacher if model == "teacher" else cfg.student)]
    out = [(f"eval.models.{name}", ModelConfig(path=path, trust_remote_code=cfg.student.trust_remote_code))
           for name, path in cfg.eval.models.items()]
    return out + ([("teacher.path", cfg.teacher)] if cfg.eval.exposure_bias else [])


def _data(cfg: Config, command: str) -> list[tuple[str, str | None]]:
    if command == "eval":
        return [(f"eval.test.{name}", path) for name, path in cfg.eval.test.items()]
    return [("data.train", cfg.data.train), ("data.valid", cfg.data.valid)]


def check_paths(cfg: Config, command: str = "train", model: str = "teacher") -> None:
    """Raise a :class:`UserError` naming the key of the first path ``command`` cannot use.

    ``model``: the model ``generate`` samples from (teacher or student)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")  # a caller's bug, not user input
    for key, source in _data(cfg, command):
        if source is not None:
            check_data_source(source, key)
    files = [("data.pretrain", cfg.data.pretrain)] if command == "train" else []
    files += [("eval.calibration", cfg.eval.calibration)] if command == "eval" else []
    for key, file in files:
        if file is not None and not Path(file).is_file():
            raise UserError(f"{key}: {file}: file not found")
    out_key, out = {"train": ("output_dir", cfg.output_dir), "eval": ("eval.out", cfg.eval.out)}.get(command, ("", None))
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"{out_key}: {out} is a file; give a folder for the outputs")
    models = [(key, m) for key, m in _models(cfg, command, model) if m.path is not None]
    for key, m in models:
        check_model_source(m.path, key, m.revision)  # type: ignore[arg-type]
        if m.tokenizer is not None:
            check_model_source(m.tokenizer, key.replace(".path", ".tokenizer"), m.revision, tokenizer=True)
        if m.adapter is not None and not (Path(m.adapter) / "adapter_config.json").is_file():
            raise UserError(f"{key.replace('.path', '.adapter')}: {m.adapter}: no adapter_config.json there; give the "
                            "folder a PEFT LoRA adapter was saved in (save_pretrained)")
    if command == "eval" and cfg.eval.judge is not None and not cfg.eval.judge.startswith("openai:"):
        check_model_source(cfg.eval.judge, "eval.judge")
    for key, m in models:
        check_context(m, key, cfg.data.max_len)
