"""`minillm demo --quick` end to end through the CLI: the table, the report, and stage reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minillm.cli import main
from minillm.demo_table import END, START, parse_block


def test_demo_quick_runs_reports_and_reuses_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    main(["demo", "--quick", "--out", str(out), "--readme", str(readme)])
    printed = capsys.readouterr().out
    for name in ("teacher", "sft", "kd", "seqkd", "minillm"):
        assert f"| {name} |" in printed
    assert "Exposure bias" in printed and "report:" in printed
    # the README block is the demo's own demo_table.md, between the markers, the rest untouched
    block = (out / "demo_table.md").read_text()
    text = readme.read_text()
    assert text == f"# x\n\nbefore\n{START}\n{block}{END}\nafter\n"
    parsed = parse_block(block)
    assert list(parsed["rows"]) == ["teacher", "SFT", "KD", "SeqKD", "MiniLLM"]
    assert parsed["caption"].startswith("`minillm demo --size quick`")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline_seeds"] == [10]
    html = out / "report" / "report.html"
    assert html.exists() and (out / "report" / "report.md").exists()
    assert "toy" in html.read_text().lower() and (out / "toy" / "toy.png").exists()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["summary"]) == {"teacher", "sft", "kd", "seqkd", "minillm"}
    rouge = {m: results["summary"][m]["task"]["rouge_l"]["mean"] for m in results["summary"]}
    # the teacher was trained on the task: it must clearly beat a one-layer student
    assert rouge["teacher"] > rouge["sft"] + 10
    for name in ("teacher", "sft", "kd", "seqkd", "minillm"):
        assert (out / "runs" / name / "final" / "config.json").exists()
    first = json.loads((out / "timings.json").read_text())

    main(["demo", "--quick", "--out", str(out)])  # a rerun reuses every finished stage
    capsys.readouterr()
    again = json.loads((out / "timings.json").read_text())
    for stage in ("teacher", "sft", "kd", "seqkd", "minillm"):
        assert again[stage] == pytest.approx(first[stage])  # the recorded time of the reused run
    assert again["total"] < first["total"]


@pytest.mark.parametrize("size", ["quick", "default", "large"])
def test_every_study_size_builds_valid_configs(size: str, tmp_path: Path) -> None:
    from minillm.demo import SIZES, study_configs

    data = {k: tmp_path / f"{k}.jsonl" for k in ("train", "valid", "test", "test_long")}
    cfgs = study_configs(tmp_path, SIZES[size], tmp_path / "models", data, "cpu", 10)
    assert cfgs["minillm"].student.path.endswith("sft/best")  # MiniLLM starts from the SFT student
    assert cfgs["kd"].student.path == cfgs["sft"].student.path == cfgs["seqkd"].student.path  # one start
    assert set(cfgs["eval"].eval.models) == {"teacher", "sft", "kd", "seqkd", "minillm"}


def test_demo_over_pipeline_seeds_writes_table_and_report_with_bands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several pipeline seeds (the pipeline itself replaced by fake evaluations): the table has both
    exposure protocols and the report over the seeds draws their curves together."""
    import minillm.demo as demo
    from test_demo_table import fake_results

    def fake_pipeline(out: Path, dims: object, name: str, device: str, seed: int, progress: object = None) -> str:
        rouge = {"teacher": 95, "sft": 68, "kd": 71, "seqkd": 69, "minillm": 79 - seed % 2}
        exacc = {"teacher": 0, "sft": 70, "kd": 66, "seqkd": 77, "minillm": 50 + 20 * (seed % 2)}
        (out / "eval").mkdir(parents=True)
        (out / "eval" / "results.json").write_text(json.dumps(fake_results(rouge, exacc)))
        return "table"

    monkeypatch.setattr(demo, "run_pipeline", fake_pipeline)
    printed = demo.run_demo(tmp_path / "demo", seeds=2)
    block = (tmp_path / "demo" / "demo_table.md").read_text()
    parsed = parse_block(block)
    assert "ExAccErr FL(24) %" in parsed["header"] and "ExAccErr LF(2) %" in parsed["header"]
    assert any(c.startswith("ExAccErr LF(2) %: MiniLLM's excess error is") for c in parsed["conclusions"])
    md = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "Exposure bias over 2 evaluations, fixed_length" in md and "Exposure bias over 2 evaluations, length_fair" in md
    assert (tmp_path / "demo" / "report" / "exposure_length_fair_over_00.png").is_file()
    assert "report over the seeds:" in printed
