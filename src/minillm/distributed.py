"""torch.distributed for the training loop: the process group, rank and world, reductions, and how
the work of a step is split across ranks.

``torchrun`` (or a launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT,
as torchrun does under Slurm or Kubernetes) starts one process per device;
:func:`init_distributed` joins them into one process group. A plain ``minillm train`` is a world
of one and issues no collective (with a sharded model it opens a group of one, which FSDP2 needs).

Every rank runs the same data pipeline from the same seed, so every rank holds the same *global*
work: the prompts of a rollout phase, the micro-batches of an optimizer step. Each takes its share:

* :meth:`Dist.split`: a contiguous part of a list (prompts to decode, items to validate);
  :meth:`Dist.gather` joins the parts again in global order, so what comes out (rollouts, scores)
  is what one process would have produced;
* :meth:`Dist.share`: the micro-batches of one optimizer step, dealt round-robin and padded with
  zero-weight copies, so every rank runs the same number of forward and backward passes (a sharded
  model all-gathers its weights in each one; a rank that skipped one would leave the others waiting).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from minillm.config import TrainConfig
from minillm.errors import UserError

log = logging.getLogger("minillm")
T = TypeVar("T")
Batch = dict[str, torch.Tensor]
_BUCKET_BYTES = 64 << 20  # gradients are summed in flat buckets of about this size


@dataclass
class Dist:
    """This process's place in the run. The default is a world of one: every method is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device | None = None  # this rank's device; None: train.device decides (one process)
    lockstep: bool = False  # some model's forward is a collective (a sharded teacher): ranks decode in step
    owns_group: bool = False  # this object opened the process group and closes it

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")

    # -- reductions -------------------------------------------------------------------------------
    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed over ranks (every rank passes the same keys)."""
        if self.world == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def mean_values(self, means: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
        """Per-rank means -> global means, each weighted by its rank's count in ``weights``; a key
        without a weight is a count and is summed. A world of one returns ``means`` as they are."""
        if self.world == 1:
            return dict(means)
        parts = {k: v * weights[k] if k in weights else v for k, v in means.items()}
        parts.update({f"weight/{k}": float(w) for k, w in weights.items() if k in means})
        total = self.sum_values(parts)
        return {k: total[k] / max(total[f"weight/{k}"], 1e-30) if k in weights else total[k] for k in means}

    def max_value(self, x: float) -> float:
        """The largest ``x`` over ranks."""
        if self.world == 1:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return float(t.item())

    def all_done(self, local_done: bool) -> bool:
        """The decode loop's stop decision in lockstep: stop only when every rank is done. A rank
        whose rows all stopped keeps stepping (its output masked) while others still decode, so
        every rank issues the same collectives."""
        if self.world == 1:
            return local_done
        t = torch.tensor([1 if local_done else 0], dtype=torch.int32, device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks, in flat buckets of about 64 MB. Every rank's
        loss is already divided by the *global* token count, so the sum is the gradient of the
        global mean (DistributedDataParallel would average instead, which assumes equal shares)."""
        if self.world == 1:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for g in (p.grad for p in params if p.grad is not None):
            nbytes = g.numel() * g.element_size()
            if bucket and (g.dtype != bucket[0].dtype or g.device != bucket[0].device or size + nbytes > _BUCKET_BYTES):
                _all_reduce_flat(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += nbytes
        if bucket:
            _all_reduce_flat(bucket)

    # -- splitting work ---------------------------------------------------------------------------
    def split(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous part of ``items`` (parts differ in size by at most one)."""
        n, k = len(items), self.world
        start = self.rank * (n // k) + min(self.rank, n % k)
        return list(items[start : start + n // k + (1 if self.rank < n % k else 0)])

    def gather(self, part: list[T]) -> list[T]:
        """Every rank's ``part`` joined in rank order (the inverse of :meth:`split`)."""
        if self.world == 1:
            return list(part)
        parts: list[Any] = [None] * self.world
        tdist.all_gather_object(parts, part)
        return [x for p in parts for x in p]

    def share(self, micro_batches: Sequence[Batch]) -> list[tuple[Batch, bool]]:
        """This rank's micro-batches of one optimizer step, each with ``True`` when it is real:
        global micro-batches r, r + N, r + 2N, ... A rank left with fewer than ceil(M / N) gets
        copies of the first one marked ``False``, which the trainer weighs by 0: it costs a forward
        and a backward but keeps every rank's collectives in step."""
        mine = [(mb, True) for mb in micro_batches[self.rank :: self.world]]
        per_rank = -(-len(micro_batches) // self.world)
        return mine + [(micro_batches[0], False)] * (per_rank - len(mine))

    # -- coordination -----------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank returns its result, or raises the same UserError
        (so a refused run stops every rank, not only the one that checked)."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box = [("ok", fn())]
            except UserError as e:
                box = [("user", str(e))]
            except Exception as e:
                box = [("crash", f"{type(e).__name__}: {e}")]
                tdist.broadcast_object_list(box, src=0)
                raise
        tdist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "user":
            raise UserError(value)
        if kind == "crash":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def in_turns(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the ranks of a node one after another (each loads a whole model into host
        memory before sharding it: in turns, a node holds one such copy at a time). A rank whose
        turn fails still takes part in the others' turns, then raises: no rank is left waiting."""
        out: Any = None
        error: BaseException | None = None
        for turn in range(self.local_world):
            if self.local_rank == turn:
                try:
                    out = fn()
                except Exception as e:  # a bad model path fails on every rank alike
                    error = e
            self.barrier()
        if error is not None:
            raise error
        return out

    def same_everywhere(self, value: str, what: str) -> None:
        """Refuse a run whose ranks decided ``what`` differently (e.g. GPUs of different sizes)."""
        if self.world == 1:
            return
        values: list[Any] = [None] * self.world
        tdist.all_gather_object(values, value)
        if len(set(values)) > 1:
            raise UserError(f"{what}: the ranks disagree ({', '.join(f'rank {i}: {v}' for i, v in enumerate(values))}); set it explicitly")

    def close(self) -> None:
        """Leave the process group if this object opened it."""
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self.owns_group = False


def _all_reduce_flat(tensors: list[torch.Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    tdist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_distributed(train: TrainConfig, need_group: bool = False) -> Dist:
    """Join the process group torchrun describes in the environment (or the one the caller already
    opened). One process and no ``need_group``: a world of one, without a group."""
    world = _env_int("WORLD_SIZE", 1)
    if tdist.is_available() and tdist.is_initialized():
        world = tdist.get_world_size()
    if world == 1 and not need_group:
        return Dist()
    if train.device.startswith("cuda:") and world > 1:
        raise UserError(f"train.device: {train.device} would put every rank on one GPU; under torchrun use auto or cuda "
                        "(each rank takes cuda:LOCAL_RANK)")
    use_cuda = train.device != "cpu" and torch.cuda.is_available()
    if train.device.startswith("cuda") and not use_cuda:
        raise UserError("train.device: cuda was asked for but no CUDA device is visible; use train.device=cpu")
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device(train.device) if world == 1 and ":" in train.device else torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=train.dist_timeout_s)
    owns = not tdist.is_initialized()
    if owns:
        backend = "nccl" if use_cuda else "gloo"
        if world == 1 and "MASTER_ADDR" not in os.environ:  # plain `minillm train` with a sharded model: a group of one
            tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            tdist.init_process_group(backend, timeout=timeout)
    d = Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=local_rank,
             local_world=_env_int("LOCAL_WORLD_SIZE", tdist.get_world_size()), device=device, owns_group=owns)
    if not d.main:  # one log for the run: the other ranks report only problems
        log.setLevel(max(log.level, logging.WARNING))
    return d
