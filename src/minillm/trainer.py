"""The one training loop, shared by every method.

Read :func:`train` top to bottom: collect (rollout + score, or read data) -> optimise (loss,
backward, step) -> health check -> evaluate -> log -> checkpoint. A method only says how to build
its batches and its per-token loss terms (:mod:`minillm.methods.base`). A bad step (non-finite
reward, loss or gradient norm) applies no update and writes no checkpoint (:mod:`minillm.health`);
SIGTERM / SIGINT end the loop after the step in progress, with a checkpoint (:mod:`minillm.stopping`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.atomic import disk_error, remove_stale_temps, write_text_atomic
from minillm.checkpoint import Checkpointer
from minillm.config import Config, save_config
from minillm.data import load_run_data
from minillm.distributed import Dist, init_distributed
from minillm.errors import UserError
from minillm.fingerprint import check_resume, run_fingerprint, write_fingerprint
from minillm.health import Health
from minillm.methods import Experience, Method, get_method
from minillm.methods.base import Batch
from minillm.parallel import (
    decoding_config,
    gathered,
    gradient_factor,
    load_placed_models,
    reduce_gradients,
    save_model,
)
from minillm.preflight import check_paths
from minillm.stopping import StopFlag, Stopped
from minillm.tracking import Tracker
from minillm.validate import validate

log = logging.getLogger("minillm")


@dataclass
class TrainState:
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    exp: Experience | None = None  # unfinished experience (PPO passes still to run)
    next_update: int = 0


def train(cfg: Config, progress: Any = None) -> Path:
    """Run ``cfg.method`` to ``train.max_steps``; return the output folder. Under ``torchrun``
    every rank runs this same loop on its share of each step (:mod:`minillm.distributed`)."""
    cfg.validate_for_training()
    check_paths(cfg, "train")  # every path and each model's context, before any model loads
    dist = init_distributed(cfg.train, need_group=cfg.train.parallel == "fsdp" or cfg.train.teacher_sharding == "shard")
    stop: StopFlag | None = None
    try:
        out = dist.on_main(lambda: prepare_output_dir(cfg))  # rank 0 checks and writes; every rank gets its verdict
        seed_everything(cfg.seed)
        method_cls = get_method(cfg.method)
        models = load_placed_models(cfg, method_cls.needs_teacher, dist)  # LoRA, FSDP2 / whole copies (logged)
        cfg = decoding_config(cfg, models)
        check_split(cfg, dist)
        data = load_run_data(cfg, models.tokenizer)
        method: Method = method_cls(cfg, models, data)
        model = models.student
        max_steps = method.max_steps = resolve_max_steps(cfg, len(data.train))
        opt, sched = build_optimizer(cfg, model, max_steps)
        scaler = loss_scaler(method, model)
        ckpt = Checkpointer(out / "checkpoints", cfg.train.keep_last, dist)
        state = TrainState()
        health = Health(cfg.train, cfg.minillm.rollouts_per_step)  # bad steps, divergence, failure signatures
        if cfg.train.resume and (latest := dist.on_main(ckpt.latest_intact)) is not None:
            state = restore(ckpt, latest, model, opt, sched, method, scaler, health)
            log.info("resumed from %s (step %d)", latest, state.step)
        metrics = MetricsLog(out / "metrics.jsonl", keep_until=state.step) if dist.main else None
        tracker = Tracker(cfg, out, max_steps, state.step, progress) if dist.main else None  # train.report_to, log lines
        select_key = "valid_rouge_l" if cfg.train.select_by == "rouge_l" else "valid_loss"
        progress = progress if dist.main else None
        task = progress.add_task(f"{cfg.method} ", total=max_steps, completed=state.step) if progress else None

        stop = StopFlag().install()  # SIGTERM / SIGINT: finish the step, checkpoint, exit (minillm.stopping)
        while state.step < max_steps:
            t0 = time.perf_counter()
            fresh = state.exp is None
            if fresh:  # phase: rollout + score (on-policy) or next data batch; every rank holds the global experience
                with gathered(model):
                    state.exp, state.next_update = method.collect(state.step), 0
            exp = state.exp
            if not exp.updates:
                raise UserError("every rollout was empty (the student stops at once); check the tokenizer's EOS and the prompts")
            micro_batches = exp.updates[state.next_update]
            state.next_update += 1
            model.train(method.dropout)
            reward_ok = math.isfinite(exp.metrics.get("reward", 0.0))  # a non-finite reward: a bad step, no update
            row = optimise(method, model, micro_batches, opt, cfg.train.grad_clip, scaler, dist, skip=not reward_ok)  # phase: loss, backward, step
            sched.step()
            if state.next_update >= len(exp.updates):
                state.exp = None
            state.step += 1
            dt = dist.max_value(time.perf_counter() - t0)
            row.update(step=state.step, lr=sched.get_last_lr()[0], step_time_s=dt, tokens_per_s=row.pop("tokens") / dt,
                       **exp.metrics, **(exp.once if fresh else {}))
            row.update(health.check(row, state.step, loss_scaled=scaler.is_enabled()))  # phase: numerical health
            if state.step % cfg.train.eval_every == 0 or state.step == max_steps:  # phase: evaluate
                with gathered(model):
                    row.update(validate(cfg, model, models.tokenizer, models.vocab_size, data.valid, data.valid_examples,
                                        method.autocast, dist))
                score = row.get(select_key)
                if score is not None and is_better(score, state.best, cfg.train.select_by):
                    state.best, state.best_step = score, state.step
                    save_model(models, out / "best")  # a finite score: never a bad step's model
            if metrics is not None:  # phase: log
                metrics.write(row)
            if tracker is not None:
                tracker.log(row)
            if progress is not None:
                progress.update(task, completed=state.step, description=f"{cfg.method} loss {row['loss']:.3f}")
            if health.diverged:
                raise UserError(health.diagnosis(ckpt.root))
            due = state.step % cfg.train.save_every == 0 or state.step == max_steps
            if due:  # phase: checkpoint
                save_checkpoint(ckpt, health, state, models, opt, sched, method, scaler)
            if signum := stop.agreed(dist):  # a signal, even one during that save: every rank stops after this step
                if not due:
                    save_checkpoint(ckpt, health, state, models, opt, sched, method, scaler)
                if tracker is not None:
                    tracker.close()
                raise Stopped(signum, state.step, dist.on_main(ckpt.latest))
        stop.uninstall()

        if tracker is not None:
            tracker.close()
        save_model(models, out / "final")
        if not dist.on_main(lambda: (out / "best").exists()):
            save_model(models, out / "best")
        if dist.main:
            summary = {"method": cfg.method, "steps": state.step, "best_step": state.best_step, "best": state.best,
                       "select_by": cfg.train.select_by, "world_size": dist.world, "parallel": cfg.train.parallel,
                       "skipped_steps": health.bad_total}
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        dist.barrier()
        return out
    finally:
        if stop is not None:
            stop.uninstall()  # the signals' handlers as they were
        dist.close()


def save_checkpoint(ckpt: Checkpointer, health: Health, state: TrainState, models: Any, opt: Any, sched: Any,
                    method: Method, scaler: Any) -> None:
    """Checkpoint the step just finished, unless it failed the health check; the newest healthy
    checkpoint is kept through pruning (a diverging run keeps a good state to go back to)."""
    if not health.may_save:
        log.warning("step %d: no checkpoint written from a step that failed the health check", state.step)
        return
    health.saved(state.step)
    ckpt.protect = health.last_healthy
    ckpt.save(state.step, models.student, opt, models.tokenizer, snapshot(state, sched, method, scaler, health))


def check_split(cfg: Config, dist: Dist) -> None:
    """Refuse a split that would leave ranks out of step, and say when one wastes work."""
    if dist.world == 1:
        return
    n = cfg.minillm.rollouts_per_step
    if dist.lockstep and cfg.method == "minillm" and n % dist.world:
        # a sharded teacher's forward is a collective: every rank must decode and score as many batches
        raise UserError(f"minillm.rollouts_per_step: {n} prompts do not split evenly over {dist.world} ranks, which a "
                        "sharded teacher needs (ranks decode in lockstep); use a multiple of the world size")
    if cfg.train.grad_accum % dist.world:
        log.warning("train.grad_accum=%d over %d ranks: some ranks run a padding micro-batch in each step; "
                    "a multiple of the world size wastes none", cfg.train.grad_accum, dist.world)


def loss_scaler(method: Method, model: Any) -> torch.amp.GradScaler:
    """Dynamic loss scaling for float16 autocast over float32 master weights (small policy-gradient
    gradients would underflow); a pass-through for float32 and bfloat16, and for weights that are
    themselves half precision (their gradients cannot be unscaled in place)."""
    params = [p for p in model.parameters() if p.requires_grad]
    master_fp32 = bool(params) and all(p.dtype == torch.float32 for p in params)
    if method.autocast == torch.float16 and not master_fp32:
        log.warning("train.dtype float16 with half-precision student weights: no loss scaling; "
                    "set student.dtype=float32 (master weights) for stable float16 training")
    return torch.amp.GradScaler(params[0].device.type if params else "cpu",
                                enabled=method.autocast == torch.float16 and master_fp32)


def optimise(
    method: Method, model: Any, micro_batches: list[Batch], opt: torch.optim.Optimizer, grad_clip: float,
    scaler: torch.amp.GradScaler | None = None, dist: Dist | None = None, skip: bool = False,
) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (the step's global list); each term is normalised
    by its global token count. Under several ranks each runs its share (:meth:`Dist.share`) and the
    gradients and logged sums are added up over ranks, so the step is the one-process step.

    With an enabled ``scaler`` the gradients are unscaled before clipping, and a step whose
    gradients overflowed is skipped (the scale is lowered) as :class:`torch.amp.GradScaler` does.

    A bad step (:mod:`minillm.health`) applies no update either: ``skip`` (the rollout's reward was
    not finite), a non-finite loss, or, without loss scaling, a non-finite gradient norm. The row
    still reports the loss and norm, so the health check can name what went wrong."""
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)  # pass-through
    dist = dist or Dist()
    counts = token_counts(micro_batches)
    factor = gradient_factor(model, dist)
    sums: dict[str, float] = {}
    loss_total, tokens = 0.0, 0
    for mb, real in dist.share(micro_batches):
        terms = method.loss_terms(model, mb)
        loss = None
        for name, term in terms.items():
            mask = mb[term.mask].to(term.values.device)
            part = torch.where(mask != 0, term.values, 0.0).mul(mask).sum() / counts[term.mask]  # inf at padding must not leak
            sums[name] = sums.get(name, 0.0) + float(part.detach()) * real
            if term.coef:
                loss = term.coef * part if loss is None else loss + term.coef * part
        if loss is not None:
            scaler.scale(loss * (factor if real else 0.0)).backward()  # a padding micro-batch: same collectives, no gradient
            loss_total += float(loss.detach()) * real
        tokens += real * sum(int(v.sum()) for k, v in mb.items() if k.endswith("attention_mask") or k == "prompt_mask" or k == "response_mask")
    totals = dist.sum_values({**{f"term/{k}": v for k, v in sums.items()}, "loss": loss_total, "tokens": tokens})
    loss_total, tokens = totals["loss"], int(totals["tokens"])
    sums = {k: totals[f"term/{k}"] for k in sums}
    if skip or not math.isfinite(loss_total):  # every rank sees the same summed loss: all skip alike
        opt.zero_grad(set_to_none=True)
        return {"loss": loss_total, **sums, "grad_norm": math.nan, "tokens": tokens}
    reduce_gradients(model, dist)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = 0.0
    if params:
        scaler.unscale_(opt)
        norm_t = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        norm = float(norm_t.full_tensor() if hasattr(norm_t, "full_tensor") else norm_t)  # a sharded model's norm is a DTensor
        if math.isfinite(norm) or scaler.is_enabled():  # an enabled scaler skips an overflow itself and lowers its scale
            scaler.step(opt)
            scaler.update()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss_total, **sums, "grad_norm": norm, "tokens": tokens}


def token_counts(micro_batches: Iterable[Batch]) -> dict[str, float]:
    """Real tokens per mask over a whole update (the denominators of every term)."""
    counts: dict[str, float] = {}
    for mb in micro_batches:
        for k, v in mb.items():
            if k.endswith("mask") and v.dtype.is_floating_point:
                counts[k] = counts.get(k, 0.0) + float(v.sum())
    return {k: max(v, 1.0) for k, v in counts.items()}


def build_optimizer(cfg: Config, model: Any, max_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases and norms unless ``train.weight_decay_on`` is ``all``); warm-up then
    constant / cosine / linear to ``min_lr``."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 or t.weight_decay_on == "all" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas))
    floor = t.min_lr / t.lr

    def factor(step: int) -> float:
        if step < t.warmup:
            return (step + 1) / (t.warmup + 1)
        if t.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - t.warmup) / max(1, max_steps - t.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if t.schedule == "cosine" else 1 - frac
        return floor + (1 - floor) * shape

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def resolve_max_steps(cfg: Config, n_train: int) -> int:
    """``train.epochs`` (when set) turns into optimizer steps over the training set."""
    if cfg.train.epochs is None:
        return cfg.train.max_steps
    per_step: float = cfg.train.sequences_per_step
    if cfg.method == "minillm":  # each rollout feeds ppo_epochs optimizer steps: fewer new prompts per step
        m = cfg.minillm
        per_step = m.rollouts_per_step / (m.ppo_epochs * math.ceil(m.rollouts_per_step / per_step))
    return max(1, math.ceil(cfg.train.epochs * n_train / per_step))


def is_better(score: float, best: float | None, select_by: str) -> bool:
    return best is None or (score > best if select_by == "rouge_l" else score < best)


def snapshot(state: TrainState, sched: Any, method: Method, scaler: Any, health: Health | None = None) -> dict[str, Any]:
    """The trainer state of a checkpoint besides weights and optimizer (the checkpointer stores those)."""
    return {
        "scheduler": sched.state_dict(), "method": method.state_dict(), "scaler": scaler.state_dict(),
        "best": state.best, "best_step": state.best_step, "next_update": state.next_update,
        "health": health.state_dict() if health is not None else None,
        # the unfinished experience as plain containers: a checkpoint stores no classes (minillm.statefile)
        "exp": None if state.exp is None else {"updates": state.exp.updates, "metrics": state.exp.metrics, "once": state.exp.once},
    }


def restore(ckpt: Checkpointer, path: Path, model: Any, opt: Any, sched: Any, method: Method, scaler: Any,
            health: Health | None = None) -> TrainState:
    saved = ckpt.load(path, model, opt)
    if health is not None and saved.get("health"):  # absent in checkpoints written before the health check
        health.load_state_dict(saved["health"])
        ckpt.protect = health.last_healthy
    if saved.get("scaler"):  # empty when loss scaling is off
        scaler.load_state_dict(saved["scaler"])
    sched.load_state_dict(saved["scheduler"])
    method.load_state_dict(saved["method"])
    exp = saved["exp"]
    if isinstance(exp, dict):
        exp = Experience(exp["updates"], exp["metrics"], exp["once"])
    return TrainState(step=saved["step"], best=saved["best"], best_step=saved["best_step"], exp=exp, next_update=saved["next_update"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(cfg: Config) -> Path:
    """Create ``output_dir``; refuse to resume a run whose config or data changed (other than run
    length: :mod:`minillm.fingerprint`). Every file written here is written atomically."""
    out = Path(cfg.output_dir)
    now = run_fingerprint(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # left by a kill mid-write
        if cfg.train.resume and (out / "checkpoints").is_dir():
            check_resume(out, cfg, now)
        if not cfg.train.resume:
            for sub in ("checkpoints", "best", "final"):
                shutil.rmtree(out / sub, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        save_config(cfg, out / "config.yaml")
        write_fingerprint(out, now)
    except OSError as e:
        raise disk_error(e, out) or e from None
    return out


def _comparable_hash(cfg: Config) -> str:
    """The digest of what a resumed run must share with its checkpoints (``config.hash``)."""
    return run_fingerprint(cfg)["hash"]


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step; a resumed run drops rows past its checkpoint."""

    def __init__(self, path: Path, keep_until: int) -> None:
        self.path = path
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and _row_step(ln) <= keep_until]
            write_text_atomic(path, "".join(ln + "\n" for ln in keep))  # a kill mid-rewrite loses no row

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row``; a non-finite number (the grad norm of a step loss scaling skipped) is
        written as null, so the file stays strict JSON."""

        def clean(v: Any) -> Any:
            v = float(v) if isinstance(v, (np.floating, torch.Tensor)) else v
            return None if isinstance(v, float) and not math.isfinite(v) else v

        with self.path.open("a") as fh:
            fh.write(json.dumps({k: clean(v) for k, v in row.items()}, allow_nan=False) + "\n")


def _row_step(line: str) -> float:
    """The step of a metrics line; a line cut off by a crash mid-write counts as past any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf
