"""`minillm toy` and `minillm report` through the CLI entry point, including their error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_config_dict
from minillm.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_toy_command_writes_the_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["toy", "--out", str(tmp_path / "toy")], capsys)
    assert code == 0 and "toy.png" in out
    assert (tmp_path / "toy" / "toy.png").stat().st_size > 1000 and (tmp_path / "toy" / "toy.json").exists()


def test_report_command_on_a_trained_run(tiny_task: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from minillm.config import config_from_dict
    from minillm.trainer import train

    run_dir = train(config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run")))
    code, out, _ = run(["report", str(run_dir), "--out", str(tmp_path / "report")], capsys)
    assert code == 0 and "report.html" in out
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<img" in html and (tmp_path / "report" / "report.md").exists()


def test_report_command_on_a_folder_with_nothing_to_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["report", str(empty)], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err
