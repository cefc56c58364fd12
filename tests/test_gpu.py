"""GPU-only checks (marker `gpu`; CPU CI skips them by name): the CUDA-graph rollout engine and a
training run under bf16 autocast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config_dict
from test_engine import compare_engines

pytestmark = pytest.mark.gpu


def test_graph_engine_matches_plain_loop_on_cuda() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    compare_engines("cuda", use_graph=True)


def test_minillm_trains_on_cuda_with_graph_rollouts(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    import json

    from minillm.config import config_from_dict
    from minillm.trainer import train

    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", method="minillm",
                                            train={"device": "cuda", "max_steps": 4}, generation={"engine": "static"}))
    out = train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (out / "final" / "config.json").exists()
