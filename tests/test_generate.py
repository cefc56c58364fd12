"""``minillm generate`` (SeqKD data): record count and fields, determinism across batch sizes,
resuming after a half-written file, refusing other settings, and SeqKD training on the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config_dict
from minillm.cli import main
from minillm.config import config_from_dict
from minillm.data import read_examples
from minillm.decoding import row_seeds
from minillm.errors import UserError
from minillm.generate_data import meta_path, run_generate

N_PROMPTS, SAMPLES = 10, 2


class FakeProgress:
    """Records what run_generate reports to a rich Progress."""

    def __init__(self) -> None:
        self.total = self.completed = self.advanced = 0

    def add_task(self, description: str, total: int, completed: int = 0) -> int:
        self.total, self.completed = total, completed
        return 0

    def advance(self, task: int, n: int) -> None:
        self.advanced += n


def gen_config(task: dict[str, Path], out: Path, batch: int = 8):
    return config_from_dict(
        tiny_config_dict(task, out, method="seqkd", data={"max_examples": N_PROMPTS}, train={"eval_batch_size": batch})
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tiny_task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    bar = FakeProgress()
    path = run_generate(gen_config(tiny_task, out), samples=SAMPLES, progress=bar)
    assert path == out / "generated.jsonl"
    assert (bar.total, bar.completed, bar.advanced) == (N_PROMPTS * SAMPLES, 0, N_PROMPTS * SAMPLES)
    return path


def test_records_fields_and_seeds(generated):
    recs = lines(generated)
    assert len(recs) == N_PROMPTS * SAMPLES
    assert [(r["index"], r["sample"]) for r in recs] == [(i, k) for i in range(N_PROMPTS) for k in range(SAMPLES)]
    for r in recs:
        assert set(r) >= {"instruction", "context", "response", "sample", "seed", "index", "source"}
        assert r["seed"] == int(row_seeds(3, [r["index"]], salt=r["sample"])[0])  # config seed 3
    by_prompt = {}
    for r in recs:
        by_prompt.setdefault(r["index"], []).append(r["response"])
    assert sum(a != b for a, b in by_prompt.values()) >= N_PROMPTS // 2  # two seeds, two samples
    examples = read_examples(str(generated))  # the normal reader loads it
    assert [e.response for e in examples] == [r["response"] for r in recs]


def test_deterministic_and_independent_of_batch_size(tiny_task, tmp_path, generated):
    path = run_generate(gen_config(tiny_task, tmp_path, batch=3), out=tmp_path / "b3.jsonl", samples=SAMPLES)
    assert path.read_bytes() == generated.read_bytes()


def test_resumes_after_truncated_file(tiny_task, tmp_path, generated):
    full = generated.read_bytes()
    keep = full.splitlines(keepends=True)
    out = tmp_path / "part.jsonl"
    out.write_bytes(b"".join(keep[:7]) + keep[7][: len(keep[7]) // 2])  # a crash in the middle of record 8
    shutil.copy(meta_path(generated), meta_path(out))
    bar = FakeProgress()
    run_generate(gen_config(tiny_task, tmp_path), out=out, samples=SAMPLES, progress=bar)
    assert out.read_bytes() == full
    assert (bar.completed, bar.advanced) == (7, N_PROMPTS * SAMPLES - 7)  # only the missing records were sampled
    with pytest.raises(UserError, match="other settings.*samples"):
        run_generate(gen_config(tiny_task, tmp_path), out=out, samples=3)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(generated.read_text())
    with pytest.raises(UserError, match="no foreign.jsonl.meta.json"):
        run_generate(gen_config(tiny_task, tmp_path), out=foreign, samples=SAMPLES)


def test_seqkd_trains_on_generated_data_through_the_cli(tiny_task, tmp_path):
    cfg_file = tmp_path / "seqkd.yaml"
    cfg = tiny_config_dict(tiny_task, tmp_path / "run", method="seqkd", data={"max_examples": N_PROMPTS},
                           train={"max_steps": 2, "eval_every": 100})
    cfg_file.write_text(yaml.safe_dump(cfg))
    data = tmp_path / "teacher.jsonl"
    main(["generate", str(cfg_file), "--out", str(data), "--samples", "1"])
    assert len(lines(data)) == N_PROMPTS
    main(["train", str(cfg_file), f"data.train={data}"])
    run = tmp_path / "run"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["ce"] > 0 for r in rows)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["train"] == str(data)
    before, after = load_file(str(tiny_task["student"] / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
