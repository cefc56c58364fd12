"""`minillm demo`: the built-in study, offline, on a laptop.

Stages (each reused on a rerun when its config is unchanged and it finished):

1. data: the generated instruction task (:mod:`minillm.data.task`), a word-level tokenizer;
2. teacher: a small GPT-2 trained by SFT on the task;
3. students, all of one size and from one random start: SFT (the paper's "SFT w/o KD"),
   word-level KD, SeqKD (SFT on teacher samples), and MiniLLM (initialised from the SFT student,
   as in the paper, with the paper's switches; the pre-training term is off because the task has
   no general ability to protect - `data.pretrain` turns it on for real runs);
4. evaluation of every model over several sampling seeds (:mod:`minillm.eval.runner`), on the
   whole test split and on its long-answer prompts, where exposure bias (ExAccErr) is measured;
5. the paper's Figure 2 (:mod:`minillm.toy`) and the report (:mod:`minillm.report`).

With several whole-pipeline seeds (``--seeds N``, the default study's 3) stages 1-5 run once per
seed in ``out/seed_S/``, teacher and students retrained, and :mod:`minillm.demo_table` writes the
summary over the seeds and the README's table (``out/demo_table.md``), and ``out/report/`` draws
every seed's exposure curves together (mean ± std bands, per protocol).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minillm.config import Config, config_from_dict, config_hash
from minillm.errors import UserError

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
    seeds: tuple[int, ...]  # sampling seeds of the evaluation
    eval_examples: int
    exposure_prompts: int
    pipeline_seeds: int  # whole-pipeline repetitions (teacher and students retrained)
    long_rounds: int = 1  # long answers repeated this many times (1: 65-81 tokens; data.task)
    exposure_len: int = 64  # l_max of exposure bias: the shortest long answer, so EOS before it is rare
    max_new_tokens: int = 96  # room for the longest answer and its EOS
    max_len: int = 160  # the longest prompt (47 tokens) + max_new_tokens


# quick and default are sized for 2 CPU cores (about 4 min, and 3 x 7.5 min: 1375 s on 2026-12-01); large is for a GPU
QUICK = DemoSize(1000, 100, 100, (2, 64), (1, 48), 300, 150, 48, 64, (10, 20), 100, 32, 1)
FULL = DemoSize(3000, 200, 300, (3, 96), (1, 48), 800, 300, 192, 64, (10, 20, 30, 40, 50), 300, 64, 3)
LARGE = DemoSize(5000, 200, 300, (4, 192), (2, 64), 2000, 800, 300, 128, (10, 20, 30, 40, 50), 300, 90, 3,
                 long_rounds=4, exposure_len=256, max_new_tokens=336, max_len=400)  # long answers 263-327 tokens
SIZES = {"quick": QUICK, "default": FULL, "large": LARGE}


def _base(out: Path, data: dict[str, Path], device: str, seed: int, size: DemoSize) -> dict[str, Any]:
    return {
        "seed": seed,
        "data": {"train": str(data["train"]), "valid": str(data["valid"]), "max_prompt_len": 64, "max_len": size.max_len},
        "train": {"device": device, "warmup": 20, "batch_size": 32, "grad_accum": 1, "eval_batch_size": 50,
                  "eval_max_examples": size.n_valid, "keep_last": 1, "progress": True},
        "generation": {"max_new_tokens": size.max_new_tokens},
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
    log.info("demo: stage %s (%s)", name, out)
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


def study_configs(out: Path, size: DemoSize, init: Path, data: dict[str, Path], device: str, seed: int) -> dict[str, Config]:
    """Every stage's config (teacher, sft, kd, seqkd_generate, seqkd, minillm, eval), validated."""
    base = _base(out, data, device, seed, size)
    runs = out / "runs"
    teacher, sft = runs / "teacher" / "best", runs / "sft" / "best"
    seqkd_data = out / "data" / "seqkd_train.jsonl"
    sft_train = {"lr": 3e-3, "schedule": "cosine", "min_lr": 3e-4, "eval_every": 50, "save_every": 1000}
    student_train = {**sft_train, "max_steps": size.student_steps}
    raw = {
        "teacher": _merge(base, method="sft", output_dir=str(runs / "teacher"), student={"path": str(init / "teacher")},
                          train={**sft_train, "max_steps": size.teacher_steps}),
        "sft": _merge(base, method="sft", output_dir=str(runs / "sft"), student={"path": str(init / "student")}, train=student_train),
        "kd": _merge(base, method="kd", output_dir=str(runs / "kd"), student={"path": str(init / "student")},
                     teacher={"path": str(teacher)}, train=student_train),
        "seqkd_generate": _merge(base, method="seqkd", output_dir=str(runs / "seqkd"), teacher={"path": str(teacher)},
                                 student={"path": str(init / "student")}),
        "seqkd": _merge(base, method="seqkd", output_dir=str(runs / "seqkd"), student={"path": str(init / "student")},
                        data={"train": str(seqkd_data)}, train=student_train),
        "minillm": _merge(base, method="minillm", output_dir=str(runs / "minillm"), student={"path": str(sft)},
                          teacher={"path": str(teacher)},
                          train={"lr": 1e-3, "warmup": 0, "max_steps": size.minillm_steps, "batch_size": 16, "grad_accum": 1,
                                 "eval_every": max(1, size.minillm_steps // 4), "save_every": 1000, "select_by": "rouge_l"},
                          minillm={"rollouts_per_step": size.rollouts, "rollout_batch_size": min(size.rollouts, 128)}),
    }
    models = {name: str(runs / name / "best") for name in ("teacher", "sft", "kd", "seqkd", "minillm")}
    raw["eval"] = _merge(base, output_dir=str(out), teacher={"path": str(teacher)},
                         eval={"models": models, "test": {"task": str(data["test"]), "long": str(data["test_long"])},
                               "seeds": list(size.seeds), "max_examples": size.eval_examples, "batch_size": 32,
                               # ExAccErr where generations are long: the long-answer prompts (65-81
                               # tokens + EOS), 8 draws per prompt, both protocols; l_max = the shortest
                               # answer, so a fixed-length draw that ends before it is a wrong early stop
                               "exposure_bias": True, "exposure_test": "long", "exposure_protocols": ["fixed_length", "length_fair"],
                               "exposure_max_len": size.exposure_len, "exposure_samples": 8, "exposure_max_prompts": size.exposure_prompts,
                               "out": str(out / "eval")})
    cfgs = {name: config_from_dict(d) for name, d in raw.items()}
    for name in ("teacher", "sft", "kd", "seqkd", "minillm"):
        cfgs[name].validate_for_training()
    return cfgs


def run_demo(out: Path, quick: bool = False, device: str = "auto", seed: int = 10, progress: Any = None,
             size: str | None = None, seeds: int | None = None, readme: Path | None = None) -> str:
    """Run the whole study under ``out``; return the comparison table (Markdown).

    ``size``: quick, default or large (``quick=True`` is the same as ``size="quick"``). ``seeds``:
    whole-pipeline seeds ``seed, seed + 1, ...`` (default: the size's); with more than one, each
    runs in ``out/seed_S`` and the summary over them goes to ``out/summary.json`` and
    ``out/demo_table.md``; ``readme`` gets that table between its demo-table markers."""
    from minillm import demo_table

    name = size or ("quick" if quick else "default")
    dims = SIZES[name]
    n = dims.pipeline_seeds if seeds is None else seeds
    if n < 1:
        raise UserError(f"--seeds {n}: give at least one pipeline seed")
    out = Path(out)
    if readme is not None:
        demo_table.readme_section(Path(readme).read_text(), str(readme))  # refuse before hours of work, not after
    t0 = time.perf_counter()
    ps = demo_table.pipeline_seeds(seed, n)
    folders = {s: out if n == 1 else out / f"seed_{s}" for s in ps}
    tables = []
    for i, s in enumerate(ps):
        if n > 1:
            log.info("demo: pipeline seed %d (%d of %d) in %s", s, i + 1, n, folders[s])
        tables.append(run_pipeline(folders[s], dims, name, device, s, progress))
    opts = [] if name == "default" else [f"--size {name}"]
    opts += [] if seed == 10 else [f"--seed {seed}"]
    opts += [] if seeds is None else [f"--seeds {n}"]
    command = " ".join(["minillm demo", *opts])
    summary = demo_table.summarize({s: folders[s] / "eval" for s in ps})
    if n > 1:  # the exposure curves of every pipeline seed together: mean ± std bands, both protocols
        from minillm.report import write_report

        write_report([folders[s] / "eval" for s in ps], out / "report")
    machine = None if device in ("auto", "cpu") else device
    block = demo_table.write_outputs(out, summary, command, time.perf_counter() - t0, machine)
    if readme is not None:
        demo_table.update_readme(Path(readme), block)
    if n == 1:
        return tables[0]
    return (f"{block}\nper-seed folders: {', '.join(str(f) for f in folders.values())}\ntable: {out / 'demo_table.md'}\n"
            f"report over the seeds: {out / 'report' / 'report.html'}")


def study_setup(out: Path, dims: DemoSize, name: str, device: str, seed: int) -> tuple[dict[str, Config], dict[str, Path]]:
    """Stage 1 under ``out`` (the task's data, the initial models) and every stage's config
    (:func:`study_configs`); also the start of ``minillm sweep --demo``."""
    from minillm.data.task import corpus_texts, write_task
    from minillm.tiny import build_word_tokenizer, save_pair, tiny_gpt2

    data = write_task(out / "data", seed, dims.n_train, dims.n_valid, dims.n_test, long_rounds=dims.long_rounds)
    tok = build_word_tokenizer(corpus_texts())
    init = out / "models" / name
    if not (init / "student" / "config.json").exists():
        save_pair(tiny_gpt2(tok, *dims.teacher, n_head=4, seed=seed), tok, init / "teacher")
        save_pair(tiny_gpt2(tok, *dims.student, n_head=4, seed=seed + 1), tok, init / "student")
    return study_configs(out, dims, init, data, device, seed), data


def train_stages(cfgs: dict[str, Config], names: tuple[str, ...], progress: Any = None,
                 timings: dict[str, float] | None = None) -> None:
    """Train the named stages in order, reusing each finished one (see :func:`_stage`)."""
    for stage in names:
        _stage(stage, cfgs[stage], progress, timings if timings is not None else {})


def run_pipeline(out: Path, dims: DemoSize, name: str, device: str, seed: int, progress: Any = None) -> str:
    """One whole pipeline (data, teacher, students, evaluation, toy, report) under ``out``."""
    from minillm.eval.runner import run_eval
    from minillm.generate_data import run_generate
    from minillm.report import write_report
    from minillm.toy import run_toy

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cfgs, data = study_setup(out, dims, name, device, seed)
    timings["data"] = time.perf_counter() - t0

    train_stages(cfgs, ("teacher", "sft", "kd"), progress, timings)
    t1 = time.perf_counter()
    log.info("demo: stage seqkd_generate (teacher samples for SeqKD)")
    run_generate(cfgs["seqkd_generate"], out=cfgs["seqkd"].data.train, samples=1, which="teacher", progress=progress)
    timings["seqkd_generate"] = time.perf_counter() - t1
    train_stages(cfgs, ("seqkd", "minillm"), progress, timings)

    t2 = time.perf_counter()
    log.info("demo: stage eval (%d models x %d sampling seeds)", len(cfgs["eval"].eval.models), len(cfgs["eval"].eval.seeds))
    table = run_eval(cfgs["eval"], progress=progress)
    timings["eval"] = time.perf_counter() - t2
    run_toy(out / "toy")  # the paper's Figure 2: mode-covering forward KL vs mode-seeking reverse KL
    runs = [Path(cfgs[n].output_dir) for n in ("teacher", "sft", "kd", "seqkd", "minillm")]
    report = write_report([out / "eval", out / "toy", *runs], out / "report")
    timings["total"] = time.perf_counter() - t0
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    stage_times = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    return f"{table}\n\nstage times: {stage_times}\nreport: {report}\nnext: point configs/gpt2-minillm.yaml at your own models (README, Quick start)"
