"""`minillm report`: inputs read from fake and real run folders, HTML/Markdown output, a real browser."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_config_dict
from minillm.errors import UserError
from minillm.report import collect_sources, write_report

EVIL = '<script>alert("x")</script>&'


def _write_run(d: Path, method: str, steps: int = 12, rollout: bool = False, summary: bool = True) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"method": method, "output_dir": str(d), "note": EVIL}, sort_keys=False))
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 3.0 / s, "lr": 1e-3, "step_time_s": 0.5, "tokens_per_s": 1000.0 + s, "grad_norm": 1.0}
        if rollout:
            row.update(pg=-0.1, single_step=0.5, clip_frac=0.05 * (s % 3), entropy=2.0, ratio=1.0)
            if s % 2 == 1:
                row.update(reward=-1.0 + 0.05 * s, reverse_kl=1.0 - 0.05 * s, seq_reverse_kl=8.0 - 0.3 * s,
                           response_len=10.0 + s, rollout_time_s=0.2)
        if s % 4 == 0:
            row.update(valid_loss=2.5 - (0.12 if rollout else 0.1) * s, **({"valid_rouge_l": 10.0 + s} if rollout else {}))
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (d / "summary.json").write_text(json.dumps({"method": method, "steps": steps, "best_step": 12, "best": 1.3,
                                                    "select_by": "loss"}))
    return d


def _results() -> dict:
    """A results.json built with the eval runner's own writers (so a change of format shows here)."""
    from minillm.eval.calibration import calibration_report
    from minillm.eval.exposure import ExposureCurve, ex_acc_err
    from minillm.eval.runner import aggregate

    def seeds(**per_metric: list[float | None]) -> dict:
        return aggregate({str(s): {m: v[i] for m, v in per_metric.items()} for i, s in enumerate((10, 20, 30))})

    refs_none = {"rouge_l": [None] * 3, "exact_match": [None] * 3, "dist_4": [70.0, 71.0, 72.0]}
    summary = {
        "sft": {"dolly": seeds(rouge_l=[23.0, 24.0, 25.0], exact_match=[1.0, 2.0, 3.0], dist_4=[88.0, 88.5, 89.0],
                               lm_loss=[2.345] * 3, length=[40.0, 41.0, 42.0]),
                "vicuna": seeds(**refs_none)},
        "minillm": {"dolly": seeds(rouge_l=[27.0, 27.5, 28.0], exact_match=[3.0, 3.0, 3.0], dist_4=[91.0, 92.0, 93.0],
                                   lm_loss=[2.901] * 3, length=[35.0, 35.0, 35.0]),
                    "vicuna": seeds(**refs_none)},
        EVIL: {"dolly": seeds(rouge_l=[1.0, 1.0, 1.0])},
    }

    def curve(R: list[float], eps: list[float]) -> dict:
        return ExposureCurve([1, 2, 3, 4], R, eps, ex_acc_err(R, eps), n_samples=8).to_dict()

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=40).tolist()
    answers = rng.integers(0, 3, size=40).tolist()
    return {
        "models": {"sft": "runs/sft/best", "minillm": "runs/minillm/best"}, "seeds": [10, 20, 30],
        "metrics": ["rouge_l", "exact_match", "dist_4", "lm_loss", "length"],
        "test_sets": {"dolly": {"path": "data/test.jsonl", "format": "dolly", "examples": 500, "has_references": True},
                      "vicuna": {"path": "data/vicuna.jsonl", "format": "vicuna", "examples": 80, "has_references": False}},
        "skipped_long_prompt": {"sft": {"dolly": 3, "vicuna": 0}, "minillm": {"dolly": 3, "vicuna": 0}},
        "summary": summary,
        "exposure_bias": {"sft": curve([1.0, 2.2, 3.6, 5.2], [1.0, 2.0, 3.0, 4.0]),
                          "minillm": curve([0.5, 1.0, 1.6, 2.1], [0.0, 1.0, 1.5, 2.0])},  # eps(1) = 0: undefined
        "exposure_settings": {"teacher": "teacher/", "test_set": "dolly", "prompts": 16, "samples": 8},
        "calibration": {"sft": calibration_report(probs, answers, bins=5),
                        "minillm": calibration_report([[0.9, 0.05, 0.05]] * 10, [0] * 9 + [1], bins=5)},
        "config": {"method": "sft", "eval": {"seeds": [10, 20, 30]}},
    }


RESULTS = _results()
TOY = {
    "target": {"weights": [0.4, 0.6], "means": [-2.5, 2.0], "stds": [0.6, 1.0]},
    "fits": {"forward": {"mu": 0.2, "sigma": 2.367, "forward_kl": 0.4004, "reverse_kl": 0.7726},
             "reverse": {"mu": 1.963, "sigma": 1.053, "forward_kl": 3.0193, "reverse_kl": 0.5014}},
}


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    """A demo-like folder: two runs (one with an eval/ subfolder and a toy/), all fake."""
    root = tmp_path / "study"
    sft = _write_run(root / "runs" / "sft", "sft")
    _write_run(root / "runs" / "minillm", "minillm", rollout=True)
    (sft / "eval").mkdir()
    (sft / "eval" / "results.json").write_text(json.dumps(RESULTS))
    (sft / "toy").mkdir()
    (sft / "toy" / "toy.json").write_text(json.dumps(TOY))
    return root


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_sections_images_and_numbers(study: Path) -> None:
    runs = study / "runs"
    path = write_report([runs / "sft", runs / "minillm"], None)
    out = runs / "sft" / "report"
    assert path == out / "report.html"
    page, md = path.read_text(), (out / "report.md").read_text()

    imgs = _img_sources(page)
    # overlays of valid loss; curves of two runs; exposure bias; calibration; toy
    assert len(imgs) == 6, imgs
    for src in imgs:
        f = out / src
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == sorted(imgs)
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must not load anything external"

    # the comparison tables hold the numbers (mean ± sample std over the 3 seeds), in the runner's column order
    table = next(line for line in md.splitlines() if line.startswith("| model"))
    assert table == "| model | Rouge-L | Exact match | Dist-4 | LM loss | Length (tokens) |"
    assert "| sft | 24.00 ± 1.00 | 2.00 ± 1.00 | 88.50 ± 0.50 | 2.345 ± 0.000 | 41.00 ± 1.00 |" in md
    assert "| minillm | 27.50 ± 0.50 | 3.00 ± 0.00 | 92.00 ± 1.00 | 2.901 ± 0.000 | 35.00 ± 0.00 |" in md
    assert "| sft | n/a | n/a | 71.00 ± 1.00 |" in md  # no references on vicuna
    assert '<td class="num">27.50 ± 0.50</td>' in page
    assert "over 3 sampling seed(s): 10, 20, 30" in md and "prompts skipped as too long: sft 3, minillm 3" in md
    # exposure bias at l_max (from R and eps), the undefined point reported; calibration numbers
    assert "| sft | 4 | 30.00 | 5.2000 | 4.0000 |" in md and "| minillm | 4 | 5.00 | 2.1000 | 2.0000 |" in md
    assert "exposure_bias.minillm: ExAccErr undefined (null) at 1 of 4 lengths" in md
    for model, cal in RESULTS["calibration"].items():
        assert f"| {model} | {cal['ece']:.4f} | {cal['accuracy']:.4f} | {cal['mean_confidence']:.4f} | {cal['n']} |" in md
    assert "| minimise reverse KL | 1.963 | 1.053 | 3.0193 | 0.5014 |" in md
    # training summary: best from summary.json, last valid loss from metrics.jsonl (2.5 - 0.1 * 12)
    assert re.search(r"\| sft \| sft \| 12 \| 1\.3 at step 12 \(loss\) \| 1\.3000 \| - \|", md), md
    # configs, environment
    assert page.count("<details>") == 3 and md.count("```yaml") == 3  # two runs and the evaluation
    for key in ("python", "torch", "transformers", "device", "platform", "date (UTC)"):
        assert f"<td>{key}</td>" in page


def test_report_escapes_all_text(study: Path) -> None:
    page = write_report([study / "runs" / "sft"], study / "out").read_text()
    assert EVIL not in page and "<script>alert" not in page
    assert html_escaped(EVIL) in page  # the model name in the table and the config text
    assert page.count("<script>") == 1  # only the report's own image check
    md = (study / "out" / "report.md").read_text()
    assert "<script>" not in md.split("```yaml")[0]  # outside code blocks Markdown gets no raw HTML


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_parent_folder_is_expanded_and_sections_follow_the_data(tmp_path: Path, study: Path) -> None:
    src = collect_sources([study])
    assert sorted(r.name for r in src.runs) == ["minillm", "sft"]
    assert [e.name for e in src.evals] == ["eval"] and [t.name for t in src.toys] == ["toy"]

    # a run with no eval, no toy, no summary and a cut-off last line: no comparison, a warning
    lone = _write_run(tmp_path / "lone", "sft", steps=3, summary=False)
    with (lone / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "lo')
    page = write_report([lone], None).read_text()
    assert "Comparison" not in page and "Exposure bias" not in page and "Calibration" not in page
    assert "incomplete last line dropped" in page and "no summary.json" in page
    assert len(_img_sources(page)) == 1  # only the run's curves


def test_bad_inputs_raise_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no metrics.jsonl"):
        write_report([tmp_path], None)
    bad = _write_run(tmp_path / "bad", "sft", steps=3)
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text("\n".join([lines[0], "oops", lines[2]]) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not a JSON object"):
        write_report([bad], None)
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "results.json").write_text("{")
    with pytest.raises(UserError, match=r"results\.json:1: not valid JSON"):
        write_report([ev], None)
    (ev / "results.json").write_text(json.dumps({"results": {"m": {"d": {"rouge_l": 1.0}}}}))
    with pytest.raises(UserError, match=r"results\.json: has no 'summary' mapping"):
        write_report([ev], None)


def test_malformed_eval_sections_are_reported_not_plotted(tmp_path: Path) -> None:
    ev = tmp_path / "eval"
    ev.mkdir()
    broken = {"summary": RESULTS["summary"], "exposure_bias": {"sft": {"lengths": [1, 2], "ex_acc_err": [1.0]}},
              "calibration": {"sft": {"bins": []}}}
    (ev / "results.json").write_text(json.dumps(broken))
    page = write_report([ev], None).read_text()
    assert "exposure_bias.sft needs equal-length" in page and "calibration.sft needs" in page
    assert "Exposure bias (" not in page and _img_sources(page) == []


def test_report_of_a_real_tiny_run_and_its_evaluation(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    from minillm.config import config_from_dict
    from minillm.eval.runner import run_eval
    from minillm.report import plot_run_curves
    from minillm.trainer import train

    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", method="minillm",
                                            train={"max_steps": 2, "eval_every": 1, "save_every": 100}))
    run = train(cfg)
    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps({"prompt": f"Name a colour {i}.", "choices": ["red", "blue", "green"],
                                           "answer": i % 3}) + "\n" for i in range(6)))
    run_eval(config_from_dict(tiny_config_dict(
        tiny_task, run, eval={"models": {"student": str(run / "final")}, "test": {"task": str(tiny_task["test"])},
                              "seeds": [1, 2], "max_examples": 4, "exposure_bias": True, "exposure_samples": 1,
                              "exposure_max_prompts": 2, "exposure_min_at_risk": 1, "calibration": str(choices), "calibration_bins": 4},
        generation={"max_new_tokens": 8})))

    path = write_report([run], None)  # the run folder, its eval/ found inside
    page, md = path.read_text(), (run / "report" / "report.md").read_text()
    imgs = _img_sources(page)
    # both default exposure protocols, each its own figure (ExAccErr beside R and eps)
    assert imgs == ["curves_00_run.png", "exposure_fixed_length_00_eval.png", "exposure_length_fair_00_eval.png",
                    "calibration_00_eval.png"]
    assert all((run / "report" / f).is_file() for f in imgs)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert f"{rows[-1]['valid_loss']:.4f}" in md and "method: minillm" in md
    results = json.loads((run / "eval" / "results.json").read_text())
    cell = results["summary"]["student"]["task"]["rouge_l"]
    assert f"| student | {cell['mean']:.2f} ± {cell['std']:.2f} |" in md
    assert f"| student | {results['calibration']['student']['ece']:.4f} |" in md
    # every rollout-step term the trainer logs is drawn
    drawn = plot_run_curves(collect_sources([run]).runs[0], tmp_path / "c.png")
    assert {"loss", "reverse_kl", "reward", "response_len", "clip_frac", "valid_loss"} <= set(drawn)


# ---------------------------------------------------------------------------------------------
# A real headless browser renders the page.

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
          "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(study: Path, tmp_path: Path) -> None:
    from PIL import Image

    path = write_report([study / "runs" / "sft", study / "runs" / "minillm"], study / "report")
    url = path.resolve().as_uri()
    shot = tmp_path / "shot.png"
    common = [CHROMIUM, *_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2000", url],
                   check=True, capture_output=True, timeout=60)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    # not blank: plenty of ink on a white page, and many distinct grey levels (text, plots)
    assert (pixels < 200).mean() > 0.01 and len(np.unique(pixels)) > 50 and pixels.std() > 10

    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=60).stdout
    n = len(_img_sources(path.read_text()))
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None
    assert f'data-images-total="{n}"' in body.group(0) and f'data-images-loaded="{n}"' in body.group(0), body.group(0)
    assert 'data-images-ok="true"' in body.group(0)


def _protocol_results(shift: float) -> dict:
    """A results.json with both exposure protocols (the runner's curve writer), MiniLLM's R raised by ``shift``."""
    from minillm.eval.exposure import protocol_curve

    def curves(protocol: str) -> dict:
        out = {}
        for model, extra in (("sft", 0.0), ("minillm", shift)):
            kq = [np.array([0.2, 0.3 + extra, 0.4 + extra, 0.5]), np.array([0.2, 0.3 + extra, 0.4 + extra, 0.5])]
            kp = [np.array([0.2, 0.25, 0.3, 0.35])] * 2
            if protocol == "length_fair":
                kq = [kq[0], kq[1][:2]]
            out[model] = protocol_curve(protocol, kq, kp, ended_early=(1.0, 0.0) if protocol == "fixed_length" else None,
                                        length=4 if protocol == "fixed_length" else None).to_dict()
        return out

    return {"summary": RESULTS["summary"], "exposure_by_protocol": {p: curves(p) for p in ("fixed_length", "length_fair")},
            "exposure_bias": curves("fixed_length"),
            "exposure_settings": {"test_set": "long", "prompts": 2, "samples": 1, "max_new_tokens": 4,
                                  "protocols": ["fixed_length", "length_fair"], "seed": 10}}


def test_exposure_protocols_per_evaluation_and_over_pipeline_seeds(tmp_path: Path) -> None:
    evs = []
    for seed, shift in ((10, 0.1), (11, 0.3)):
        ev = tmp_path / f"seed_{seed}" / "eval"
        ev.mkdir(parents=True)
        (ev / "results.json").write_text(json.dumps(_protocol_results(shift)))
        evs.append(ev)
    path = write_report(evs, tmp_path / "report")
    page, md = path.read_text(), (tmp_path / "report" / "report.md").read_text()
    imgs = _img_sources(page)
    assert imgs == ["exposure_fixed_length_00_seed_10_eval.png", "exposure_length_fair_00_seed_10_eval.png",
                    "exposure_fixed_length_01_seed_11_eval.png", "exposure_length_fair_01_seed_11_eval.png",
                    "exposure_fixed_length_over_00.png", "exposure_length_fair_over_00.png"]
    assert all((tmp_path / "report" / f).read_bytes()[:4] == b"\x89PNG" for f in imgs)
    # per evaluation: R and eps beside the ratio, the early-EOS and at-risk counts
    R = 0.2 + 0.4 + 0.5 + 0.5  # seed 10, MiniLLM, fixed-length at l = 4
    eps = 0.2 + 0.25 + 0.3 + 0.35
    assert f"| minillm | 4 | {(R - eps) / eps * 100:.2f} | {R:.4f} | {eps:.4f} | 1 of 2 | 0 of 2 |" in md
    # length-fair: one student draw stopped at 2, so one of two runs at l = 4; the mean there is the same
    assert f"| sft | 4 | {(1.4 - eps) / eps * 100:.2f} | 1.4000 | {eps:.4f} | 1 of 2 | 2 of 2 |" in md
    # over the two seeds: mean ± sample std at l_max
    R2 = 0.2 + 0.6 + 0.7 + 0.5  # seed 11
    errs = [(R - eps) / eps * 100, (R2 - eps) / eps * 100]
    assert "Exposure bias over 2 evaluations, fixed_length" in md and "Exposure bias over 2 evaluations, length_fair" in md
    want = f"| minillm | 2 | 4 | {statistics.fmean(errs):.2f} ± {statistics.stdev(errs):.2f} | {(R + R2) / 2:.4f} ± "
    assert want in md
