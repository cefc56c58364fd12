"""`minillm sweep`: the ready-made sweep files, --print-commands, sweep-file errors with file:line,
and the ablation and alpha sweeps end to end on the demo's task at tiny sizes, with their report."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from minillm.cli import main
from minillm.config import load_config
from minillm.demo import DemoSize
from minillm.errors import UserError
from minillm.sweep import load_sweep, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
# the demo at its smallest: a 1-layer teacher, 4 MiniLLM steps (one rollout phase), 2 sampling seeds
TINY = DemoSize(120, 8, 30, (1, 32), (1, 24), 30, 6, 4, 16, (10, 20), 30, 8, 1, max_new_tokens=48, max_len=112)  # short generations: a smoke test


def cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.chdir(ROOT)  # the sweep files name paths relative to the repository root
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the ready-made sweeps and --print-commands ------------------------------------------------

EXPECTED = {
    "ablation.yaml": ["full", "no_length_norm", "no_teacher_mix", "no_single_step", "no_pt"],
    "alpha.yaml": ["alpha=0", "alpha=0.1", "alpha=0.2", "alpha=0.3", "alpha=0.5"],
    "scaling.yaml": [f"{t}+{m}" for t in ("medium", "large", "xl") for m in ("minillm", "seqkd")],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_print_commands_rebuild_every_planned_run(name: str, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = cli(["sweep", f"configs/sweeps/{name}", "--print-commands"], capsys, monkeypatch)
    assert code == 0
    sweep = load_sweep(f"configs/sweeps/{name}")
    assert [r.name for r in sweep.runs] == EXPECTED[name]
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    gens = [ln for ln in lines if ln.startswith("minillm generate ")]
    runs = [ln for ln in lines if ln.startswith("minillm train ")]
    assert len(runs) == len(sweep.runs) and len(gens) + len(runs) == len(lines)  # one line per run
    for line, run in zip(runs, sweep.runs):
        train_cmd, eval_cmd = line.split(" && ")
        argv = shlex.split(train_cmd)
        assert Path(argv[2]).is_file()
        assert load_config(argv[2], argv[3:]) == run.cfg  # the printed command is the planned run
        assert run.cfg.output_dir == f"runs/sweeps/{name[:-5]}/{run.name}"
        argv = shlex.split(eval_cmd)
        assert argv[:2] == ["minillm", "eval"] and load_config(argv[2], argv[3:]) == run.eval_cfg
        assert run.eval_cfg is not None and run.eval_cfg.eval.models == {run.name: f"{run.cfg.output_dir}/best"}
        assert run.eval_cfg.eval.test == {"dolly": "data/dolly/test.jsonl"}
    if name == "scaling.yaml":
        # SeqKD trains on each teacher's own samples, written first by `minillm generate`
        for gen, teacher in zip(gens, ("medium", "large", "xl")):
            argv = shlex.split(gen)
            cfg = load_config(argv[2], argv[3 : argv.index("--model")])
            assert cfg.teacher.path == f"runs/paper/gpt2/sft-{teacher}/best" and cfg.data.train == "data/dolly/train.jsonl"
            assert argv[-1] == f"data/dolly/seqkd-gpt2-{teacher}.jsonl"
        seqkd = {r.levels["teacher"]: r.cfg for r in sweep.runs if r.cfg.method == "seqkd"}
        assert {t: c.data.train for t, c in seqkd.items()} == {t: f"data/dolly/seqkd-gpt2-{t}.jsonl" for t in seqkd}
        assert all(c.train.lr == 5e-4 and c.student.path == "gpt2" for c in seqkd.values())  # SeqKD's own recipe
    if name == "ablation.yaml":  # one switch per variant, everything else the paper's
        cfgs = {r.name: r.cfg for r in sweep.runs}
        assert cfgs["full"].minillm == load_config(ROOT / "configs/paper/gpt2/minillm-base.yaml").minillm
        assert (cfgs["no_length_norm"].minillm.length_norm, cfgs["no_teacher_mix"].minillm.alpha) == (False, 0.0)
        assert (cfgs["no_single_step"].minillm.single_step, cfgs["no_pt"].data.pretrain) == (False, None)
        assert cfgs["full"].data.pretrain is not None


def test_command_line_grid_and_overrides(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = cli(["sweep", "configs/sweeps/alpha.yaml", "--grid", "minillm.alpha=0,0.5", "--grid",
                        "minillm.alpha_schedule=constant,linear", "train.max_steps=10", "--out", "runs/x", "--print-commands"],
                       capsys, monkeypatch)
    assert code == 0
    runs = [ln for ln in out.splitlines() if ln.startswith("minillm train")]
    names = [re.search(r"output_dir=runs/x/(\S+)", ln).group(1) for ln in runs]  # type: ignore[union-attr]
    assert names == ["alpha=0+alpha_schedule=constant", "alpha=0+alpha_schedule=linear",
                     "alpha=0.5+alpha_schedule=constant", "alpha=0.5+alpha_schedule=linear"]
    argv = shlex.split(runs[3].split(" && ")[0])
    cfg = load_config(argv[2], argv[3:])
    assert (cfg.minillm.alpha, cfg.minillm.alpha_schedule, cfg.train.max_steps) == (0.5, "linear", 10)
    # a plain run config sweeps too
    code, out, _ = cli(["sweep", "configs/gpt2-sft.yaml", "--grid", "train.adam_betas=[0.9, 0.95],[0.9, 0.999]", "--print-commands"],
                       capsys, monkeypatch)
    assert code == 0 and out.count("minillm train") == 2  # commas inside brackets do not split values
    # no eval.test in that config: nothing to evaluate, the line is the training command alone
    assert ("minillm train configs/gpt2-sft.yaml 'train.adam_betas=[0.9, 0.95]' "
            "output_dir=runs/sweeps/gpt2-sft-sweep/adam_betas=0.9_0.95") in out.splitlines()


def test_printed_values_read_back_as_overrides() -> None:
    from minillm.config import parse_override
    from minillm.sweep import _format_value

    for value in (1e-6, "10", None, True, [0.9, 0.95], {"a": "b c"}, "with space", "0.1", 0, "runs/x,y", "null", "", "a: b"):
        back = parse_override(f"k={_format_value(value)}")[1]
        assert back == value and type(back) is type(value), value


def _errors(tmp_path: Path, text: str, **kw: Any) -> str:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_sweep(p, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_sweep_file_errors_name_the_line(tmp_path: Path) -> None:
    base = (ROOT / "configs/paper/gpt2/minillm-base.yaml").as_posix()
    head = f"sweep:\n  base: {base}\n"
    assert re.search(r"s.yaml:3: unknown key 'sweep.gird'; did you mean 'sweep.grid'", _errors(tmp_path, head + "  gird: {}\n"))
    grid = head + "  grid:\n    variant:\n      full: {}\n      odd: {minillm.alpha: 1.5}\n"
    assert re.search(r"s.yaml:6: minillm.alpha: must lie in \[0, 1\)", _errors(tmp_path, grid))
    grid = head + "  grid:\n    variant:\n      typo:\n        minillm.alpah: 0\n"
    assert re.search(r"s.yaml:6: unknown key 'minillm.alpah'; did you mean 'minillm.alpha'", _errors(tmp_path, grid))
    assert re.search(r"s.yaml:4: sweep.grid.minillm.alpha: needs at least one value",
                     _errors(tmp_path, head + "  grid:\n    minillm.alpha: []\n"))
    assert re.search(r"s.yaml:5: sweep.grid.v.full: expected a mapping of overrides",
                     _errors(tmp_path, head + "  grid:\n    v:\n      full: 3\n"))
    assert re.search(r"s.yaml:5: sweep.reference: 'fll' is no level",
                     _errors(tmp_path, head + "  grid:\n    minillm.alpha: [0]\n  reference: fll\n"))
    assert "no grid" in _errors(tmp_path, head)
    assert "is swept by the grid" in _errors(tmp_path, head + "  grid:\n    minillm.alpha: [0]\n", overrides=["minillm.alpha=0.3"])
    assert "must name an axis" in _errors(tmp_path, head + "  grid:\n    v:\n      a: {output_dir: '{teacher}'}\n")
    assert "sweep.demo: false" in _errors(tmp_path, head + "  grid:\n    minillm.alpha: [0]\n  demo: false\n", demo=TINY)
    assert "run alpha=0: student.path: is required" in _errors(tmp_path, "sweep:\n  grid:\n    minillm.alpha: [0]\n")  # no base


def test_cli_reports_a_sweep_error_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = cli(["sweep", "configs/sweeps/alpha.yaml", "--grid", "minillm.alpha", "--print-commands"], capsys, monkeypatch)
    assert code == 2 and err.strip().startswith("error: --grid 'minillm.alpha': expected key=v1,v2") and len(err.strip().splitlines()) == 1
    code, _, err = cli(["sweep", "configs/sweeps/alpha.yaml", "--demo", "--print-commands"], capsys, monkeypatch)
    assert code == 2 and "--print-commands with --demo" in err


# --- end to end on the demo's task ---------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweeps")
    out = {}
    for name in ("ablation", "alpha"):
        # one demo teacher and SFT student for both sweeps: root/demo-tiny
        sweep = load_sweep(SWEEPS / f"{name}.yaml", out=root / name, demo=TINY, demo_size="tiny", device="cpu")
        text = run_sweep(sweep)
        assert "report: " in text
        out[name] = root / name
    return out


def _results(folder: Path, run: str) -> dict[str, Any]:
    return json.loads((folder / run / "eval" / "results.json").read_text())


def test_ablation_sweep_report_has_the_papers_table(demo_sweeps: dict[str, Path]) -> None:
    folder = demo_sweeps["ablation"]
    manifest = json.loads((folder / "sweep.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == EXPECTED["ablation.yaml"]
    assert all(r["status"] == {"train": "trained", "eval": "done"} for r in manifest["runs"])
    cfgs = {r: load_config(folder / r / "config.yaml") for r in EXPECTED["ablation.yaml"]}
    assert cfgs["full"].data.pretrain is not None and cfgs["no_pt"].data.pretrain is None  # L_PT on the task's corpus
    assert cfgs["no_teacher_mix"].minillm.alpha == 0 and cfgs["full"].teacher.path == str(folder.parent / "demo-tiny/runs/teacher/best")
    md = (folder / "report" / "report.md").read_text()
    table = md.split("### Ablation: Rouge-L and the change from full", 1)[1].split("###", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert rows[0] == "| variant | valid Rouge-L (best) | task Rouge-L | long Rouge-L |"
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == EXPECTED["ablation.yaml"]

    def rouge(run: str, test: str) -> float:
        return _results(folder, run)["summary"][run][test]["rouge_l"]["mean"]

    ref = rouge("full", "task")
    for row, run in zip(rows[2:], EXPECTED["ablation.yaml"][1:]):
        cell = row.split(" | ")[2]
        assert cell.startswith(f"{rouge(run, 'task'):.2f} ± ") and cell.endswith(f"({rouge(run, 'task') - ref:+.2f})")
    assert "(" not in rows[1].split(" | ")[2]  # the reference row has no change
    html = (folder / "report" / "report.html").read_text()
    assert 'src="sweep_00_curves.png"' in html and (folder / "report" / "sweep_00_curves.png").stat().st_size > 10_000
    # semantic diversity and self-BLEU on the demo's multi-answer prompts
    res = _results(folder, "full")
    assert res["valid_answers"]["full"]["task"]["samples"] == 2 and res["valid_answers"]["full"]["task"]["prompts"] > 0
    assert "self_bleu" in res["summary"]["full"]["task"] and "distinct valid answers" in md


def test_alpha_sweep_plots_metrics_against_alpha_and_reuses_finished_runs(demo_sweeps: dict[str, Path]) -> None:
    folder = demo_sweeps["alpha"]
    for run, a in zip(EXPECTED["alpha.yaml"], (0, 0.1, 0.2, 0.3, 0.5)):
        rows = [json.loads(ln) for ln in (folder / run / "metrics.jsonl").read_text().splitlines()]
        assert {r["alpha"] for r in rows} == {a}
    md = (folder / "report" / "report.md").read_text()
    assert "![evaluation metrics against minillm.alpha" in md and (folder / "report" / "sweep_00_minillm.alpha.png").stat().st_size > 10_000
    assert "### Ablation: Rouge-L and the change from 0.2" in md
    # a rerun trains and evaluates nothing
    stamps = {r: (folder / r / "metrics.jsonl").stat().st_mtime_ns for r in EXPECTED["alpha.yaml"]}
    sweep = load_sweep(SWEEPS / "alpha.yaml", out=folder, demo=TINY, demo_size="tiny", device="cpu")
    run_sweep(sweep)
    manifest = json.loads((folder / "sweep.json").read_text())
    assert all(r["status"] == {"train": "reused", "eval": "reused"} for r in manifest["runs"])
    assert stamps == {r: (folder / r / "metrics.jsonl").stat().st_mtime_ns for r in EXPECTED["alpha.yaml"]}
    # a changed config in a finished run's folder is refused, naming the key
    with pytest.raises(UserError, match=r"alpha=0: holds run alpha=0 with another config \(train.lr differ\)"):
        run_sweep(load_sweep(SWEEPS / "alpha.yaml", None, ["train.lr=0.5"], out=folder, demo=TINY, demo_size="tiny", device="cpu"))
