"""`minillm report`: one HTML page and one Markdown file over run, evaluation and toy folders.

Inputs (each section appears only when its data exists):

* a **run folder** (``output_dir`` of ``minillm train``): ``config.yaml``, ``metrics.jsonl``,
  ``summary.json``, and maybe ``eval/`` (an evaluation folder) and ``toy/`` (a toy folder);
* an **evaluation folder** (``minillm eval``): ``results.json``; its exposure curves are drawn per
  protocol, ExAccErr(l) beside R(l) and eps(l), and several evaluations of the same exposure settings
  (say, one per whole-pipeline seed of ``minillm demo``) also together, as mean ± std bands;
* a **toy folder** (``minillm toy``): ``toy.json`` and ``toy.png``;
* a **sweep folder** (``minillm sweep``): ``sweep.json`` and its run folders (``<sweep>/<run>/``,
  each with ``eval/``): the sweep section (the ablation table in the paper's layout, metric-vs-value
  plots of every numeric axis, the runs' training curves overlaid);
* a folder holding any of these one or two levels down (e.g. a ``minillm demo`` folder).

Outputs in the report folder: ``report.html`` (inline CSS, PNG files beside it, nothing external),
``report.md`` (the same content) and the PNGs. Every text that reaches the HTML is escaped.
"""

from __future__ import annotations

import html
import json
import logging
import math
import platform
import re
import shutil
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import yaml

from minillm.errors import UserError
from minillm.eval.runner import format_cell

log = logging.getLogger("minillm")

# Training curves, in this order, when a run logged them: metrics.jsonl key -> plot title.
CURVES: dict[str, str] = {
    "loss": "training loss",
    "reverse_kl": "reverse KL estimate (per token)",
    "seq_reverse_kl": "reverse KL estimate (per sequence)",
    "reward": "reward r_t (per token)",
    "response_len": "response length (tokens)",
    "alpha": "teacher-mix strength a",
    "clip_frac": "clip fraction",
    "valid_loss": "validation loss",
    "valid_rouge_l": "validation Rouge-L",
}
# Evaluation metrics, in table order: results key -> column title.
EVAL_METRICS: dict[str, str] = {
    "rouge_l": "Rouge-L",
    "exact_match": "Exact match",
    "dist_4": "Dist-4",
    "self_bleu": "Self-BLEU",
    "lm_loss": "LM loss",
    "length": "Length (tokens)",
    "length_words": "Length (words)",
    "judge": "Judge",
}
_SKIP_DIRS = {"checkpoints", "best", "final", "report", "model", "models", "data"}


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class RunSource:
    """A training run folder."""

    path: Path
    name: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config_text: str | None = None
    summary: dict[str, Any] | None = None


@dataclass
class EvalSource:
    """An evaluation folder's ``results.json``."""

    path: Path
    results: dict[str, Any]
    name: str = ""


@dataclass
class ToySource:
    """A toy folder: ``toy.json`` (maybe absent) and ``toy.png`` (maybe absent)."""

    path: Path
    result: dict[str, Any] | None
    png: Path | None
    name: str = ""


@dataclass
class SweepSource:
    """A sweep folder: ``sweep.json`` (:func:`minillm.sweep.write_manifest`), its runs by name and the
    ``results.json`` of each evaluated run."""

    path: Path
    manifest: dict[str, Any]
    runs: dict[str, RunSource] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = ""


@dataclass
class Sources:
    runs: list[RunSource] = field(default_factory=list)
    evals: list[EvalSource] = field(default_factory=list)
    toys: list[ToySource] = field(default_factory=list)
    sweeps: list[SweepSource] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _is_run(d: Path) -> bool:
    return any((d / f).is_file() for f in ("metrics.jsonl", "summary.json", "config.yaml"))


def _is_eval(d: Path) -> bool:
    return (d / "results.json").is_file()


def _is_toy(d: Path) -> bool:
    return (d / "toy.json").is_file() or (d / "toy.png").is_file()


def _is_sweep(d: Path) -> bool:
    return (d / "sweep.json").is_file()


def _is_any(d: Path) -> bool:
    return _is_run(d) or _is_eval(d) or _is_toy(d) or _is_sweep(d)


def _expand(d: Path, depth: int = 2) -> list[Path]:
    """``d`` itself when it holds report inputs, else its sub-folders that do (``depth`` levels)."""
    if _is_any(d):
        return [d]
    if depth == 0:
        return []
    found: list[Path] = []
    for child in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS and not p.name.startswith(".")):
        found += _expand(child, depth - 1)
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); rerun the command that wrote it") from None


def read_metrics(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl``. A cut-off last line (a run killed mid-write) is dropped with a warning."""
    text = path.read_text()
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                warnings.append(f"{path}:{i}: incomplete last line dropped (the run stopped while writing it)")
                continue
            raise UserError(f"{path}:{i}: not a JSON object ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise UserError(f"{path}:{i}: expected a JSON object with a numeric 'step', got {line[:60]!r}")
        rows.append(row)
    return rows


def collect_sources(dirs: Iterable[Path]) -> Sources:
    """Classify and read every input folder (see the module docstring)."""
    src = Sources()
    seen: set[Path] = set()
    for given in dirs:
        given = Path(given)
        if not given.is_dir():
            raise UserError(f"{given}: not a folder; pass run, evaluation or toy folders")
        found = _expand(given)
        if not found:
            raise UserError(
                f"{given}: no metrics.jsonl, config.yaml, summary.json, results.json or toy.json here or two levels "
                "down; pass a run folder (output_dir of `minillm train`), an evaluation folder or a toy folder"
            )
        for d in found:
            _add_folder(d, src, seen)
    _name_sources(src)
    return src


def _add_folder(d: Path, src: Sources, seen: set[Path], with_eval: bool = True) -> None:
    key = d.resolve()
    if key in seen:
        return
    seen.add(key)
    if _is_sweep(d):
        _add_sweep(d, src, seen)
    if _is_run(d):
        run = RunSource(d)
        if (d / "metrics.jsonl").is_file():
            run.metrics = read_metrics(d / "metrics.jsonl", src.warnings)
        if (d / "config.yaml").is_file():
            run.config_text = (d / "config.yaml").read_text()
        if (d / "summary.json").is_file():
            summary = _read_json(d / "summary.json")
            if not isinstance(summary, dict):
                raise UserError(f"{d / 'summary.json'}: expected a JSON object")
            run.summary = summary
        src.runs.append(run)
        for sub in ("eval", "toy") if with_eval else ("toy",):
            if (d / sub).is_dir() and _is_any(d / sub):
                _add_folder(d / sub, src, seen)
    if _is_eval(d):
        results = _read_json(d / "results.json")
        if not isinstance(results, dict):
            raise UserError(f"{d / 'results.json'}: expected a JSON object")
        src.evals.append(EvalSource(d, results))
    if _is_toy(d):
        result = _read_json(d / "toy.json") if (d / "toy.json").is_file() else None
        src.toys.append(ToySource(d, result, d / "toy.png" if (d / "toy.png").is_file() else None))


def _add_sweep(d: Path, src: Sources, seen: set[Path]) -> None:
    """A sweep and its runs; the runs' evaluations go to the sweep's tables, not to one section each."""
    manifest = _read_json(d / "sweep.json")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list) or not isinstance(manifest.get("axes"), list):
        raise UserError(f"{d / 'sweep.json'}: expected the object `minillm sweep` writes (axes, runs); rerun `minillm sweep`")
    sw = SweepSource(d, manifest)
    for entry in manifest["runs"]:
        name = str(entry.get("name", ""))
        run_dir = d / name  # a run lives in <sweep>/<name>, wherever the sweep was started from
        if not name or not run_dir.is_dir():
            src.warnings.append(f"{d / 'sweep.json'}: run {name!r} has no folder {run_dir}; left out")
            continue
        _add_folder(run_dir, src, seen, with_eval=False)
        found = [r for r in src.runs if r.path.resolve() == run_dir.resolve()]
        if found:
            sw.runs[name] = found[0]
        if (run_dir / "eval" / "results.json").is_file():
            results = _read_json(run_dir / "eval" / "results.json")
            if isinstance(results, dict):
                sw.results[name] = results
    src.sweeps.append(sw)


def _name_sources(src: Sources) -> None:
    """Short unique display names: the folder name, with parents added until names differ."""
    items: list[Any] = [*src.runs, *src.evals, *src.toys, *src.sweeps]
    for depth in range(1, 8):
        names = ["/".join(it.path.resolve().parts[-depth:]) for it in items]
        if len(set(names)) == len(names) or depth == 7:
            break
    for it, name in zip(items, names):
        it.name = name


# ---------------------------------------------------------------------------------------------
# Document: one builder writes HTML and Markdown side by side, escaping in one place.


def _md_text(text: str) -> str:
    """Markdown-safe text: no raw HTML, no accidental emphasis, links or table cells (an underscore
    inside a word, as in ``rouge_l``, cannot start emphasis and stays as it is)."""
    return re.sub(r"[\\`*\[\]<>#|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", lambda m: "\\" + m.group(0), text)


def _md_cell(text: str) -> str:
    return _md_text(text).replace("\n", " ")


_NUMBER = re.compile(r"^(n/a|-|[-+]?\d[\d.,]*(e[-+]?\d+)?( ± \d[\d.]*)?)$")


class Doc:
    """Accumulates report blocks as HTML and Markdown."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.md: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.n_headings = 0

    def heading(self, text: str, level: int = 2) -> None:
        self.n_headings += 1
        anchor = f"s{self.n_headings}"
        if level == 2:
            self.toc.append((anchor, text))
        self.html.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
        self.md.append(f"{'#' * level} {_md_text(text)}\n")

    def para(self, text: str, cls: str | None = None) -> None:
        attr = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{attr}>{html.escape(text)}</p>")
        self.md.append(f"{_md_text(text)}\n")

    def bullets(self, items: Sequence[str], cls: str | None = None) -> None:
        attr = f' class="{cls}"' if cls else ""
        self.html.append(f"<ul{attr}>" + "".join(f"<li>{html.escape(t)}</li>" for t in items) + "</ul>")
        self.md.append("".join(f"- {_md_text(t)}\n" for t in items))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        # numbers right-aligned (a column whose every cell is a number gets a right-aligned header)
        num = [[bool(_NUMBER.match(c)) for c in r] for r in rows]
        col_num = [bool(rows) and all(r[j] for r in num) for j in range(len(headers))]
        cls = {True: ' class="num"', False: ""}
        head = "".join(f"<th{cls[col_num[j]]}>{html.escape(h)}</th>" for j, h in enumerate(headers))
        body = "".join("<tr>" + "".join(f"<td{cls[n]}>{html.escape(c)}</td>" for c, n in zip(r, nr)) + "</tr>"
                       for r, nr in zip(rows, num))
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "".join("---:|" if c else "---|" for c in col_num)]
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
        self.md.append("\n".join(lines) + "\n")

    def image(self, file: str, caption: str) -> None:
        self.html.append(
            f'<figure><img src="{html.escape(quote(file))}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        self.md.append(f"![{_md_cell(caption)}]({quote(file)})\n")

    def code(self, title: str, text: str, lang: str = "") -> None:
        self.html.append(
            f"<details><summary>{html.escape(title)}</summary><pre><code>{html.escape(text)}</code></pre></details>"
        )
        fence = "```"
        while fence in text:
            fence += "`"
        self.md.append(f"**{_md_text(title)}**\n\n{fence}{lang}\n{text.rstrip()}\n{fence}\n")

    def render_html(self, title: str) -> str:
        nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.toc)
        return _HTML.format(title=html.escape(title), nav=nav, body="\n".join(self.html))

    def render_md(self, title: str) -> str:
        return f"# {_md_text(title)}\n\n" + "\n".join(self.md)


_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1rem 1.5rem 3rem; color: #1d2329; background: #fff; line-height: 1.45; }}
h1 {{ border-bottom: 2px solid #2a6db0; padding-bottom: .3rem; }}
h2 {{ margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }}
nav {{ display: flex; flex-wrap: wrap; gap: .4rem 1rem; font-size: .9rem; }}
nav a {{ color: #2a6db0; text-decoration: none; }}
table {{ border-collapse: collapse; margin: .6rem 0 1rem; font-size: .92rem; }}
th, td {{ border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }}
th {{ background: #f3f6f9; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tbody tr:nth-child(even) {{ background: #fafbfc; }}
figure {{ margin: .8rem 0 1.4rem; }}
figure img {{ max-width: 100%; border: 1px solid #e4e8ec; }}
figcaption {{ font-size: .85rem; color: #57606a; }}
details {{ margin: .4rem 0; }}
summary {{ cursor: pointer; font-weight: 600; }}
pre {{ background: #f6f8fa; padding: .7rem; overflow-x: auto; font-size: .82rem; }}
.warn {{ color: #9a4a00; }}
.note {{ color: #57606a; font-size: .9rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
<nav>{nav}</nav>
{body}
<script>
// Marks the body element once every image has loaded (used by the headless-browser test, harmless otherwise).
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) {{ return im.complete && im.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-ok", ok === imgs.length ? "true" : "false");
}});
</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------
# Plots (object-oriented matplotlib on the Agg canvas: no display, no global pyplot state)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in rows if _finite(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_line(ax: Any, xs: Sequence[float], ys: Sequence[float], **kw: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    # Sparse series (eval steps, few rollouts) get markers so single points stay visible.
    ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, ms=3.5, lw=1.4, **kw)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and lengths are whole numbers


def plot_run_curves(run: RunSource, path: Path) -> list[str]:
    """One panel per logged :data:`CURVES` key; returns the keys drawn (empty: nothing written)."""
    return _plot_curves({run.name: run}, path, run.name)


def _plot_curves(runs: dict[str, RunSource], path: Path, title: str | None = None) -> list[str]:
    """One panel per :data:`CURVES` key some run logged, one line per run (a legend when several)."""
    keys = [k for k in CURVES if any(_series(r.metrics, k)[0] for r in runs.values())]
    if not keys:
        return []
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = _figure(4.0 * cols, 2.8 * nrows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for name, run in runs.items():
            xs, ys = _series(run.metrics, key)
            if xs:
                _plot_line(ax, xs, ys, **({"color": "tab:blue"} if len(runs) == 1 else {"label": name}))
        ax.set_title(CURVES[key], fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if i == 0 and len(runs) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return keys


def plot_valid_overlay(runs: Sequence[RunSource], key: str, path: Path) -> bool:
    """``key`` of every run that logged it on one axis (only worth it for two or more runs)."""
    drawn = [(r.name, *_series(r.metrics, key)) for r in runs]
    drawn = [d for d in drawn if d[1]]
    if len(drawn) < 2:
        return False
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    for name, xs, ys in drawn:
        _plot_line(ax, xs, ys, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_title(CURVES[key])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_exposure_bias(curves: dict[str, tuple[list[float], list[float], Any]], path: Path) -> None:
    """ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100 against the generation length l, one line per
    model (the paper's Figure 6)."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for model, (lengths, err, _) in curves.items():
        _plot_line(ax, lengths, err, label=model)
    ax.set_xlabel("generation length l (tokens)")
    ax.set_ylabel("ExAccErr(l) (%)")
    ax.set_title("Excess accumulated error from exposure bias")
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _curve_band(curves: list[dict[str, Any]], key: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Lengths, mean and std over ``curves`` of ``key`` on the lengths every curve has (NaN-aware)."""
    n = min(len(c.get("lengths") or []) for c in curves)
    vals = np.array([[np.nan if not _finite(x) else float(x) for x in (c.get(key) or [])[:n]] for c in curves], dtype=float)
    if vals.size == 0 or vals.shape[1] < n:
        return [], np.array([]), np.array([])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a length where every value is NaN stays NaN
        mean = np.nanmean(vals, axis=0)
        std = np.nanstd(vals, axis=0, ddof=1) if len(curves) > 1 else np.zeros(n)
    return list(range(1, n + 1)), mean, np.nan_to_num(std)


def plot_exposure_protocol(per_model: dict[str, list[dict[str, Any]]], protocol: str, path: Path) -> None:
    """One protocol's exposure curves: ExAccErr(l) beside R(l) and eps(l), one line per model; with
    several curves per model (pipeline seeds) the line is their mean and the band mean ± std."""
    fig = _figure(14, 4)
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    titles = {"ex_acc_err": "ExAccErr(l) (%)", "R": "R(l): student's own draws", "eps": "eps(l): teacher's draws"}
    for model, curves in per_model.items():
        for ax, key in zip(axes, titles):
            xs, mean, std = _curve_band(curves, key)
            if not xs:
                continue
            (line,) = ax.plot(xs, mean, lw=1.4, label=model if len(curves) == 1 else f"{model} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.18, lw=0)
    for ax, (key, title) in zip(axes, titles.items()):
        ax.set_xlabel("generation length l (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "ex_acc_err":
            ax.axhline(0.0, color="0.5", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Exposure bias, {protocol} protocol", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


def plot_calibration(models: dict[str, dict[str, Any]], path: Path) -> None:
    """Reliability diagrams: per confidence bin (its ``lo``/``hi`` edges, else equal widths), accuracy
    (bars) against mean confidence (outline); the diagonal is perfect calibration. Empty bins stay blank."""
    n = len(models)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig = _figure(3.4 * cols, 3.4 * nrows)
    for i, (model, cal) in enumerate(models.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        bins = cal["bins"]
        for b, item in enumerate(bins):
            if not item["count"]:
                continue
            if _finite(item.get("lo")) and _finite(item.get("hi")):
                left, width = float(item["lo"]), float(item["hi"]) - float(item["lo"])
            else:
                left, width = b / len(bins), 1.0 / len(bins)
            ax.bar(left, item["accuracy"], width=width, align="edge", color="tab:blue", alpha=0.75, edgecolor="white")
            ax.bar(left, item["confidence"], width=width, align="edge", fill=False, edgecolor="tab:red", lw=1.2)
        ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{model}  (ECE {cal['ece']:.3f})", fontsize=9)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# Evaluation results


def _cell(value: Any) -> tuple[float, float] | None:
    """A ``summary`` cell ``{"mean", "std", "n"}`` -> (mean, std); None for null (n/a)."""
    if isinstance(value, dict) and _finite(value.get("mean")) and _finite(value.get("std")):
        return float(value["mean"]), float(value["std"])
    return None


def _fmt_cell(cell: tuple[float, float] | None, metric: str) -> str:
    return format_cell({"mean": cell[0], "std": cell[1]} if cell is not None else None, metric)


def eval_tables(results: dict[str, Any], where: Path) -> dict[str, tuple[list[str], dict[str, dict[str, Any]]]]:
    """``{test set: (metric keys, {model: {metric: cell}})}`` from ``results.json``'s ``summary``
    (``{model: {set: {metric: {"mean", "std", "n"} or null}}}``, :mod:`minillm.eval.runner`)."""
    summary = results.get("summary")
    if not isinstance(summary, dict):
        raise UserError(f"{where}: has no 'summary' mapping of model -> test set -> metric; "
                        "is it a `minillm eval` results.json? rerun `minillm eval`")
    shown = results.get("metrics")
    tables: dict[str, tuple[list[str], dict[str, dict[str, Any]]]] = {}
    for model, sets in summary.items():
        if not isinstance(sets, dict):
            raise UserError(f"{where}: summary.{model} must map test sets to metrics")
        for set_name, metrics in sets.items():
            if not isinstance(metrics, dict):
                raise UserError(f"{where}: summary.{model}.{set_name} must map metrics to {{mean, std, n}} or null")
            tables.setdefault(str(set_name), ([], {}))[1][str(model)] = metrics
    for keys, models in tables.values():
        present = list(dict.fromkeys(k for m in models.values() for k in m))
        order = [k for k in shown if k in present] if isinstance(shown, list) else []
        keys += order + [k for k in EVAL_METRICS if k in present and k not in order]
        keys += sorted(k for k in present if k not in keys)
    return tables


def _valid_answers(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``results.json``'s ``valid_answers`` entries that are complete: {model: {set: entry}}."""
    section = results.get("valid_answers")
    out: dict[str, dict[str, dict[str, float]]] = {}
    if isinstance(section, dict):
        for model, sets in section.items():
            good = {str(k): v for k, v in sets.items() if isinstance(v, dict)
                    and all(_finite(v.get(f)) for f in ("distinct", "possible", "valid", "prompts", "samples"))} if isinstance(sets, dict) else {}
            if good:
                out[str(model)] = good
    return out


def _answers_cells(v: dict[str, float]) -> list[str]:
    return [f"{v['distinct']:.2f}", f"{v['possible']:.2f}", f"{v['valid']:.1f}", str(int(v["prompts"])), f"{v['samples']:g}"]


def _comparison(doc: Doc, ev: EvalSource) -> None:
    where = ev.path / "results.json"
    res = ev.results
    for set_name, (keys, models) in eval_tables(res, where).items():
        doc.heading(f"{set_name} ({ev.name})", 3)
        doc.table(["model"] + [EVAL_METRICS.get(k, k) for k in keys],
                  [[model] + [_fmt_cell(_cell(metrics.get(k)), k) for k in keys] for model, metrics in models.items()])
        info = res.get("test_sets", {}).get(set_name) if isinstance(res.get("test_sets"), dict) else None
        notes = []
        if isinstance(info, dict):
            notes.append(f"{info.get('examples', '?')} examples from {info.get('path', '?')} ({info.get('format', '?')} format)")
            if info.get("has_references") is False:
                notes.append("no references: Rouge-L, exact match and LM loss are n/a")
        skipped = {m: s.get(set_name) for m, s in res.get("skipped_long_prompt", {}).items() if isinstance(s, dict)}
        skipped = {m: n for m, n in skipped.items() if isinstance(n, int) and n > 0}
        if skipped:
            notes.append("prompts skipped as too long: " + ", ".join(f"{m} {n}" for m, n in skipped.items()))
        if notes:
            doc.para("; ".join(notes), "note")
    seeds = res.get("seeds")
    n = f"{len(seeds)} sampling seed(s): {', '.join(map(str, seeds))}" if isinstance(seeds, list) and seeds else "sampling seeds"
    doc.para(f"mean ± sample standard deviation over {n}; n/a = not measurable on that test set", "note")
    rows = [[model, set_name, *_answers_cells(v)] for model, sets in _valid_answers(res).items() for set_name, v in sets.items()]
    if rows:
        doc.heading(f"Semantic diversity ({ev.name})", 3)
        doc.table(["model", "test set", "distinct valid answers", "of possible", "valid %", "prompts", "samples"], rows)
        doc.para("on the prompts with several valid answers: per prompt, the distinct valid answers among one response "
                 "per sampling seed (exact match after normalisation); possible = min(samples, answers)", "note")


def _exposure(ev: EvalSource, warnings: list[str]) -> dict[str, tuple[list[float], list[float], dict[str, Any]]]:
    """Per model: (l, ExAccErr(l)) at the lengths where it is defined, and the raw entry."""
    section = ev.results.get("exposure_bias")
    curves: dict[str, tuple[list[float], list[float], dict[str, Any]]] = {}
    if not isinstance(section, dict):
        return curves
    for model, data in section.items():
        lengths = data.get("lengths") if isinstance(data, dict) else None
        err = data.get("ex_acc_err") if isinstance(data, dict) else None
        if not (isinstance(lengths, list) and isinstance(err, list) and len(lengths) == len(err) and lengths):
            warnings.append(f"{ev.path / 'results.json'}: exposure_bias.{model} needs equal-length, non-empty "
                            "'lengths' and 'ex_acc_err' lists; left out of the plot")
            continue
        pts = [(float(x), float(y)) for x, y in zip(lengths, err) if _finite(x) and _finite(y)]
        if len(pts) < len(lengths):  # null = eps(l) was 0 while R(l) was not: the ratio is undefined there
            warnings.append(f"{ev.path / 'results.json'}: exposure_bias.{model}: ExAccErr undefined (null) at "
                            f"{len(lengths) - len(pts)} of {len(lengths)} lengths; those points are not drawn")
        if pts:
            curves[str(model)] = ([p[0] for p in pts], [p[1] for p in pts], data)
    return curves


PROTOCOL_CAPTIONS = {
    "fixed_length": "fixed-length draws (EOS ignored to l_max): ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100 beside "
                    "R(l) = E_{y~q} sum_{t<=l} KL(p||q) and eps(l), the same over y ~ p",
    "length_fair": "draws to EOS: R(l) = sum_{t<=l} of the mean KL(p||q) at t over the student's draws still running, "
                   "eps(l) likewise over the teacher's; a difference in length alone adds nothing",
    "to_eos": "draws to EOS, an ended draw keeping its sum: longer answers add more terms",
}


def _protocol_extra_header(protocol: str) -> list[str]:
    return {"fixed_length": ["student draws ended early", "teacher draws ended early"],
            "length_fair": ["student draws at risk at l", "teacher draws at risk at l"]}.get(protocol, [])


def _protocol_extra(protocol: str, c: dict[str, Any]) -> list[str]:
    keys = {"fixed_length": ("ended_early_student", "ended_early_teacher"),
            "length_fair": ("at_risk_student", "at_risk_teacher")}.get(protocol, ())
    out = []
    for k in keys:
        v = c.get(k)
        v = _last(v) if isinstance(v, list) else v
        out.append(f"{_num(v, '.0f')} of {c.get('n_samples', '?')}")
    return out


def _exposure_protocols(ev: EvalSource, warnings_out: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``exposure_by_protocol`` of one evaluation: protocol -> model -> curve, the curves that can be
    drawn (equal-length, non-empty lists); the others named in the warnings."""
    section = ev.results.get("exposure_by_protocol")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if not isinstance(section, dict):
        return out
    for protocol, models in section.items():
        if not isinstance(models, dict):
            continue
        for model, c in models.items():
            n = len(c.get("lengths") or []) if isinstance(c, dict) else 0
            if isinstance(c, dict) and c.get("lengths") == [] and protocol == "length_fair":
                warnings_out.append(f"{ev.path / 'results.json'}: exposure_by_protocol.{protocol}.{model}: no length "
                                    "where enough draws of both models were still running (eval.exposure_min_at_risk)")
                continue
            if not n or any(len(c.get(k) or []) != n for k in ("ex_acc_err", "R", "eps")):
                warnings_out.append(f"{ev.path / 'results.json'}: exposure_by_protocol.{protocol}.{model} has no "
                                    "equal-length, non-empty 'lengths', 'ex_acc_err', 'R', 'eps' lists; left out of the plot")
                continue
            out.setdefault(str(protocol), {})[str(model)] = c
    return out


def _exposure_over_evals(doc: Doc, evals: list[EvalSource], out: Path) -> None:
    """Evaluations of the same exposure settings (say, one per whole-pipeline seed) drawn together:
    per protocol, mean ± std over the evaluations, with R and eps beside the ratio."""
    groups: dict[str, list[EvalSource]] = {}
    for ev in evals:
        st = ev.results.get("exposure_settings")
        if isinstance(st, dict) and isinstance(ev.results.get("exposure_by_protocol"), dict):
            key = json.dumps({k: st.get(k) for k in ("test_set", "prompts", "samples", "max_new_tokens", "protocols")}, sort_keys=True)
            groups.setdefault(key, []).append(ev)
    for g, group in enumerate(g for g in groups.values() if len(g) > 1):
        quiet: list[str] = []  # each evaluation's own section already warned
        tables = [_exposure_protocols(ev, quiet) for ev in group]
        names = ", ".join(ev.name for ev in group)
        for protocol in dict.fromkeys(p for t in tables for p in t):
            per_model: dict[str, list[dict[str, Any]]] = {}
            for t in tables:
                for m, c in t.get(protocol, {}).items():
                    per_model.setdefault(m, []).append(c)
            file = f"exposure_{protocol}_over_{g:02d}.png"
            plot_exposure_protocol(per_model, protocol, out / file)
            rows = []
            for m, cs in per_model.items():
                xs, err, err_sd = _curve_band(cs, "ex_acc_err")
                _, R, R_sd = _curve_band(cs, "R")
                _, eps, eps_sd = _curve_band(cs, "eps")
                cell = lambda a, sd, spec: f"{_num(a[-1], spec)} ± {_num(sd[-1], spec)}" if len(a) else "n/a"  # noqa: E731
                rows.append([m, str(len(cs)), str(len(xs)), cell(err, err_sd, ".2f"), cell(R, R_sd, ".4f"), cell(eps, eps_sd, ".4f")])
            _figure_section(doc, f"Exposure bias over {len(group)} evaluations, {protocol}", file,
                            f"mean ± std over the evaluations ({names}); " + PROTOCOL_CAPTIONS.get(protocol, protocol),
                            ["model", "evaluations", "l", "ExAccErr(l) %", "R(l)", "eps(l)"], rows)


def _calibration(ev: EvalSource, warnings: list[str]) -> dict[str, dict[str, Any]]:
    """Per model: the ``calibration`` entry when it can be drawn (``ece`` and ``bins``)."""
    section = ev.results.get("calibration")
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(section, dict):
        return out
    for model, cal in section.items():
        bins = cal.get("bins") if isinstance(cal, dict) else None
        ok = isinstance(cal, dict) and _finite(cal.get("ece")) and isinstance(bins, list) and bool(bins)
        ok = ok and all(isinstance(b, dict) and _finite(b.get("count")) for b in bins)  # type: ignore[union-attr]
        ok = ok and all(_finite(b.get("accuracy")) and _finite(b.get("confidence")) for b in bins if b["count"])  # type: ignore[union-attr]
        if not ok:
            warnings.append(f"{ev.path / 'results.json'}: calibration.{model} needs 'ece' and 'bins' of "
                            "{count, accuracy, confidence}; left out of the plot")
            continue
        out[str(model)] = cal
    return out


# ---------------------------------------------------------------------------------------------
# Sweeps (`minillm sweep`): runs per test set, the ablation table, metric-vs-value plots, curves

SWEEP_METRICS = ("rouge_l", "exact_match", "dist_4", "self_bleu")


def _sweep_model(sw: SweepSource, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one model a run's evaluation holds: (its summary by set, its valid_answers by set)."""
    res = sw.results.get(name) or {}
    summary = res.get("summary") if isinstance(res.get("summary"), dict) else {}
    model = next(iter(summary), None)
    by_set = summary.get(model) if model is not None and isinstance(summary.get(model), dict) else {}
    return by_set, _valid_answers(res).get(str(model), {}) if model is not None else {}


def _sweep_sets(sw: SweepSource) -> list[str]:
    return list(dict.fromkeys(s for name in sw.results for s in _sweep_model(sw, name)[0]))


def _sweep_value(sw: SweepSource, name: str, set_name: str | None, metric: str) -> tuple[float, float] | None:
    """(mean, std) of ``metric`` for one run: a test-set metric, ``distinct`` (valid answers) or the
    best ``valid_rouge_l`` of training (``set_name`` None)."""
    if metric == "valid_rouge_l":
        run = sw.runs.get(name)
        ys = _series(run.metrics, "valid_rouge_l")[1] if run is not None else []
        return (max(ys), 0.0) if ys else None
    by_set, answers = _sweep_model(sw, name)
    if metric == "distinct":
        v = answers.get(str(set_name))
        return (float(v["distinct"]), 0.0) if v else None
    metrics = by_set.get(str(set_name))
    return _cell(metrics.get(metric)) if isinstance(metrics, dict) else None


def _groups(sw: SweepSource, axis: str) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """The runs grouped by their labels on every axis but ``axis``, in manifest order."""
    others = [a["name"] for a in sw.manifest["axes"] if a["name"] != axis]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for entry in sw.manifest["runs"]:
        levels = entry.get("levels") or {}
        groups.setdefault(tuple(str(levels.get(o)) for o in others), []).append(entry)
    return groups


def _group_text(sw: SweepSource, axis: str, key: tuple[str, ...]) -> str:
    others = [a["name"] for a in sw.manifest["axes"] if a["name"] != axis]
    return ", ".join(f"{o} {v}" for o, v in zip(others, key))


def _fmt_drop(cell: tuple[float, float] | None, ref: tuple[float, float] | None, is_ref: bool) -> str:
    if cell is None:
        return "n/a"
    text = f"{cell[0]:.2f} ± {cell[1]:.2f}" if cell[1] else f"{cell[0]:.2f}"
    if is_ref or ref is None:
        return text
    return f"{text} ({cell[0] - ref[0]:+.2f})"


def sweep_tables(doc: Doc, sw: SweepSource) -> None:
    """The ablation table in the paper's layout (Table 4: Rouge-L per variant with the change from
    the reference level) and, per test set, every run's metrics."""
    sets = _sweep_sets(sw)
    ref = sw.manifest.get("reference")
    if isinstance(ref, dict) and ref.get("axis"):
        for key, entries in _groups(sw, ref["axis"]).items():
            ref_entry = next((e for e in entries if (e.get("levels") or {}).get(ref["axis"]) == ref["label"]), None)
            cols = [("valid_rouge_l", None)] + [("rouge_l", s) for s in sets]
            cols = [c for c in cols if any(_sweep_value(sw, e["name"], c[1], c[0]) for e in entries)]
            if ref_entry is None or not cols:
                continue
            where = _group_text(sw, ref["axis"], key)
            doc.heading(f"Ablation: Rouge-L and the change from {ref['label']}" + (f" ({where})" if where else ""), 3)
            refs = {c: _sweep_value(sw, ref_entry["name"], c[1], c[0]) for c in cols}
            doc.table([ref["axis"]] + ["valid Rouge-L (best)" if c[0] == "valid_rouge_l" else f"{c[1]} Rouge-L" for c in cols],
                      [[str((e.get("levels") or {}).get(ref["axis"]))]
                       + [_fmt_drop(_sweep_value(sw, e["name"], c[1], c[0]), refs[c], e is ref_entry) for c in cols]
                       for e in entries])
    axes = [a["name"] for a in sw.manifest["axes"]]
    axes = axes if len(axes) > 1 else []  # one axis: the run name says it
    for set_name in sets:
        doc.heading(f"Runs on {set_name}", 3)
        keys = [m for m in SWEEP_METRICS if any(_sweep_value(sw, e["name"], set_name, m) for e in sw.manifest["runs"])]
        rows = []
        for e in sw.manifest["runs"]:
            levels = e.get("levels") or {}
            best = _sweep_value(sw, e["name"], None, "valid_rouge_l")
            _, answers = _sweep_model(sw, e["name"])
            v = answers.get(set_name)
            rows.append([e["name"], *(str(levels.get(a)) for a in axes), f"{best[0]:.2f}" if best else "-",
                         *(_fmt_cell(_sweep_value(sw, e["name"], set_name, m), m) for m in keys),
                         f"{v['distinct']:.2f} of {v['possible']:.2f}" if v else "-"])
        doc.table(["run", *axes, "valid Rouge-L (best)", *(EVAL_METRICS.get(m, m) for m in keys), "distinct valid answers"], rows)
    doc.para("mean ± standard deviation over the evaluation's sampling seeds; valid Rouge-L (best): the highest "
             "validation Rouge-L logged in training; distinct valid answers: per multi-answer prompt, over the seeds", "note")


def _numeric_axes(sw: SweepSource) -> list[dict[str, Any]]:
    return [a for a in sw.manifest["axes"] if a.get("key") and isinstance(a.get("values"), list) and len(a["values"]) > 1
            and all(_finite(v) for v in a["values"])]


def plot_sweep_metrics(sw: SweepSource, axis: dict[str, Any], path: Path) -> bool:
    """One panel per metric against the axis's value (error bars: std over seeds), one line per test
    set and per level of the other axes; False when nothing is measured."""
    value = dict(zip(axis["labels"], axis["values"]))
    sets = _sweep_sets(sw)
    panels = [(m, s) for m in (*SWEEP_METRICS, "distinct") for s in sets] + [("valid_rouge_l", None)]
    titles = {**EVAL_METRICS, "distinct": "distinct valid answers", "valid_rouge_l": "validation Rouge-L (best)"}
    drawn: list[tuple[str, list[tuple[str, list[float], list[float], list[float]]]]] = []
    for metric, set_name in panels:
        lines = []
        for key, entries in _groups(sw, axis["name"]).items():
            pts = []
            for e in entries:
                cell = _sweep_value(sw, e["name"], set_name, metric)
                label = (e.get("levels") or {}).get(axis["name"])
                if cell is not None and label in value:
                    pts.append((float(value[label]), *cell))
            if pts:
                pts.sort()
                lines.append((_group_text(sw, axis["name"], key), [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]))
        if lines:
            drawn.append((titles.get(metric, metric) + (f" ({set_name})" if set_name else ""), lines))
    if not drawn:
        return False
    cols = min(3, len(drawn))
    nrows = math.ceil(len(drawn) / cols)
    fig = _figure(4.0 * cols, 3.0 * nrows)
    for i, (title, lines) in enumerate(drawn):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for label, xs, ys, es in lines:
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, lw=1.4, capsize=3, label=label or None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(axis["key"], fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if any(label for label, *_ in lines):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_sweep_curves(runs: dict[str, RunSource], path: Path) -> list[str]:
    """Every :data:`CURVES` key some run logged, one panel each, one line per run; the keys drawn."""
    return _plot_curves(runs, path)


def _sweep_section(doc: Doc, sw: SweepSource, out: Path, i: int) -> None:
    m = sw.manifest
    doc.heading(f"Sweep {m.get('name', sw.name)}")
    axes = "; ".join(f"{a['name']}: {', '.join(map(str, a['labels']))}" for a in m["axes"])
    trained = sum((e.get("status") or {}).get("train") == "trained" for e in m["runs"])
    doc.para(f"{len(m['runs'])} runs from {m.get('file')}" + (f" on the demo's task (--demo {m['demo']})" if m.get("demo") else "")
             + f"; grid {axes}; {trained} trained by the last `minillm sweep`, the others reused")
    sweep_tables(doc, sw)
    for axis in _numeric_axes(sw):
        file = f"sweep_{i:02d}_{_slug(axis['name'])}.png"
        if plot_sweep_metrics(sw, axis, out / file):
            doc.image(file, f"evaluation metrics against {axis['key']} (error bars: std over sampling seeds)")
    file = f"sweep_{i:02d}_curves.png"
    if plot_sweep_curves(sw.runs, out / file):
        doc.image(file, "training curves of every run of the sweep (x: optimizer step)")


def sweep_markdown(folder: Path) -> str:
    """The tables of the sweep in ``folder`` as Markdown (what `minillm sweep` prints)."""
    src = collect_sources([folder])
    doc = Doc()
    for sw in src.sweeps:
        sweep_tables(doc, sw)
    return "\n".join(doc.md)


# ---------------------------------------------------------------------------------------------
# The report


def _num(x: Any, spec: str) -> str:
    return format(float(x), spec) if _finite(x) else "n/a"


def _last(xs: Any) -> Any:
    return xs[-1] if isinstance(xs, list) and xs else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "x"


def _environment() -> list[tuple[str, str]]:
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
    return [
        ("date (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
        ("minillm", version("minillm")),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", version("transformers")),
        ("matplotlib", version("matplotlib")),
        ("device", device),
        ("platform", platform.platform()),
    ]


def _run_row(run: RunSource) -> list[str]:
    s = run.summary or {}
    last = run.metrics[-1] if run.metrics else {}
    method = str(s.get("method") or _config_method(run.config_text) or "?")
    steps = s.get("steps", last.get("step", "-"))
    valid = _series(run.metrics, "valid_loss")[1]
    rouge = _series(run.metrics, "valid_rouge_l")[1]
    times = _series(run.metrics, "step_time_s")[1]
    tps = _series(run.metrics, "tokens_per_s")[1]
    best = "-"
    if s.get("best_step") is not None and _finite(s.get("best")):
        best = f"{s['best']:.4g} at step {s['best_step']} ({s.get('select_by', '?')})"
    return [
        run.name, method, str(steps), best,
        f"{valid[-1]:.4f}" if valid else "-",
        f"{rouge[-1]:.2f}" if rouge else "-",
        f"{statistics.median(times):.3f}" if times else "-",
        f"{statistics.median(tps):.0f}" if tps else "-",
        "finished" if run.summary is not None else "no summary.json (unfinished?)",
    ]


def _config_method(text: str | None) -> str | None:
    if not text:
        return None
    m = re.search(r"^method:\s*(\S+)", text, re.MULTILINE)
    return m.group(1) if m else None


def _figure_section(doc: Doc, title: str, file: str, caption: str, header: list[str], rows: list[list[str]]) -> None:
    """A section of one plot (already written to ``file``) and the table of its end points."""
    doc.heading(title)
    doc.image(file, caption)
    doc.table(header, rows)


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write ``report.html``, ``report.md`` and their PNGs into ``out``; return the HTML path.

    ``run_dirs``: run, evaluation or toy folders (or folders holding them); ``out`` defaults to
    ``run_dirs[0] / "report"``.
    """
    if not run_dirs:
        raise UserError("report: give at least one run, evaluation or toy folder")
    src = collect_sources(run_dirs)
    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    doc = Doc()
    title = "minillm report: " + ", ".join(Path(d).name or str(d) for d in run_dirs)

    doc.heading("Sources")
    doc.bullets([f"sweep {w.name}: {w.path}" for w in src.sweeps] + [f"run {r.name}: {r.path}" for r in src.runs]
                + [f"evaluation {e.name}: {e.path}" for e in src.evals] + [f"toy {t.name}: {t.path}" for t in src.toys])

    if src.evals:
        doc.heading("Comparison")
        for ev in src.evals:
            _comparison(doc, ev)

    for i, sw in enumerate(src.sweeps):
        _sweep_section(doc, sw, out, i)

    if src.runs:
        doc.heading("Training runs")
        doc.table(["run", "method", "steps", "best (selection)", "last valid loss", "last valid Rouge-L",
                   "median step time (s)", "median tokens/s", "status"], [_run_row(r) for r in src.runs])
        for key in ("valid_loss", "valid_rouge_l"):
            file = f"compare_{key}.png"
            if plot_valid_overlay(src.runs, key, out / file):
                doc.image(file, f"{CURVES[key]} of every run")
        in_sweep = {id(r) for sw in src.sweeps for r in sw.runs.values()}  # drawn together in the sweep's section
        for i, run in enumerate(src.runs):
            if id(run) in in_sweep:
                continue
            doc.heading(f"Run {run.name}", 3)
            file = f"curves_{i:02d}_{_slug(run.name)}.png"
            if not run.metrics:
                doc.para("no metrics.jsonl rows: the run has not finished a step yet", "note")
            elif not plot_run_curves(run, out / file):
                doc.para("metrics.jsonl holds none of: " + ", ".join(CURVES), "note")
            else:
                doc.image(file, f"training curves of {run.name} (x: optimizer step)")

    for i, ev in enumerate(src.evals):
        by_protocol = _exposure_protocols(ev, src.warnings)
        for protocol, per_model in by_protocol.items():
            file = f"exposure_{protocol}_{i:02d}_{_slug(ev.name)}.png"
            plot_exposure_protocol({m: [c] for m, c in per_model.items()}, protocol, out / file)
            _figure_section(
                doc, f"Exposure bias, {protocol} ({ev.name})", file, PROTOCOL_CAPTIONS.get(protocol, protocol),
                ["model", "l", "ExAccErr(l) %", "R(l)", "eps(l)", *_protocol_extra_header(protocol)],
                [[m, str(len(c["lengths"])), _num(_last(c["ex_acc_err"]), ".2f"), _num(_last(c.get("R")), ".4f"),
                  _num(_last(c.get("eps")), ".4f"), *_protocol_extra(protocol, c)] for m, c in per_model.items()])
        if by_protocol:
            settings = ev.results.get("exposure_settings")
            if isinstance(settings, dict):
                doc.para("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), "note")
        curves = _exposure(ev, src.warnings) if not by_protocol else {}
        if curves:
            file = f"exposure_bias_{i:02d}_{_slug(ev.name)}.png"
            plot_exposure_bias(curves, out / file)
            _figure_section(
                doc, f"Exposure bias ({ev.name})", file,
                "ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100 by generation length l, per model",
                ["model", "l_max", "ExAccErr(l_max) %", "R(l_max)", "eps(l_max)"],
                [[m, str(d["lengths"][-1]), _num(d["ex_acc_err"][-1], ".2f"), _num(_last(d.get("R")), ".4f"),
                  _num(_last(d.get("eps")), ".4f")] for m, (_, _, d) in curves.items()])
            settings = ev.results.get("exposure_settings")
            if isinstance(settings, dict):
                doc.para("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), "note")
        cal = _calibration(ev, src.warnings)
        if cal:
            file = f"calibration_{i:02d}_{_slug(ev.name)}.png"
            plot_calibration(cal, out / file)
            _figure_section(
                doc, f"Calibration ({ev.name})", file,
                "reliability diagrams: accuracy (bars) vs mean confidence (red outline) per bin",
                ["model", "ECE", "accuracy", "mean confidence", "n"],
                [[m, f"{c['ece']:.4f}", _num(c.get("accuracy"), ".4f"), _num(c.get("mean_confidence"), ".4f"),
                  str(int(sum(b["count"] for b in c["bins"])))] for m, c in cal.items()])

    _exposure_over_evals(doc, src.evals, out)

    if src.toys:
        doc.heading("Forward vs reverse KL (toy)")
        for i, toy in enumerate(src.toys):
            _toy_section(doc, toy, out, i)

    configs = [(f"{r.name}: config.yaml", r.config_text) for r in src.runs if r.config_text]
    configs += [(f"{e.name}: evaluation config (results.json)", yaml.safe_dump(e.results["config"], sort_keys=False))
                for e in src.evals if isinstance(e.results.get("config"), dict)]
    if configs:
        doc.heading("Resolved configs")
        for name, text in configs:
            doc.code(name, text or "", "yaml")

    doc.heading("Environment")
    doc.para("where this report was written (runs may have trained elsewhere)", "note")
    doc.table(["item", "value"], [list(kv) for kv in _environment()])

    if src.warnings:
        doc.heading("Warnings")
        doc.bullets(src.warnings, "warn")
        for w in src.warnings:
            log.warning("%s", w)

    (out / "report.md").write_text(doc.render_md(title))
    path = out / "report.html"
    path.write_text(doc.render_html(title))
    return path


def _toy_section(doc: Doc, toy: ToySource, out: Path, i: int) -> None:
    from minillm.toy import plot_toy

    file = f"toy_{i:02d}_{_slug(toy.name)}.png"
    target, rows = "", []
    if toy.result is not None:
        try:
            plot_toy(toy.result, out / file)  # redrawn from toy.json so the figure matches the numbers below
            t, fits = toy.result["target"], toy.result["fits"]
            target = " + ".join(f"{w:g} N({m:g}, {s:g}^2)" for w, m, s in zip(t["weights"], t["means"], t["stds"]))
            rows = [[f"minimise {d} KL", f"{f['mu']:.3f}", f"{f['sigma']:.3f}", f"{f['forward_kl']:.4f}", f"{f['reverse_kl']:.4f}"]
                    for d, f in fits.items()]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{toy.path / 'toy.json'}: not a `minillm toy` result ({type(e).__name__}: {e}); "
                            "rerun `minillm toy`") from None
    elif toy.png is not None:
        shutil.copyfile(toy.png, out / file)
    doc.image(file, "one Gaussian fitted to a two-mode mixture: forward KL covers both modes, reverse KL seeks one")
    if rows:
        doc.para(f"target p = {target}")
        doc.table(["fit", "mu", "sigma", "KL(p||q)", "KL(q||p)"], rows)
