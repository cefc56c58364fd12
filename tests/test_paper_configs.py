"""Every shipped recipe under configs/ loads, validates for training, states only non-defaults,
carries the reference scripts' hyper-parameters, and forms a runnable pipeline (each run folder it
reads is the ``best/`` of another recipe)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from minillm.config import Config, flat_keys, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] != "sweeps")  # every run config: loads, restates no default (sweep files: test_sweep.py)
# the paper's recipes (configs/examples/ holds recipes for other model pairs, checked for loading only)
RECIPES = [p for p in ALL if p.relative_to(CONFIGS).parts[0] != "examples"]
_MISSING = object()

# (learning rate, epochs) of every baseline-style run: LMOps minillm/scripts/{family}/{sft,kd,seqkd}/*.sh.
# All of them use 32 sequences per optimizer step, cosine decay, no warm-up.
BASELINES = {
    "gpt2": {"xl": (5e-5, 10), "base": (5e-4, 20), "medium": (1e-4, 20), "large": (1e-4, 10)},
    "opt": {"13b": (1e-5, 10), "1.3b": (5e-5, 10), "2.7b": (5e-5, 10), "6.7b": (1e-5, 10)},
    "llama": {"13b": (1e-5, 10), "7b": (1e-5, 10)},
}
TEACHER = {"gpt2": "xl", "opt": "13b", "llama": "13b"}
STUDENTS = {"gpt2": ["base", "medium", "large"], "opt": ["1.3b", "2.7b", "6.7b"], "llama": ["7b"]}
KD_LR = {("gpt2", "base"): 5e-4, ("gpt2", "medium"): 1e-4, ("gpt2", "large"): 1e-4,
         ("opt", "1.3b"): 5e-5, ("opt", "2.7b"): 5e-5, ("opt", "6.7b"): 1e-5, ("llama", "7b"): 1e-5}


def redeclared_defaults(path: Path) -> list[str]:
    """Dotted keys that ``path`` sets to the dataclass default (compared after type coercion)."""
    raw = yaml.safe_load(path.read_text()) or {}
    resolved = load_config(path).to_dict()
    defaults = Config().to_dict()
    found: list[str] = []

    def walk(node: dict[str, Any], res: dict[str, Any], dflt: Any, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            d = dflt.get(k, _MISSING) if isinstance(dflt, dict) else _MISSING
            if isinstance(v, dict) and v and isinstance(d, dict):
                walk(v, res[k], d, key + ".")
            elif d is not _MISSING and res[k] == d:
                found.append(key)

    walk(raw, resolved, defaults, "")
    return found


def test_the_recipe_set_is_complete() -> None:
    names = {p.relative_to(CONFIGS).as_posix() for p in RECIPES}
    expected = {f"gpt2-{m}.yaml" for m in ("sft", "kd", "seqkd", "minillm")}
    for fam, students in STUDENTS.items():
        expected.add(f"paper/{fam}/sft-{TEACHER[fam]}.yaml")
        expected |= {f"paper/{fam}/{m}-{s}.yaml" for s in students for m in ("sft", "init", "kd", "seqkd", "minillm")}
    assert names == expected


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_loads_validates_and_states_only_non_defaults(path: Path) -> None:
    cfg = load_config(path)
    if cfg.data.train is not None or not cfg.eval.models:  # an eval-only config trains nothing
        cfg.validate_for_training()
    assert redeclared_defaults(path) == [], "a recipe restates a default from src/minillm/config.py"


def test_redeclared_defaults_detects_restated_values(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    # "5.0e-6" and "100" are the defaults once coerced; {} is data.columns' default; lr_min is not a default
    p.write_text("train:\n  lr: 5.0e-6\n  warmup: 100\n  min_lr: 1.0e-7\ndata:\n  columns: {}\n  train: d.jsonl\n")
    assert sorted(redeclared_defaults(p)) == ["data.columns", "train.lr", "train.warmup"]
    p.write_text("method: minillm\ndata:\n  columns: {prompt: q}\nminillm:\n  alpha: 0.3\n")
    assert redeclared_defaults(p) == []


def test_defaults_are_the_paper_minillm_setting() -> None:
    """The dataclass defaults the MiniLLM recipes rely on (Gu et al. 2024, App. B)."""
    c = Config()
    t, m, d = c.train, c.minillm, c.data
    assert (t.lr, t.schedule, t.warmup, t.max_steps, t.sequences_per_step) == (5e-6, "constant", 100, 5000, 64)
    assert (m.rollouts_per_step, m.ppo_epochs, m.clip, m.alpha) == (256, 4, 0.2, 0.2)
    assert (d.max_prompt_len, d.max_len, c.generation.temperature, c.kd.ratio) == (256, 512, 1.0, 0.5)


@pytest.mark.parametrize("fam", sorted(STUDENTS))
def test_reference_hyper_parameters(fam: str) -> None:
    for size, (lr, epochs) in BASELINES[fam].items():
        methods = ["sft"] + (["kd", "seqkd"] if size != TEACHER[fam] else [])
        for method in methods:
            cfg = load_config(CONFIGS / f"paper/{fam}/{method}-{size}.yaml")
            t = cfg.train
            want_lr = KD_LR[(fam, size)] if method != "sft" else lr
            assert (cfg.method, t.lr, t.epochs, t.sequences_per_step) == (method, want_lr, epochs, 32), (fam, method, size)
            assert (t.schedule, t.warmup, t.select_by, t.weight_decay, t.grad_clip) == ("cosine", 0, "rouge_l", 0.01, 1.0)
            if method == "kd":  # --kd-ratio 0.5: half forward KL, half CE on the golden responses
                assert (cfg.kd.ratio, cfg.kd.loss) == (0.5, "forward_kl")
        if size == TEACHER[fam]:
            continue
        init = load_config(CONFIGS / f"paper/{fam}/init-{size}.yaml").train
        assert (init.lr, init.epochs, init.sequences_per_step, init.select_by) == (lr, 3, 32, "loss")
        mini = load_config(CONFIGS / f"paper/{fam}/minillm-{size}.yaml")
        t, m = mini.train, mini.minillm
        assert mini.method == "minillm" and mini.data.pretrain is not None
        assert (t.lr, t.schedule, t.warmup, t.max_steps, t.sequences_per_step, t.select_by) == (5e-6, "constant", 100, 5000, 64, "rouge_l")
        assert (m.rollouts_per_step, m.ppo_epochs, m.clip, m.alpha, m.single_step, m.length_norm) == (256, 4, 0.2, 0.2, True, True)


def test_pipeline_reads_only_what_another_recipe_writes() -> None:
    cfgs = {p.relative_to(CONFIGS).as_posix(): load_config(p) for p in RECIPES}
    producers = {f"{c.output_dir}/best": (name, c) for name, c in cfgs.items()}
    assert len({c.output_dir for c in cfgs.values()}) == len(cfgs), "two recipes share an output_dir"
    for name, cfg in cfgs.items():
        for role in ("teacher", "student"):
            path = getattr(cfg, role).path
            if path is None or not path.startswith("runs/"):
                continue
            assert path in producers, f"{name}: {role}.path {path} is no recipe's output"
            src_name, src = producers[path]
            if role == "teacher":  # the SFT'd teacher, chosen by Rouge-L
                assert src.method == "sft" and src.train.select_by == "rouge_l" and "/sft-" in src_name, name
            else:  # MiniLLM starts from phase 1: SFT chosen by validation loss
                assert cfg.method == "minillm" and "/init-" in src_name and src.train.select_by == "loss", name
        if cfg.method in ("kd", "seqkd", "minillm"):
            assert cfg.teacher.path is not None and cfg.teacher.path.startswith("runs/"), name


def test_data_paths_come_from_prepare_or_generate() -> None:
    for p in RECIPES:
        cfg = load_config(p)
        assert cfg.data.valid == "data/dolly/valid.jsonl", p
        if cfg.method == "seqkd":
            # the header's `minillm generate ... --out FILE` writes exactly the file the recipe trains on
            assert f"--out {cfg.data.train}" in p.read_text(), p
        else:
            assert cfg.data.train == "data/dolly/train.jsonl", p


@pytest.mark.parametrize("method", ["sft", "kd", "seqkd", "minillm"])
def test_default_recipes_equal_the_gpt2_base_paper_recipes(method: str) -> None:
    top = dataclasses.asdict(load_config(CONFIGS / f"gpt2-{method}.yaml"))
    paper = dataclasses.asdict(load_config(CONFIGS / f"paper/gpt2/{method}-base.yaml"))
    assert top.pop("output_dir") == f"runs/gpt2-{method}"
    paper.pop("output_dir")
    diff = {k for k, v in flat_keys(top).items() if flat_keys(paper).get(k, _MISSING) != v}
    assert diff == set()
