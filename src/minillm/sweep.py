"""`minillm sweep`: a grid of runs from one base config, trained one after another, evaluated, reported.

A **sweep file** is a run config with a ``sweep:`` section (``configs/sweeps/`` holds the paper's)::

    sweep:
      base: ../paper/gpt2/minillm-base.yaml  # the run config every run starts from (relative to this file)
      out: runs/sweeps/alpha                 # the sweep folder: out/<run name>/ per run, out/report/
      grid:                                  # runs = the cartesian product of the axes, in this order
        minillm.alpha: [0, 0.1, 0.2]         # a key axis: values of one dotted key -> runs alpha=0, ...
        variant:                             # a named axis: label -> overrides -> runs named by label
          full: {}
          no_length_norm: {minillm.length_norm: false}
      reference: full                        # the ablation table's drops are from this label
      seqkd_prompts: data/dolly/train.jsonl  # SeqKD runs: `minillm generate` their data.train from these prompts first
      demo: true                             # --demo may run this grid on the demo's task (default true)
    eval:                                    # every other top-level key: run config keys for all runs
      test: {dolly: data/dolly/test.jsonl}

A named axis's level may hold ``base: FILE`` (that run starts from another config, e.g. SeqKD's
recipe), and a string value may name another axis's label of the same run as ``{axis}`` (e.g.
``data.train: data/dolly/seqkd-{teacher}.jsonl``). A run's config is, in order: its base, the
file's shared keys, the command line's ``key=value`` overrides, its grid levels, and
``output_dir = out/<run name>``. ``--grid key=v1,v2`` adds a key axis (or replaces the file's axis
of that key). Every run's config is built and validated before anything runs; errors name the
sweep file's line.

A run is **finished** when ``summary.json`` exists and its config.yaml equals the planned config
(keys that do not change results, such as ``train.progress`` and ``train.report_to``, aside); a
finished run is not retrained, an unfinished one resumes from its last checkpoint. With
``eval.test`` set, each run's ``best/`` is evaluated into ``out/<run>/eval`` (skipped when its
results.json is newer than the run and has the same config). Then ``out/sweep.json`` (the plan and
what happened) and the report (``out/report/``: the ablation table, metric-vs-value plots,
overlaid training curves; :mod:`minillm.report`) are written.

``--print-commands`` prints, instead of running, one line per run (``minillm train ... && minillm
eval ...``) for a scheduler or a Slurm job array, after the ``minillm generate`` lines SeqKD runs
need first; rerunning ``minillm sweep`` afterwards skips the finished runs and writes the report.

``--demo``: the grid runs on the demo's task (:mod:`minillm.demo`): the base is the demo's MiniLLM
stage with L_PT on the task's corpus (so "without L_PT" means something), its teacher and SFT
student are trained first in ``demo-<size>/`` beside the sweep folder (reused when finished, so
the sweeps of one size share them), and the runs are evaluated as the demo evaluates (without
exposure bias). The sweep file's base, shared keys and ``seqkd_prompts``
are not used then.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minillm.config import (
    Config,
    config_from_dict,
    config_hash,
    flat_keys,
    parse_override,
    read_yaml,
    set_key,
)
from minillm.errors import UserError

log = logging.getLogger("minillm")

SWEEP_KEYS = ("base", "out", "grid", "reference", "seqkd_prompts", "demo")
_LABEL = re.compile(r"^[A-Za-z0-9_.+=-]+$")
_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# keys that change how a run is shown, not what it computes: ignored when deciding a run is finished
PRESENTATION = ("train.progress", "train.resume", "train.report_to", "train.log_every", "train.wandb_project",
                "train.wandb_mode")


@dataclass
class Override:
    """One dotted key set to a value, and where it was set (``file:line`` or a command-line flag)."""

    key: str
    value: Any
    where: str
    grid: bool = False  # set by a grid level (not shared by every run)


@dataclass
class Level:
    """One value of an axis: its label (the run-name part) and the overrides it sets."""

    label: str
    overrides: list[Override]
    base: Path | None = None  # a named level's own base config
    value: Any = None  # a key axis's value


@dataclass
class Axis:
    name: str
    key: str | None  # the dotted key of a key axis; None for a named axis
    levels: list[Level]
    where: str


@dataclass
class Run:
    name: str
    levels: dict[str, str]  # axis -> label
    base: Path | None
    overrides: list[Override]  # shared, command line, then grid: applied in this order over the base
    cfg: Config
    eval_cfg: Config | None

    @property
    def dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def grid_overrides(self) -> dict[str, Any]:
        return {o.key: o.value for o in self.overrides if o.grid}


@dataclass
class Sweep:
    name: str
    source: str
    out: Path
    axes: list[Axis]
    runs: list[Run]
    reference: tuple[str, str] | None  # (axis, label) the ablation table's drops are measured from
    seqkd_prompts: str | None
    demo: Any = None  # the DemoSize of --demo
    demo_size: str | None = None
    demo_stages: dict[str, Config] = field(default_factory=dict)  # the demo's stage configs (--demo)


# ---------------------------------------------------------------------------------------------
# Loading


def _flatten(node: Any, path: list[str], yaml_key: str, lines: dict[str, int], source: str, grid: bool = False) -> list[Override]:
    """Leaves of a nested mapping as dotted overrides (a key may itself hold dots: ``minillm.alpha``)."""
    out: list[Override] = []
    for k, v in node.items():
        sub_path, sub_yaml = path + str(k).split("."), f"{yaml_key}.{k}" if yaml_key else str(k)
        if isinstance(v, dict) and v:
            out += _flatten(v, sub_path, sub_yaml, lines, source, grid)
        else:
            where = f"{source}:{lines[sub_yaml]}" if sub_yaml in lines else source
            out.append(Override(".".join(sub_path), v, where, grid))
    return out


def _format_value(value: Any) -> str:
    """The override text that :func:`minillm.config.parse_override` reads back as ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].strip()
    return text


def _label_text(value: Any) -> str:
    text = _format_value(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "x"


def _at(source: str, lines: dict[str, int], key: str) -> str:
    return f"{source}:{lines[key]}" if key in lines else source


def _split_values(raw: str) -> list[str]:
    """``0,0.1,[1, 2]`` -> ``["0", "0.1", "[1, 2]"]``: commas inside brackets or braces do not split."""
    parts, depth, cur = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_grid(item: str) -> Axis:
    """``--grid minillm.alpha=0,0.1`` -> a key axis (values read as YAML scalars, as overrides are)."""
    if "=" not in item:
        raise UserError(f"--grid {item!r}: expected key=v1,v2,... e.g. --grid minillm.alpha=0,0.2")
    key, raw = item.split("=", 1)
    values = [parse_override(f"{key}={v}")[1] for v in _split_values(raw)]
    if not key.strip() or not raw.strip():
        raise UserError(f"--grid {item!r}: needs a key and at least one value")
    where = f"--grid {item!r}"
    return Axis(key.strip(), key.strip(), [Level(_label_text(v), [], value=v) for v in values], where)


def _axes(grid: Any, source: str, lines: dict[str, int], here: Path) -> list[Axis]:
    if grid is None:
        return []
    if not isinstance(grid, dict):
        raise UserError(f"{_at(source, lines, 'sweep.grid')}: sweep.grid: expected a mapping of axes "
                        "(key: [values] or name: {label: {overrides}})")
    axes = []
    for name, spec in grid.items():
        ykey = f"sweep.grid.{name}"
        where = _at(source, lines, ykey)
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{where}: sweep.grid.{name}: needs at least one value")
            axes.append(Axis(str(name), str(name), [Level(_label_text(v), [], value=v) for v in spec], where))
        elif isinstance(spec, dict):
            if not _AXIS.match(str(name)):
                raise UserError(f"{where}: sweep.grid.{name}: a named axis needs a plain name (letters, digits, _); "
                                "a key axis takes a list of values")
            if not spec:
                raise UserError(f"{where}: sweep.grid.{name}: needs at least one level")
            levels = []
            for label, body in spec.items():
                lkey = f"{ykey}.{label}"
                lwhere = _at(source, lines, lkey)
                if not _LABEL.match(str(label)):
                    raise UserError(f"{lwhere}: sweep.grid.{name}.{label}: a label may hold letters, digits and _ . + = - only")
                body = {} if body is None else body
                if not isinstance(body, dict):
                    raise UserError(f"{lwhere}: sweep.grid.{name}.{label}: expected a mapping of overrides, got {body!r}")
                body = dict(body)
                base = body.pop("base", None)
                if base is not None and not isinstance(base, str):
                    raise UserError(f"{_at(source, lines, lkey + '.base')}: sweep.grid.{name}.{label}.base: expected a config path")
                levels.append(Level(str(label), _flatten(body, [], lkey, lines, source, grid=True),
                                    base=_relative(here, base) if base else None))
            axes.append(Axis(str(name), None, levels, where))
        else:
            raise UserError(f"{where}: sweep.grid.{name}: expected a list of values (a key axis) or a mapping "
                            "of labels to overrides (a named axis), got {spec!r}")
    return axes


def _relative(here: Path, path: str) -> Path:
    """``path`` as written in a file of folder ``here`` (``configs/sweeps/../paper/x`` -> ``configs/paper/x``)."""
    return Path(os.path.normpath(here / path))


def _substitute(value: Any, labels: dict[str, str], where: str) -> Any:
    if not isinstance(value, str) or "{" not in value:
        return value
    try:
        return value.format(**labels)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"{where}: {value!r}: {{...}} must name an axis of the grid ({', '.join(labels)}); {e}") from None


def _run_name(axes: list[Axis], levels: list[Level]) -> str:
    parts = []
    for axis, level in zip(axes, levels):
        if axis.key is None:
            parts.append(level.label)
        else:
            short = axis.key.split(".")[-1]
            clash = sum(a.key is not None and a.key.split(".")[-1] == short for a in axes) > 1
            parts.append(f"{axis.key if clash else short}={level.label}")
    return "+".join(parts) or "run"


def _base_dict(base: Path | None, cache: dict[Path, tuple[dict[str, Any], dict[str, int]]]) -> tuple[dict[str, Any], dict[str, int]]:
    if base is None:
        return {}, {}
    if base not in cache:
        cache[base] = read_yaml(base)
    data, lines = cache[base]
    return copy.deepcopy(data), lines


def _build_run(base_data: dict[str, Any], base_lines: dict[str, int], base_src: str, overrides: list[Override], out: Path) -> Config:
    data = copy.deepcopy(base_data)
    where: dict[str, int | str] = dict(base_lines)
    for o in overrides:
        set_key(data, o.key.split("."), copy.deepcopy(o.value))
        parts = o.key.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if i == len(parts) or prefix not in where:
                where[prefix] = o.where
    data["output_dir"] = str(out)
    return config_from_dict(data, base_src, where)


def load_sweep(path: str | Path, grid: list[str] | None = None, overrides: list[str] | None = None,
               out: str | Path | None = None, demo: Any = None, demo_size: str | None = None, device: str | None = None,
               demo_dir: str | Path | None = None) -> Sweep:
    """Read a sweep file (or a plain run config, with ``grid``), build and validate every run's config.

    ``demo``: a :class:`minillm.demo.DemoSize` to run the grid on the demo's task (``demo_size`` names
    it; ``device`` is the demo's device; ``demo_dir`` holds its data, teacher and SFT student,
    default ``demo-<size>`` beside the sweep folder, so sweeps of one size share them)."""
    p = Path(path)
    data, lines = read_yaml(p)
    source, here = str(p), p.parent
    section = data.pop("sweep", None)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise UserError(f"{_at(source, lines, 'sweep')}: sweep: expected a mapping with {', '.join(SWEEP_KEYS)}")
    for k in section:
        if k not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(k), SWEEP_KEYS, n=1)
            hint = f"; did you mean 'sweep.{close[0]}'?" if close else f"; valid keys: {', '.join(SWEEP_KEYS)}"
            raise UserError(f"{_at(source, lines, f'sweep.{k}')}: unknown key 'sweep.{k}'{hint}")
    for k in ("base", "out", "reference", "seqkd_prompts"):
        if section.get(k) is not None and not isinstance(section[k], str):
            raise UserError(f"{_at(source, lines, f'sweep.{k}')}: sweep.{k}: expected a string, got {section[k]!r}")
    if not isinstance(section.get("demo", True), bool):
        raise UserError(f"{_at(source, lines, 'sweep.demo')}: sweep.demo: expected true or false")

    axes = _axes(section.get("grid"), source, lines, here)
    for item in grid or []:
        axis = parse_grid(item)
        same = [i for i, a in enumerate(axes) if a.key == axis.key]
        if same:
            axes[same[0]] = axis
        else:
            axes.append(axis)
    if not axes:
        raise UserError(f"{source}: no grid: add a sweep.grid section or give --grid key=v1,v2")
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise UserError(f"{source}: two grid axes share a name ({', '.join(names)})")

    swept = {o.key for a in axes for lv in a.levels for o in lv.overrides} | {a.key for a in axes if a.key}
    cli = []
    for item in overrides or []:
        key, value = parse_override(item)
        dotted = ".".join(key)
        if dotted in swept:
            raise UserError(f"command-line override {item!r}: {dotted} is swept by the grid; change its values with --grid {dotted}=...")
        cli.append(Override(dotted, value, f"command-line override {item!r}"))

    stem = p.stem if section else f"{p.stem}-sweep"
    demo_mode = demo is not None
    if demo_mode and not section.get("demo", True):
        raise UserError(f"{_at(source, lines, 'sweep.demo')}: this sweep does not run on the demo's task (sweep.demo: false)")
    sweep_out = Path(out) if out is not None else Path(section.get("out") or f"runs/sweeps/{stem}{'-demo' if demo_mode else ''}")
    shared = [] if demo_mode else _flatten(data, [], "", lines, source)
    if section:
        base_path = _relative(here, section["base"]) if section.get("base") else None
    else:  # a plain run config: it is the base
        base_path, shared = p, []
    demo_base: dict[str, Any] = {}
    demo_stages: dict[str, Config] = {}
    if demo_mode:
        folder = Path(demo_dir) if demo_dir else sweep_out.parent / f"demo-{demo_size or 'default'}"
        demo_stages, demo_base = _demo_base(folder, demo, demo_size or "default", device or "auto")
        base_path = None

    cache: dict[Path, tuple[dict[str, Any], dict[str, int]]] = {}
    runs: list[Run] = []
    for combo in itertools.product(*[a.levels for a in axes]):
        labels = {a.name: lv.label for a, lv in zip(axes, combo)}
        name = _run_name(axes, list(combo))
        grid_ov: list[Override] = []
        base = base_path
        for axis, lv in zip(axes, combo):
            if axis.key is not None:
                grid_ov.append(Override(axis.key, lv.value, axis.where, grid=True))
            for o in lv.overrides:
                grid_ov.append(Override(o.key, _substitute(o.value, labels, o.where), o.where, grid=True))
            if lv.base is not None and not demo_mode:
                base = lv.base
        ov = shared + cli + grid_ov
        run_dir = sweep_out / name
        if demo_mode:
            b_data, b_lines, b_src = copy.deepcopy(demo_base), {}, f"the demo's MiniLLM stage (--demo {demo_size or 'default'})"
        else:
            b_data, b_lines = _base_dict(base, cache)
            b_src = str(base) if base is not None else source
        cfg = _build_run(b_data, b_lines, b_src, ov, run_dir)
        try:
            cfg.validate_for_training()
        except UserError as e:
            raise UserError(f"run {name}: {e}") from None
        runs.append(Run(name, labels, base, ov, cfg, _eval_config(cfg, name)))
    if len({r.name for r in runs}) != len(runs):
        raise UserError(f"{source}: two runs of the grid get the same name; give the levels distinct labels")

    ref = _reference(section.get("reference"), axes, _at(source, lines, "sweep.reference"), bool(grid))
    return Sweep(stem if section else p.stem, source, sweep_out, axes, runs, ref,
                 None if demo_mode else section.get("seqkd_prompts"), demo, demo_size, demo_stages)


def _reference(label: str | None, axes: list[Axis], where: str, cli_grid: bool) -> tuple[str, str] | None:
    """The (axis, label) of ``sweep.reference``; default: the first level of the first named axis."""
    named = [a for a in axes if a.key is None]
    for a in axes:
        if label is not None and label in [lv.label for lv in a.levels]:
            return a.name, label
    if label is None or cli_grid:  # --grid may have replaced the reference's axis
        if label is not None:
            log.warning("%s: sweep.reference %r is no level of this grid; the ablation table is left out", where, label)
            return None
        return (named[0].name, named[0].levels[0].label) if named else None
    choices = [lv.label for a in axes for lv in a.levels]
    raise UserError(f"{where}: sweep.reference: {label!r} is no level of the grid; choose one of {choices}")


def _eval_config(cfg: Config, name: str) -> Config | None:
    """The run's own config evaluating its ``best/`` into ``out/<run>/eval`` (None without eval.test)."""
    if not cfg.eval.test:
        return None
    run_dir = Path(cfg.output_dir)
    ev = dataclasses.replace(cfg.eval, models={name: str(run_dir / "best")}, out=str(run_dir / "eval"))
    return dataclasses.replace(cfg, eval=ev)


def _non_default(d: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that differ from ``default`` (nested sections compared key by key)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        dv = default.get(k)
        if isinstance(v, dict) and isinstance(dv, dict) and dv:
            sub = _non_default(v, dv)
            if sub:
                out[k] = sub
        elif v != dv:
            out[k] = v
    return out


def _demo_base(folder: Path, size: Any, size_name: str, device: str) -> tuple[dict[str, Config], dict[str, Any]]:
    """The demo's stage configs (its data and initial models written under ``folder``), and its
    MiniLLM stage as a base dict (only what differs from the defaults, so a recipe or a grid key
    still applies) with L_PT on the task's corpus and the demo's evaluation keys (no exposure bias)."""
    from minillm.demo import study_setup

    cfgs, data = study_setup(folder, size, size_name, device, seed=10)
    defaults = Config().to_dict()
    base = _non_default(cfgs["minillm"].to_dict(), defaults)
    base.pop("eval", None)
    base.pop("output_dir", None)
    base.setdefault("data", {})["pretrain"] = str(data["pretrain"])
    ev = dataclasses.replace(cfgs["eval"].eval, exposure_bias=False, models={}, out=None)
    base["eval"] = _non_default(dataclasses.asdict(ev), dataclasses.asdict(type(ev)()))
    return cfgs, base


# ---------------------------------------------------------------------------------------------
# Commands


def _command(verb: str, base: Path | None, overrides: list[tuple[str, Any]], extra: list[str] = ()) -> str:  # type: ignore[assignment]
    args = ["minillm", verb, str(base)] + [f"{k}={_format_value(v)}" for k, v in overrides] + list(extra)
    return " ".join(shlex.quote(a) for a in args)


def _run_overrides(run: Run) -> list[tuple[str, Any]]:
    return [(o.key, o.value) for o in run.overrides] + [("output_dir", str(run.dir))]


def print_commands(sweep: Sweep) -> str:
    """The sweep as shell lines: ``minillm generate`` lines for SeqKD data first, then one
    ``minillm train ... && minillm eval ...`` line per run (a job array's tasks)."""
    if sweep.demo is not None:
        raise UserError("--print-commands with --demo: the demo's sweep runs here (its teacher and SFT student are "
                        "trained first); drop --print-commands")
    lines = [f"# minillm sweep {sweep.source}: {len(sweep.runs)} runs into {sweep.out}"]
    gens = _seqkd_jobs(sweep)
    if gens:
        lines.append("# 1. SeqKD data, once per teacher, before the runs that train on it")
        for target, run in gens.items():
            ov = [kv for kv in _run_overrides(run) if kv[0] not in ("data.train", "output_dir")] + [("data.train", sweep.seqkd_prompts)]
            lines.append(_command("generate", run.base, ov, ["--model", "teacher", "--out", target]))
        lines.append("# 2. the runs, one per line")
    for run in sweep.runs:
        cmd = _command("train", run.base, _run_overrides(run))
        if run.eval_cfg is not None:
            ev = run.eval_cfg.eval
            cmd += " && " + _command("eval", run.base, _run_overrides(run) + [("eval.models", dict(ev.models)), ("eval.out", ev.out)])
        lines.append(cmd)
    lines.append(f"# then: minillm sweep {shlex.quote(sweep.source)} --out {shlex.quote(str(sweep.out))} (skips finished runs, writes the report)")
    return "\n".join(lines)


def _seqkd_jobs(sweep: Sweep) -> dict[str, Run]:
    """SeqKD data files to write, each with the first run that trains on it."""
    if not sweep.seqkd_prompts:
        return {}
    jobs: dict[str, Run] = {}
    for run in sweep.runs:
        if run.cfg.method == "seqkd" and run.cfg.data.train and run.cfg.data.train != sweep.seqkd_prompts:
            jobs.setdefault(run.cfg.data.train, run)
    return jobs


# ---------------------------------------------------------------------------------------------
# Running


def _result_hash(cfg: Config) -> str:
    c = copy.deepcopy(cfg)
    defaults = Config()
    for dotted in PRESENTATION:
        section, key = dotted.split(".")
        setattr(getattr(c, section), key, getattr(getattr(defaults, section), key))
    return config_hash(c)


def run_state(run: Run) -> str:
    """``finished``, ``partial`` (checkpoints of this config: training resumes) or ``new``; a folder
    holding another config is refused with the keys that differ."""
    saved = run.dir / "config.yaml"
    if not saved.exists():
        return "new"
    try:
        old = config_from_dict(yaml.safe_load(saved.read_text()) or {})
    except (UserError, yaml.YAMLError):
        old = None
    if old is not None and _result_hash(old) == _result_hash(run.cfg):
        return "finished" if (run.dir / "summary.json").exists() else "partial"
    if old is None or not (run.dir / "checkpoints").is_dir():
        return "new"
    a, b = flat_keys(old.to_dict()), flat_keys(run.cfg.to_dict())
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in PRESENTATION]
    run_length = {"train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.keep_last"}
    if set(changed) <= run_length:
        return "partial"  # the trainer resumes and runs to the new length
    raise UserError(f"{run.dir}: holds run {run.name} with another config ({', '.join(changed[:6])} differ); "
                    "delete that folder to rerun it, or give the sweep another --out")


def _eval_done(run: Run) -> bool:
    assert run.eval_cfg is not None
    results = Path(str(run.eval_cfg.eval.out)) / "results.json"
    summary = run.dir / "summary.json"
    if not results.exists() or not summary.exists() or results.stat().st_mtime < summary.stat().st_mtime:
        return False
    try:
        saved = json.loads(results.read_text()).get("config")
        return isinstance(saved, dict) and _result_hash(config_from_dict(saved)) == _result_hash(run.eval_cfg)
    except (json.JSONDecodeError, UserError):
        return False


def run_sweep(sweep: Sweep, progress: Any = None) -> str:
    """Train and evaluate every run not finished yet, one after another; write ``sweep.json`` and the
    report; return the sweep's tables (Markdown) and the report's path."""
    from minillm.eval.runner import run_eval
    from minillm.generate_data import run_generate
    from minillm.report import sweep_markdown, write_report
    from minillm.trainer import train

    sweep.out.mkdir(parents=True, exist_ok=True)
    states = {run.name: run_state(run) for run in sweep.runs}  # refuse a clashing folder before any work
    if sweep.demo_stages:
        from minillm.demo import train_stages

        log.info("sweep: the demo's teacher and SFT student (%s)", Path(sweep.demo_stages["teacher"].output_dir).parent)
        train_stages(sweep.demo_stages, ("teacher", "sft"), progress)
    for target, run in _seqkd_jobs(sweep).items():
        if states[run.name] != "finished":
            log.info("sweep: SeqKD data %s from %s's teacher", target, run.name)
            gen = dataclasses.replace(run.cfg, data=dataclasses.replace(run.cfg.data, train=sweep.seqkd_prompts))
            run_generate(gen, out=target, samples=1, which="teacher", progress=progress)
    done: dict[str, dict[str, str]] = {}
    for i, run in enumerate(sweep.runs, 1):
        status = {"train": "reused" if states[run.name] == "finished" else "trained", "eval": "none"}
        if states[run.name] == "finished":
            log.info("sweep: run %d/%d %s is finished (%s); skipped", i, len(sweep.runs), run.name, run.dir)
        else:
            log.info("sweep: run %d/%d %s (%s)", i, len(sweep.runs), run.name, run.dir)
            train(run.cfg, progress=progress)
        if run.eval_cfg is not None:
            if _eval_done(run):
                status["eval"] = "reused"
            else:
                log.info("sweep: evaluating %s", run.name)
                run_eval(run.eval_cfg, progress=progress)
                status["eval"] = "done"
        done[run.name] = status
    write_manifest(sweep, done)
    report = write_report([sweep.out], sweep.out / "report")
    return f"{sweep_markdown(sweep.out)}\n\nreport: {report}"


def write_manifest(sweep: Sweep, status: dict[str, dict[str, str]]) -> dict[str, Any]:
    """``out/sweep.json``: the axes, the reference level and every run (folder, levels, grid
    overrides, evaluation folder, what this invocation did); the report reads it."""
    manifest = {
        "name": sweep.name, "file": sweep.source, "demo": sweep.demo_size if sweep.demo is not None else None,
        "axes": [{"name": a.name, "key": a.key, "labels": [lv.label for lv in a.levels],
                  "values": [lv.value for lv in a.levels] if a.key else None} for a in sweep.axes],
        "reference": {"axis": sweep.reference[0], "label": sweep.reference[1]} if sweep.reference else None,
        "runs": [{"name": r.name, "dir": str(r.dir), "levels": r.levels, "overrides": r.grid_overrides(),
                  "eval": r.eval_cfg.eval.out if r.eval_cfg is not None else None, "status": status.get(r.name, {})}
                 for r in sweep.runs],
    }
    (sweep.out / "sweep.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
