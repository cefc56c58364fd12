"""The ``minillm`` command: training runs, and user errors as one ``error:`` line with exit status 2."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_config_dict
from minillm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(autouse=True)
def _quiet_state() -> Any:
    """The CLI installs its own logging handlers; give the next test pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``minillm ARGV`` in-process -> (exit status, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def write_config(task: dict[str, Path], tmp_path: Path, method: str = "sft", **sections: Any) -> Path:
    d = tiny_config_dict(task, tmp_path / f"run_{method}", method, **sections)
    d["train"].update(max_steps=2, eval_every=2, save_every=2)
    p = tmp_path / f"{method}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def assert_user_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert lines == errors, f"stderr holds more than the error line: {err!r}"
    for n in needles:
        assert n in errors[0], (n, errors[0])


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke(["--help"], capsys)
    assert code == 0
    for cmd in ("train", "generate", "eval", "demo", "report", "prepare", "init-student", "toy"):
        assert cmd in out
    code, out, _ = invoke(["train", "--help"], capsys)
    assert code == 0 and "OVERRIDES" in out


def test_version_and_a_light_package_import(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    import minillm

    assert minillm.__version__ == version("minillm")
    code, out, _ = invoke(["--version"], capsys)
    assert code == 0 and minillm.__version__ in out
    # `import minillm` alone must not pay for torch (the CLI's --help stays fast)
    probe = "import sys, minillm; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("method", ["sft", "minillm"])
def test_train_writes_metrics_and_final(method: str, tiny_task: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tiny_task, tmp_path, method)
    out = tmp_path / "elsewhere"
    code, stdout, err = invoke(["train", str(cfg), f"output_dir={out}", "train.lr=2e-3", "seed=4"], capsys)
    assert code == 0, err
    assert f"done: student saved in {out / 'final'}" in stdout
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["lr"] == pytest.approx(2e-3) for r in rows)
    assert (out / "final" / "config.json").is_file() and list((out / "final").glob("*.safetensors"))
    saved = yaml.safe_load((out / "config.yaml").read_text())  # the resolved config, overrides applied
    assert saved["method"] == method and saved["seed"] == 4 and saved["train"]["lr"] == pytest.approx(2e-3)


@pytest.fixture(scope="module")
def other_vocab_teacher(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher whose tokenizer has a different vocabulary from the student's."""
    from minillm.data.task import corpus_texts
    from minillm.tiny import build_word_tokenizer, save_pair, tiny_gpt2

    tok = build_word_tokenizer(["zebra quokka axolotl", *corpus_texts()])  # new words first: every id moves
    return save_pair(tiny_gpt2(tok, n_layer=1, n_embd=16, seed=0), tok, tmp_path_factory.mktemp("other") / "teacher")


def test_user_errors(tiny_task: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     other_vocab_teacher: Path) -> None:
    cfg = str(write_config(tiny_task, tmp_path))
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        (["train", str(tmp_path / "missing.yaml")], ("missing.yaml", "config file not found")),
        (["train", cfg, "train.lrr=1"], ("unknown key 'train.lrr'", "did you mean 'train.lr'")),
        (["train", cfg, "train.lr"], ("override 'train.lr'", "dotted.key=value")),
        (["train", cfg, "train.max_steps=abc"], ("train.max_steps", "integer")),
        (["train", cfg, f"data.train={tmp_path / 'nope.jsonl'}"], ("nope.jsonl", "not found")),
        (["train", cfg, f"student.path={tmp_path / 'no_student'}"], ("student.path", "no_student")),
        (["train", cfg, "method=minillm", f"teacher.path={other_vocab_teacher}"], ("tokenizers differ", "teacher.path")),
        (["train", cfg, "method=minillm", "minillm.rollouts_per_step=3"], ("minillm.rollouts_per_step", "multiple")),
    ]
    for argv, needles in cases:
        code, _, err = invoke(argv, capsys)
        assert_user_error(code, err, *needles)
    assert not (tmp_path / "run_sft" / "metrics.jsonl").exists()  # no error started a run


def test_bad_data_record_names_file_and_line(tiny_task: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n" + json.dumps({"text": "a"}) + "\n")
    code, _, err = invoke(["train", str(write_config(tiny_task, tmp_path)), f"data.train={bad}"], capsys)
    assert_user_error(code, err, f"{bad}:2", "no prompt field", "['text']")


def test_usage_error_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = invoke(["train"], capsys)
    assert code == 2 and "Missing argument 'CONFIG'" in err and "Traceback" not in err


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_python_dash_m_subprocess(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """The real process: a run succeeds with status 0; a user error is one stderr line with status 2."""
    cfg = write_config(tiny_task, tmp_path)
    out = tmp_path / "sub"
    ok = subprocess.run([sys.executable, "-m", "minillm", "train", str(cfg), f"output_dir={out}", "train.max_steps=1"],
                        capture_output=True, text=True, env=_env(), timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (out / "final").is_dir() and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    bad = subprocess.run([sys.executable, "-m", "minillm", "train", str(cfg), "trian.lr=1"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert_user_error(bad.returncode, bad.stderr, "unknown key 'trian'", "did you mean 'train'")
