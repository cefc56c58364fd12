"""`minillm demo`: the built-in study, offline, on a laptop.

Stages (each reused on a rerun when its config is unchanged and it finished):

1. data: the generated instruction task (:mod:`minillm.data.task`), a word-level tokenizer;
2. teacher: a small GPT-2 trained by SFT on the task;
3. students, all of one size and from one random start: SFT (the paper's "SFT w/o KD"),
   word-level KD, SeqKD (SFT on teacher samples), and MiniLLM (initialised from the SFT student,
   as in the paper, with the paper's switches; the pre-training term is off because the task has
   no general ability to protect - `data.pretrain` turns it on for real runs);
4. evaluation of every model over several sampling seeds (:mod:`minillm.eval.runner`);
5. the paper's Figure 2 (:mod:`minillm.toy`) and the report (:mod:`minillm.report`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minillm.config import Config, config_from_dict, config_hash

log = logging.getLogger("minillm")


@dataclass(frozen=True)
class DemoSize:
    n_train: int
    n_valid: int
    n_test: int
    teacher: tuple[int, int]  # layers, width
    student: tuple[int, int]
    teacher_steps: int
    student_steps: int  # SFT, KD and SeqKD each
    minillm_steps: int
    rollouts: int
    seeds: tuple[int, ...]
    eval_examples: int


# sized for 2 CPU cores: --quick about 2 minutes, the default about 10
QUICK = DemoSize(1000, 100, 100, (2, 64), (1, 48), 300, 150, 48, 64, (10, 20), 100)
FULL = DemoSize(3000, 200, 300, (3, 96), (1, 48), 800, 300, 192, 64, (10, 20, 30, 40, 50), 300)


def _base(out: Path, data: dict[str, Path], device: str, seed: int, size: DemoSize) -> dict[str, Any]:
    return {
        "seed": seed,
        "data": {"train": str(data["train"]), "valid": str(data["valid"]), "max_prompt_len": 64, "max_len": 128},
        "train": {"device": device, "warmup": 20, "batch_size": 32, "grad_accum": 1, "eval_batch_size": 50,
                  "eval_max_examples": size.n_valid, "keep_last": 1, "progress": True},
        "generation": {"max_new_tokens": 48},
    }


def _merge(base: dict[str, Any], **sections: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for k, v in sections.items():
        if isinstance(v, dict):
            out.setdefault(k, {}).update(v)
        else:
            out[k] = v
    return out


def _stage(name: str, cfg: Config, progress: Any, timings: dict[str, float]) -> Path:
    """Train one stage unless a finished run with the same config is already there."""
    from minillm.trainer import train

    out = Path(cfg.output_dir)
    done = out / "demo_stage.json"
    key = config_hash(cfg)
    if done.exists() and json.loads(done.read_text()).get("config") == key and (out / "final").exists():
        log.info("%s: reusing the finished run in %s", name, out)
        timings[name] = json.loads(done.read_text()).get("seconds", 0.0)
        return out
    t0 = time.perf_counter()
    cfg.train.resume = False
    train(cfg, progress=progress)
    timings[name] = time.perf_counter() - t0
    done.write_text(json.dumps({"config": key, "seconds": timings[name]}))
    return out


def run_demo(out: Path, quick: bool = False, device: str = "auto", seed: int = 10, progress: Any = None) -> str:
    """Run the whole study under ``out``; return the comparison table (Markdown)."""
    from minillm.data.task import corpus_texts, write_task
    from minillm.generate_data import run_generate
    from minillm.tiny import build_word_tokenizer, save_pair, tiny_gpt2

    size = QUICK if quick else FULL
    out = Path(out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = write_task(out / "data", seed, size.n_train, size.n_valid, size.n_test)
    tok = build_word_tokenizer(corpus_texts())
    init = out / "models" / ("quick" if quick else "full")
    if not (init / "student" / "config.json").exists():
        save_pair(tiny_gpt2(tok, *size.teacher, n_head=4, seed=seed), tok, init / "teacher")
        save_pair(tiny_gpt2(tok, *size.student, n_head=4, seed=seed + 1), tok, init / "student")
    timings["data"] = time.perf_counter() - t0
    base = _base(out, data, device, seed, size)
    runs = out / "runs"

    sft_train = {"lr": 3e-3, "schedule": "cosine", "min_lr": 3e-4, "eval_every": 50, "save_every": 1000}
    teacher = _stage("teacher", config_from_dict(_merge(
        base, method="sft", output_dir=str(runs / "teacher"), student={"path": str(init / "teacher")},
        train={**sft_train, "max_steps": size.teacher_steps})), progress, timings)
    sft = _stage("sft", config_from_dict(_merge(
        base, method="sft", output_dir=str(runs / "sft"), student={"path": str(init / "student")},
        train={**sft_train, "max_steps": size.student_steps})), progress, timings)
    kd = _stage("kd", config_from_dict(_merge(
        base, method="kd", output_dir=str(runs / "kd"), student={"path": str(init / "student")},
        teacher={"path": str(teacher / "best")}, train={**sft_train, "max_steps": size.student_steps})), progress, timings)

    t1 = time.perf_counter()
    gen_cfg = config_from_dict(_merge(base, method="seqkd", output_dir=str(runs / "seqkd"),
                                      teacher={"path": str(teacher / "best")}, student={"path": str(init / "student")}))
    seqkd_data = run_generate(gen_cfg, out=str(out / "data" / "seqkd_train.jsonl"), samples=1, which="teacher", progress=progress)
    timings["seqkd_generate"] = time.perf_counter() - t1
    seqkd = _stage("seqkd", config_from_dict(_merge(
        base, method="seqkd", output_dir=str(runs / "seqkd"), student={"path": str(init / "student")},
        data={"train": str(seqkd_data)}, train={**sft_train, "max_steps": size.student_steps})), progress, timings)

    mini = _stage("minillm", config_from_dict(_merge(
        base, method="minillm", output_dir=str(runs / "minillm"), student={"path": str(sft / "best")},
        teacher={"path": str(teacher / "best")},
        train={"lr": 1e-3, "warmup": 0, "max_steps": size.minillm_steps, "batch_size": 16, "grad_accum": 1,
               "eval_every": max(1, size.minillm_steps // 4), "save_every": 1000, "select_by": "rouge_l"},
        minillm={"rollouts_per_step": size.rollouts, "rollout_batch_size": size.rollouts})), progress, timings)

    t2 = time.perf_counter()
    from minillm.eval.runner import run_eval

    models = {"teacher": teacher / "best", "sft": sft / "best", "kd": kd / "best", "seqkd": seqkd / "best", "minillm": mini / "best"}
    eval_cfg = config_from_dict(_merge(
        base, output_dir=str(out), teacher={"path": str(teacher / "best")},
        eval={"models": {k: str(v) for k, v in models.items()}, "test": {"task": str(data["test"])},
              "seeds": list(size.seeds), "max_examples": size.eval_examples, "batch_size": 32,
              "exposure_bias": True, "exposure_samples": 2, "exposure_max_prompts": 16, "out": str(out / "eval")}))
    table = run_eval(eval_cfg, progress=progress)
    timings["eval"] = time.perf_counter() - t2

    from minillm.report import write_report
    from minillm.toy import run_toy

    run_toy(out / "toy")  # the paper's Figure 2: mode-covering forward KL vs mode-seeking reverse KL
    report = write_report([out / "eval", out / "toy", *(runs / n for n in ("teacher", "sft", "kd", "seqkd", "minillm"))], out / "report")
    timings["total"] = time.perf_counter() - t0
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    stage_times = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    return f"{table}\n\nstage times: {stage_times}\nreport: {report}\nnext: point configs/gpt2-minillm.yaml at your own models (README, Quick start)"
