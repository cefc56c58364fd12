"""Where the models of a training run live: LoRA adapters, activation checkpointing, FSDP2 sharding,
and the saves that gather a sharded student.

``train.parallel``:

* ``ddp``: every rank holds the whole student; after the step's micro-batches the gradients are
  summed over ranks (:meth:`minillm.distributed.Dist.sum_gradients`);
* ``fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every transformer block and on the
  root: parameters, gradients and AdamW state are sharded over the ranks; a block's weights are
  all-gathered for its forward and backward (in the compute dtype: bf16 on GPU, with float32 master
  weights and float32 gradient reduction) and freed after.

``train.teacher_sharding`` places the frozen teacher: whole on each rank, or FSDP2-sharded the same
way (no gradients, weights in ``teacher.dtype``) so a teacher larger than one GPU fits. ``auto``
keeps it whole when its weights take under 40% of one GPU. The log says which.

During a no-grad phase (rollouts, scoring, validation) a sharded student is held gathered
(:func:`gathered`): one all-gather at the start instead of one per layer per decoded token, and no
collective inside, so ranks may decode different lengths. A sharded teacher cannot be gathered (it
may not fit one GPU): its ranks decode in lockstep (``Dist.lockstep``), and the static-cache / CUDA
graph engine, which cannot run FSDP's per-layer all-gathers inside a captured graph, gives way to
the plain loop (:func:`decoding_config` logs that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minillm.config import Config, ModelConfig
from minillm.distributed import Dist
from minillm.errors import UserError
from minillm.lora import add_lora, is_lora, merged_state_dict, save_adapter
from minillm.models import (
    Models,
    autocast_dtype,
    load_models,
    resolve_device,
    resolve_dtype,
    split_gguf,
    write_folder,
)

log = logging.getLogger("minillm")
WHOLE_TEACHER_SHARE = 0.4  # auto: a teacher stays whole on each rank when its weights take under this share of one GPU


def load_placed_models(cfg: Config, need_teacher: bool, dist: Dist) -> Models:
    """Load the run's models, add the student's LoRA adapters and activation checkpointing, and
    place both models as ``train.parallel`` and ``train.teacher_sharding`` say (logged)."""
    device = dist.device or resolve_device(cfg.train.device)
    autocast = autocast_dtype(cfg.train.dtype, device)
    if cfg.train.parallel == "fsdp" and autocast == torch.float16:
        raise UserError("train.parallel: fsdp with float16 autocast is not supported (its loss scaling would need every "
                        "rank's overflow check); use train.dtype=bfloat16, or train.parallel=ddp")
    layout = teacher_layout(cfg, device, dist) if need_teacher else "none"
    dist.same_everywhere(layout, "train.teacher_sharding")
    sharding = cfg.train.parallel == "fsdp" or layout == "shard"
    mesh = None
    if sharding:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.world,))
    staged = dist.world > 1 and device.type == "cuda"  # through host memory: a model to shard never lands whole on one GPU

    def load_and_place() -> Models:
        models = load_models(cfg, need_teacher, device=torch.device("cpu") if staged else device)
        student, teacher = models.student, models.teacher
        if cfg.student.lora.r > 0:
            student = add_lora(student, cfg.student.lora)
        if cfg.train.activation_checkpointing:
            checkpoint_blocks(student)
        student = shard(student, mesh, autocast, trainable=True) if cfg.train.parallel == "fsdp" else student.to(device)
        if teacher is not None:
            teacher = shard(teacher, mesh, None, trainable=False) if layout == "shard" else teacher.to(device)
        return dataclasses.replace(models, student=student, teacher=teacher, device=device, dist=dist)

    models = dist.in_turns(load_and_place) if staged and sharding else load_and_place()
    dist.lockstep = layout == "shard" and dist.world > 1
    if cfg.train.parallel == "ddp" and dist.world > 1:
        _broadcast_from_rank0(models.student)  # as DistributedDataParallel does: replicas start identical
    _log_layout(cfg, models, layout)
    return models


def teacher_layout(cfg: Config, device: torch.device, dist: Dist) -> str:
    """``whole`` or ``shard``: ``train.teacher_sharding``, with ``auto`` decided before loading by
    the teacher's weights (counted on the meta device, in the dtype it will load in) against one
    GPU; on CPU and in a world of one, always whole."""
    if cfg.train.teacher_sharding != "auto":
        return cfg.train.teacher_sharding
    if device.type != "cuda" or dist.world == 1:
        return "whole"
    total = torch.cuda.get_device_properties(device).total_memory
    size = planned_weight_bytes(cfg.teacher, resolve_dtype(cfg.teacher.dtype, device, "teacher"))
    if size is None:
        log.warning("train.teacher_sharding=auto: could not size the teacher before loading it; sharding it "
                    "(set train.teacher_sharding=whole to keep it whole on each rank)")
        return "shard"
    return "whole" if size < WHOLE_TEACHER_SHARE * total else "shard"


def planned_weight_bytes(mc: ModelConfig, dtype: torch.dtype) -> int | None:
    """The size of a model's weights in ``dtype``, from its architecture built on the meta device
    (nothing loaded or allocated); None when the config cannot be read that way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        where, extra = split_gguf(str(mc.path))
        config = AutoConfig.from_pretrained(where, revision=mc.revision, trust_remote_code=mc.trust_remote_code, **extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=mc.trust_remote_code)
    except Exception:  # any failure only means: size unknown (the load itself reports real problems)
        return None
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _size(model: Any) -> str:
    b = _weight_bytes(model)
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def _log_layout(cfg: Config, models: Models, layout: str) -> None:
    n = models.dist.world
    student = models.student
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    what = f"LoRA r={cfg.student.lora.r}: {trainable:,} of {total:,} parameters trained" if is_lora(student) else f"{total:,} parameters"
    if is_sharded(student):
        where = f"FSDP2-sharded over {n} rank(s): weights, gradients and optimizer state"
    else:
        where = f"whole on each of {n} ranks, gradients all-reduced" if n > 1 else "one process"
    ckpt = ", activation checkpointing" if cfg.train.activation_checkpointing else ""
    log.info("student: %s, %s%s", what, where, ckpt)
    if models.teacher is not None:
        why = "train.teacher_sharding=" + cfg.train.teacher_sharding
        if layout == "shard":
            log.info("teacher: FSDP2-sharded over %d rank(s) (%s of weights; %s); rollouts decode in lockstep", n, _size(models.teacher), why)
        elif n > 1:
            log.info("teacher: whole on each of %d ranks (%s of weights; %s)", n, _size(models.teacher), why)
    if n > 1:
        log.info("%d ranks: each decodes 1/%d of the prompts and runs its share of every optimizer step's "
                 "micro-batches; losses are normalised by the global token count", n, n)


# --- building blocks ------------------------------------------------------------------------------


def transformer_blocks(model: Any) -> list[torch.nn.Module]:
    """The repeated decoder layers (the classes a Hugging Face model lists in ``_no_split_modules``)."""
    base = model.get_base_model() if is_lora(model) else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names or type(m).__name__.removeprefix("FSDP") in names]


def checkpoint_blocks(model: Any) -> int:
    """Recompute each transformer block's activations in backward instead of keeping them:
    non-reentrant :func:`torch.utils.checkpoint.checkpoint` around the block's forward (the module
    tree and parameter names stay as they are, so state dicts and FSDP units are unchanged; a no-grad
    forward runs as is). Returns the number of blocks."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise UserError("train.activation_checkpointing: found no transformer blocks in the student (its class "
                        "lists none in _no_split_modules); set it to false")
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def shard(model: Any, mesh: Any, compute_dtype: torch.dtype | None, trainable: bool) -> Any:
    """FSDP2 over ``mesh``: each transformer block is one unit, the root holds the rest (embeddings,
    final norm, output layer). A trained model gathers its weights in ``compute_dtype`` and reduces
    gradients in float32 (FSDP averages them over ranks: see :func:`gradient_factor`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1 and compute_dtype is None:  # FSDP2 all-gathers a unit's weights as one flat buffer
        raise UserError(f"train.parallel: fsdp needs the weights in one dtype, these mix {sorted(map(str, dtypes))}; "
                        "set train.dtype=bfloat16 (weights gathered in it) or student.dtype=float32")
    policy = MixedPrecisionPolicy()
    if compute_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if trainable else None)
    blocks = transformer_blocks(model)
    if not blocks:
        log.warning("FSDP2: %s lists no transformer blocks (_no_split_modules): sharding it as one unit, whose "
                    "weights are all gathered at once", type(model).__name__)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def gradient_factor(model: Any, dist: Dist) -> float:
    """What a rank's loss is multiplied by before backward. Every rank's loss is already divided by
    the *global* token count, so the gradient wanted is the sum over ranks; FSDP's reduce-scatter
    averages, so a sharded student backpropagates world x its loss (a plain sum would need a
    pre-multiplied reduction that Gloo lacks)."""
    return float(dist.world) if is_sharded(model) else 1.0


def is_sharded(model: Any) -> bool:
    """Whether ``model`` is FSDP2-sharded."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _broadcast_from_rank0(model: Any) -> None:
    import torch.distributed as tdist

    with torch.no_grad():
        for t in model.state_dict().values():
            tdist.broadcast(t, src=0)


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Hold an FSDP-sharded ``model``'s weights gathered on every rank for a no-grad phase; a no-op
    for a whole model. Every rank must enter together (the gathering is one collective)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP2's defaults: blocks free their weights, the root keeps its


def reduce_gradients(model: Any, dist: Dist) -> None:
    """Sum a whole student's gradients over ranks (a sharded one was reduced in backward)."""
    if not is_sharded(model):
        dist.sum_gradients([p for p in model.parameters() if p.requires_grad])


def full_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """A sharded model's full state dict on rank 0 (in host memory; None on the other ranks), its own
    state dict for a whole model. Every rank must call it for a sharded model."""
    if not is_sharded(model):
        return model.state_dict()
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if tdist.get_rank() != 0:
        return None
    # a tied weight (GPT-2's output layer is its embedding) comes back twice, as two copies: keep one name
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            sd.pop(name, None)
        seen.add(id(p))
    return sd


def save_model(models: Models, out: Path) -> None:
    """Save the student as a Hugging Face folder (every rank calls; rank 0 writes). A LoRA student is
    saved merged (W + s B A: loads anywhere as a plain model) with its adapter in ``out/adapter``."""
    model, tok = models.student, models.tokenizer
    sd = full_state_dict(model)
    if models.dist.main:
        save_hf(model, tok, out, sd)
    models.dist.barrier()


def save_hf(model: Any, tokenizer: Any, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``model`` with the weights ``state_dict`` (its full state dict) to ``out``, atomically."""
    lora = is_lora(model)

    def write(tmp: Path) -> None:
        target = model.get_base_model() if lora else model
        weights = merged_state_dict(model, state_dict) if lora else state_dict
        target.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        _unwrapped_architectures(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        if lora:
            save_adapter(model, state_dict, tmp / "adapter")

    write_folder(out, write)


def _unwrapped_architectures(config_json: Path) -> None:
    """Older transformers name the class FSDP2 swapped in (``FSDPGPT2LMHeadModel``); tools that pick
    the class by this name (vLLM) need the model's own."""
    import json

    cfg = json.loads(config_json.read_text())
    names = cfg.get("architectures") or []
    if any(n.startswith("FSDP") for n in names):
        cfg["architectures"] = [n.removeprefix("FSDP") for n in names]
        config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def decoding_config(cfg: Config, models: Models) -> Config:
    """The run's config with the decoding engine the placement allows: the static-cache / CUDA-graph
    engine needs whole models (FSDP's all-gathers cannot run inside a captured graph), so with a
    sharded student or teacher ``auto`` becomes the plain loop (logged) and ``static`` is refused."""
    sharded = [name for name, m in (("student", models.student), ("teacher", models.teacher)) if m is not None and is_sharded(m)]
    if not sharded or cfg.generation.engine == "eager":
        return cfg
    reason = f"the {' and '.join(sharded)} {'is' if len(sharded) == 1 else 'are'} FSDP-sharded"
    if cfg.generation.engine == "static":
        raise UserError(f"generation.engine: static needs whole models, but {reason}; use auto or eager "
                        "(or train.parallel=ddp / train.teacher_sharding=whole)")
    log.info("generation.engine=auto: decoding with the plain loop, because %s (the static-cache engine captures "
             "one CUDA graph per token, and FSDP's per-layer all-gathers cannot run inside one)", reason)
    return dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, engine="eager"))
