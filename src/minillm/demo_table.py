"""The demo's summary over whole-pipeline seeds, and the README table written from it.

``minillm demo --seeds N`` trains the teacher and every student N times (pipeline seeds ``seed``,
``seed + 1``, ...) and evaluates each over the sampling seeds. This module reads those evaluation
folders and writes

* ``summary.json``: per pipeline seed, each model's mean over the sampling seeds, and their mean and
  standard deviation over the pipeline seeds;
* ``demo_table.md``: the README block (caption with the command, date and exact package versions,
  the table, and the conclusions that hold in *every* pipeline seed, computed, not written by hand).

``minillm demo --readme README.md`` replaces the block between :data:`START` and :data:`END` with
``demo_table.md``; :func:`parse_block` reads a block back (the test that keeps README and demo
output in the same format uses it).
"""

from __future__ import annotations

import json
import math
import platform
import re
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from minillm.errors import UserError

START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
MODELS = ("teacher", "sft", "kd", "seqkd", "minillm")
STUDENTS = ("sft", "kd", "seqkd", "minillm")
LABELS = {"teacher": "teacher", "sft": "SFT", "kd": "KD", "seqkd": "SeqKD", "minillm": "MiniLLM"}
# column key -> (title, digits, direction: +1 higher is better, -1 lower is better, 0 neither)
COLUMNS: dict[str, tuple[str, int, int]] = {
    "task/rouge_l": ("Rouge-L", 2, 1),
    "task/exact_match": ("exact match", 2, 1),
    "task/dist_4": ("Dist-4", 2, 0),
    "task/lm_loss": ("LM loss", 3, -1),
    "long/rouge_l": ("Rouge-L (long)", 2, 1),
    # exposure bias under both protocols (minillm.eval.exposure): fixed-length draws at l = l_max, with
    # the share of the student's draws that sampled EOS before l_max; length-fair at the longest l
    # every model's curve reaches in every pipeline seed
    "fixed_length/ex_acc_err": ("ExAccErr FL(l) %", 1, -1),
    "fixed_length/R": ("R FL(l)", 2, -1),
    "fixed_length/eps": ("eps FL(l)", 2, -1),
    "fixed_length/early": ("early EOS FL %", 1, 0),
    "length_fair/ex_acc_err": ("ExAccErr LF(lf) %", 1, -1),
    "length_fair/R": ("R LF(lf)", 2, -1),
    "length_fair/eps": ("eps LF(lf)", 2, -1),
}
PROTOCOL_LABELS = {"fixed_length": "FL", "length_fair": "LF"}
PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "safetensors")
_CELL = re.compile(r"^(\*\*)?-?\d+\.\d+( ± \d+\.\d+)?(\*\*)?$|^n/a$")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _protocol_curves(results: dict[str, Any], protocol: str) -> dict[str, Any]:
    """{model: curve} of one protocol; a results.json from before the protocols held only
    ``exposure_bias`` (fixed-length draws unless its settings say they stopped at EOS)."""
    by = results.get("exposure_by_protocol")
    if isinstance(by, dict):
        return by.get(protocol) or {}
    old = results.get("exposure_bias") or {}
    stopped = (results.get("exposure_settings") or {}).get("stop_at_eos", False)
    return old if protocol == ("to_eos" if stopped else "fixed_length") else {}


def fair_length(results: dict[str, Any]) -> int | None:
    """The longest l that every model's length_fair curve of one results.json reaches."""
    ends = [len(c.get("lengths") or []) for c in _protocol_curves(results, "length_fair").values()]
    return min(ends) if ends else None


def seed_values(results: dict[str, Any], l_fair: int | None = None) -> dict[str, dict[str, float | None]]:
    """One pipeline seed's figures: model -> column key -> value (mean over the sampling seeds; the
    fixed-length columns at l_max, the length-fair ones at ``l_fair``, default the longest l every
    model's curve reaches)."""
    out: dict[str, dict[str, float | None]] = {}
    l_fair = l_fair if l_fair is not None else fair_length(results)
    for model in results.get("summary", {}):
        row: dict[str, float | None] = {}
        for key in COLUMNS:
            part, metric = key.split("/")
            v: Any = None
            if part in PROTOCOL_LABELS:
                curve = _protocol_curves(results, part).get(model)
                at = len(curve.get("lengths") or []) if curve and part == "fixed_length" else (l_fair or 0)
                if curve and metric == "early":
                    early = curve.get("ended_early_student")
                    v = 100.0 * early / curve["n_samples"] if _finite(early) and curve.get("n_samples") else None
                elif curve and at and len(curve.get(metric) or []) >= at:
                    v = curve[metric][at - 1]
            else:
                cell = results["summary"][model].get(part, {}).get(metric)
                v = cell["mean"] if cell else None
            row[key] = float(v) if _finite(v) else None
        out[model] = row
    return out


def summarize(eval_dirs: dict[int, Path]) -> dict[str, Any]:
    """Read ``results.json`` of each pipeline seed's evaluation folder -> the demo summary."""
    per_seed: dict[str, dict[str, dict[str, float | None]]] = {}
    l_max = None
    results: dict[str, Any] = {}
    loaded: dict[int, dict[str, Any]] = {}
    for seed, d in sorted(eval_dirs.items()):
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; run the demo's evaluation for pipeline seed {seed} first")
        loaded[seed] = json.loads(path.read_text())
    fair = [x for x in (fair_length(r) for r in loaded.values()) if x is not None]
    l_fair = min(fair) if fair else None  # one length for every seed: values at one l are comparable
    for seed, results in loaded.items():
        per_seed[str(seed)] = seed_values(results, l_fair)
        l_max = (results.get("exposure_settings") or {}).get("max_new_tokens", l_max)
    models = [m for m in MODELS if all(m in v for v in per_seed.values())]
    stats: dict[str, dict[str, dict[str, float] | None]] = {}
    for m in models:
        stats[m] = {}
        for key in COLUMNS:
            part, metric = key.split("/")
            if len(per_seed) == 1 and part not in PROTOCOL_LABELS:  # one pipeline seed: the spread over sampling seeds
                stats[m][key] = results["summary"][m].get(part, {}).get(metric)
                continue
            vals = [v[m][key] for v in per_seed.values()]
            if any(x is None for x in vals):
                stats[m][key] = None
                continue
            xs = [float(x) for x in vals]  # type: ignore[arg-type]
            stats[m][key] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}
    return {"pipeline_seeds": [int(s) for s in per_seed], "l_max": l_max, "l_fair": l_fair, "per_seed": per_seed,
            "stats": stats, "conclusions": conclusions(per_seed, l_max, l_fair) + exposure_conclusions(per_seed, l_max, l_fair)}


def _title(title: str, l_max: int | None, l_fair: int | None) -> str:
    title = title.replace("(lf)", f"({l_fair})" if l_fair else "(l)")
    return title.replace("(l)", f"({l_max})") if l_max else title


def exposure_conclusions(per_seed: dict[str, dict[str, dict[str, float | None]]], l_max: int | None = None,
                         l_fair: int | None = None) -> list[str]:
    """Per protocol, MiniLLM's ExAccErr against each baseline, counted over the pipeline seeds,
    and whether a difference in ExAccErr comes with a higher R (own prefixes) or a lower eps (the
    teacher's prefixes) - stated whatever the counts are."""
    n = len(per_seed)
    lines = []
    for protocol, short in PROTOCOL_LABELS.items():
        key = f"{protocol}/ex_acc_err"
        title = _title(COLUMNS[key][0], l_max, l_fair)
        rows = [v for v in per_seed.values() if "minillm" in v and v["minillm"].get(key) is not None]
        if len(rows) < n or not rows:
            continue
        parts, r_lower, eps_lower = [], 0, 0
        for base in ("sft", "kd", "seqkd"):
            pairs = [(v["minillm"][key], v[base][key]) for v in rows if base in v and v[base].get(key) is not None]
            if len(pairs) == n:
                parts.append(f"below {LABELS[base]} in {sum(a < b for a, b in pairs)} of {n}")  # type: ignore[operator]
        for v in rows:
            base = [b for b in ("sft", "kd", "seqkd") if b in v]
            if not base:
                continue
            r_mean = statistics.fmean(float(v[b][f"{protocol}/R"] or 0.0) for b in base)
            eps_mean = statistics.fmean(float(v[b][f"{protocol}/eps"] or 0.0) for b in base)
            r_lower += (v["minillm"][f"{protocol}/R"] or 0.0) < r_mean
            eps_lower += (v["minillm"][f"{protocol}/eps"] or 0.0) < eps_mean
        if parts:
            lines.append(f"{title}: MiniLLM's excess error is {', '.join(parts)} pipeline seeds; its R {short} is below "
                         f"the baselines' mean in {r_lower} of {n}, its eps {short} in {eps_lower} of {n}.")
    return lines


def conclusions(per_seed: dict[str, dict[str, dict[str, float | None]]], l_max: int | None = None,
                l_fair: int | None = None) -> list[str]:
    """Where MiniLLM ranks among the students, per column, counted over the pipeline seeds; a
    sentence says "every" only when it holds in every seed (a tie for first or last counts)."""
    n = len(per_seed)
    lines = []
    for key, (title, _, direction) in COLUMNS.items():
        title = _title(title, l_max, l_fair)
        first = last = 0
        for vals in per_seed.values():
            xs = {s: vals[s][key] for s in STUDENTS if s in vals and vals[s][key] is not None}
            if "minillm" not in xs or len(xs) < 2:
                break
            sign = direction or 1
            score = {s: sign * float(x) for s, x in xs.items()}  # type: ignore[arg-type]
            first += score["minillm"] >= max(score.values())
            last += score["minillm"] <= min(score.values())
        else:
            adj = ("best", "worst") if direction else ("highest", "lowest")
            seeds = "the one pipeline seed" if n == 1 else f"every pipeline seed ({n} of {n})"
            if first == n:
                lines.append(f"{title}: MiniLLM is the {adj[0]} of the students in {seeds}.")
            elif last == n:
                lines.append(f"{title}: MiniLLM is the {adj[1]} of the students in {seeds}.")
            elif n == 1:
                lines.append(f"{title}: MiniLLM is neither the {adj[0]} nor the {adj[1]} of the students in {seeds}.")
            else:
                lines.append(f"{title}: no ranking of MiniLLM holds across the pipeline seeds "
                             f"({adj[0]} in {first}, {adj[1]} in {last} of {n}).")
    return lines


def _versions() -> str:
    import importlib.metadata as md

    def v(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    return ", ".join([f"Python {platform.python_version()}"] + [f"{p} {v(p)}" for p in PACKAGES])


def _cell(stat: dict[str, float] | None, digits: int, bold: bool) -> str:
    if stat is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f}"
    if stat.get("n", 2) > 1:  # a single value has no spread to show
        text += f" ± {stat['std']:.{digits}f}"
    return f"**{text}**" if bold else text


def table_header(l_max: int | None, l_fair: int | None = None) -> list[str]:
    """The table's column titles (``l`` replaced by the exposure lengths)."""
    return ["model"] + [_title(title, l_max, l_fair) for title, _, _ in COLUMNS.values()]


def readme_block(summary: dict[str, Any], command: str, seconds: float | None, machine: str | None = None) -> str:
    """The README's demo block: caption, table (best student per column in bold), conclusions."""
    stats, l_max, l_fair = summary["stats"], summary["l_max"], summary.get("l_fair")
    seeds = summary["pipeline_seeds"]
    header = table_header(l_max, l_fair)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    best: dict[str, set[str]] = {}
    for key, (_, digits, direction) in COLUMNS.items():
        xs = {s: round(stats[s][key]["mean"], digits) for s in STUDENTS if s in stats and stats[s][key] is not None}
        if direction and xs:
            top = max(direction * x for x in xs.values())
            best[key] = {s for s, x in xs.items() if direction * x == top}  # ties as shown: all bold
    for m in stats:
        cells = [_cell(stats[m][k], d, m in best.get(k, ())) for k, (_, d, _) in COLUMNS.items()]
        lines.append("| " + " | ".join([LABELS.get(m, m)] + cells) + " |")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    took = f", {seconds:.0f} s in all" if seconds is not None else ""
    where = machine or f"{_cpu_count()} CPU cores"
    caption = (f"`{command}` on {where} ({when}{took}; {_versions()}). Mean ± std over "
               + (f"{len(seeds)} whole-pipeline seeds ({', '.join(map(str, seeds))}: teacher and students retrained), "
                  "each cell of a seed itself the mean over the sampling seeds"
                  if len(seeds) > 1 else f"the sampling seeds of pipeline seed {seeds[0]}")
               + f"; exposure bias on the long-answer prompts, fixed-length (FL) at l = {l_max} with the share of the "
               "student's draws that sampled EOS before it, length-fair (LF) at l = "
               + f"{l_fair if l_fair else 'n/a'}; bold: the best student per column.")
    body = [caption, "", *lines, "", "What holds across the pipeline seeds (computed by the same command):", ""]
    body += [f"- {c}" for c in summary["conclusions"]]
    return "\n".join(body) + "\n"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_block(block: str) -> dict[str, Any]:
    """Read a demo block back: its header, its rows (model -> cells) and its conclusion lines.
    Raises ``ValueError`` when the block is not in the format :func:`readme_block` writes."""
    lines = [ln for ln in block.strip().splitlines()]
    table = [ln for ln in lines if ln.startswith("|")]
    if len(table) < 3:
        raise ValueError("no table in the demo block")
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows: dict[str, list[str]] = {}
    for ln in table[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header):
            raise ValueError(f"row {cells[0]!r} has {len(cells)} cells, the header {len(header)}")
        bad = [c for c in cells[1:] if not _CELL.match(c)]
        if bad:
            raise ValueError(f"row {cells[0]!r}: cells not in the 'mean ± std' format: {bad}")
        rows[cells[0]] = cells[1:]
    caption = lines[0]
    if not all(p in caption for p in PACKAGES):
        raise ValueError("the caption does not name the package versions")
    return {"header": header, "rows": rows, "caption": caption, "conclusions": [ln[2:] for ln in lines if ln.startswith("- ")]}


def readme_section(text: str, where: str = "README") -> str:
    """The demo block of a README's text."""
    if START not in text or END not in text:
        raise UserError(f"{where}: has no demo table markers ({START} ... {END}); add them where the table goes")
    return text.split(START, 1)[1].split(END, 1)[0]


def update_readme(path: Path, block: str) -> None:
    """Replace the demo block of the README at ``path`` with ``block``."""
    text = Path(path).read_text()
    old = readme_section(text, str(path))
    Path(path).write_text(text.replace(START + old + END, f"{START}\n{block}{END}", 1))


def write_outputs(out: Path, summary: dict[str, Any], command: str, seconds: float | None,
                  machine: str | None = None) -> str:
    """Write ``summary.json`` and ``demo_table.md`` under ``out``; return the block."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    block = readme_block(summary, command, seconds, machine)
    (out / "demo_table.md").write_text(block)
    return block


def pipeline_seeds(seed: int, n: int) -> Sequence[int]:
    """The whole-pipeline seeds of ``--seed S --seeds N``: S, S + 1, ..., S + N - 1."""
    return [seed + i for i in range(n)]
