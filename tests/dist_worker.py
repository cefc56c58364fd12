"""Run by tests/test_distributed.py under ``torchrun``: the jobs of a JSON plan, one after another, in
one process group (so torchrun's start-up is paid once for all of them).

Jobs: ``train`` (``minillm train CONFIG OVERRIDES`` through the CLI's entry point), ``truncate``
(rank 0 copies a finished run folder and cuts it back to one of its checkpoints, as a crash after
that checkpoint would have left it), ``lockstep`` (rollouts with a sharded teacher where rank 0's
rows all stop at their first token and rank 1's never stop). Each rank writes what it saw to
``OUT/rank<R>.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch


def truncate(src: Path, dst: Path, step: int) -> None:
    """``dst`` = run folder ``src`` as it stood after checkpoint ``step``: later checkpoints and the
    saved models gone (metrics rows past the checkpoint are dropped by the resumed run itself)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    for sub in ("final", "best", "summary.json"):
        p = dst / sub
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def lockstep(job: dict[str, Any], dist: Any) -> dict[str, Any]:
    """One rollout phase with a sharded teacher: rank 0's rows all stop at once, rank 1's run to
    their budget. Returns each rank's response lengths and teacher forward count."""
    from minillm.config import load_config
    from minillm.data import load_run_data
    from minillm.methods.minillm import MiniLLM
    from minillm.parallel import decoding_config, gathered, load_placed_models

    cfg = load_config(job["config"], job.get("overrides", []))
    models = load_placed_models(cfg, True, dist)
    cfg = decoding_config(cfg, models)
    method = MiniLLM(cfg, models, load_run_data(cfg, models.tokenizer))
    method.stop_ids = list(range(models.vocab_size)) if dist.rank == 0 else []
    dist.lockstep = bool(job.get("lockstep", True))  # the negative control turns it off
    calls = [0]
    models.teacher.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    print(f"rank {dist.rank}: lockstep={dist.lockstep} rollout starts", flush=True)
    t0 = time.perf_counter()
    with gathered(models.student):
        samples = method.rollout(dist.split(method.next_prompts()), 0)
        decode_calls = calls[0]
        rows, _ = method.score(samples, 0)
    lengths = [len(s.response) for s in samples]
    everyone = dist.gather(lengths)
    print(f"rank {dist.rank}: rollout finished", flush=True)
    return {"lengths": lengths, "all_lengths": everyone, "decode_teacher_calls": decode_calls,
            "teacher_calls": calls[0], "seconds": time.perf_counter() - t0, "scored_rows": len(rows)}


def main(plan_path: str) -> None:
    from minillm.cli import main as cli_main
    from minillm.config import TrainConfig
    from minillm.distributed import init_distributed

    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(1)
    dist = init_distributed(TrainConfig(device="cpu", dist_timeout_s=plan["timeout_s"]), need_group=True)  # train() reuses it
    report: dict[str, Any] = {"rank": dist.rank, "world": dist.world, "jobs": []}
    out = Path(plan["out"])
    for job in plan["jobs"]:
        if job["kind"] == "train":
            cli_main(["train", job["config"], *job.get("overrides", [])])
            report["jobs"].append({"kind": "train"})
        elif job["kind"] == "truncate":
            if dist.main:
                truncate(Path(job["src"]), Path(job["dst"]), job["step"])
            dist.barrier()
            report["jobs"].append({"kind": "truncate"})
        elif job["kind"] == "lockstep":
            report["jobs"].append({"kind": "lockstep", **lockstep(job, dist)})
        (out / f"rank{dist.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1])
