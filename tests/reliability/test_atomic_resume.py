"""Issue 7, defects 2 and 5: a kill while a resume-critical file is written never bricks the run
folder, and the resume fingerprint means the run (resolved paths, data contents), not the way its
folder was spelled."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_config_dict, train_cli
from minillm.atomic import FAULT_ENV, replace_folder_atomic, write_text_atomic
from minillm.config import config_from_dict
from minillm.errors import UserError
from minillm.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(task: dict[str, Path], out: Path | str, steps: int = 2, **data: Any) -> Any:
    d = tiny_config_dict(task, Path(out), "sft", train={"max_steps": steps, "save_every": 2, "eval_every": 100})
    d["output_dir"] = str(out)  # kept as spelled (a trailing slash survives)
    d["data"].update(data)
    return config_from_dict(d)


def _steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


_cli = train_cli


# --- atomic writes -------------------------------------------------------------------------------


def test_write_text_atomic_leaves_old_or_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "f.json"
    write_text_atomic(p, "old")
    monkeypatch.setenv(FAULT_ENV, "enospc:f.json")
    with pytest.raises(UserError, match=f"no space left on device while writing {p}"):
        write_text_atomic(p, "new")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["f.json"]  # no temp left


def test_replace_folder_atomic_recovers_a_crash_between_renames(tmp_path: Path) -> None:
    out = tmp_path / "best"
    replace_folder_atomic(out, lambda t: (t.mkdir(), (t / "w").write_text("1")))
    out.rename(tmp_path / "best.old")  # a kill after the first rename, before the second
    (tmp_path / "best.tmp").mkdir()
    replace_folder_atomic(out, lambda t: (t.mkdir(), (t / "w").write_text("2")))
    assert (out / "w").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]

    def fail(t: Path) -> None:
        t.mkdir()
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="no space left on device while writing .*best.tmp"):
        replace_folder_atomic(out, fail)
    assert (out / "w").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_kill_while_config_hash_is_written_does_not_brick_the_run(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """Real processes: killed (SIGKILL) halfway through writing config.hash at start-up, then
    halfway through the metrics.jsonl rewrite of a resume; the plain rerun resumes, no row lost."""
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    d = tiny_config_dict(tiny_task, out, "sft", train={"max_steps": 4, "save_every": 2, "eval_every": 100})
    path.write_text(yaml.safe_dump(d))
    train(config_from_dict(d))  # 4 steps; checkpoints 2 and 4
    shutil.rmtree(out / "checkpoints" / "step_00000004")  # as if killed before the step-4 save: resume redoes 3, 4
    hash_before, rows_before = (out / "config.hash").read_text(), (out / "metrics.jsonl").read_text()

    r = _cli(path, fault="kill:config.hash")
    assert r.returncode == -9, r.stderr
    assert (out / "config.hash").read_text() == hash_before  # the old file, whole

    assert list(out.glob(".config.hash.tmp.*"))  # the half-written temp the kill left

    r = _cli(path, fault="kill:metrics.jsonl")
    assert r.returncode == -9, r.stderr
    assert (out / "metrics.jsonl").read_text() == rows_before  # the rewrite never half-happened
    assert not list(out.glob(".config.hash.tmp.*"))  # cleared at start-up

    r = _cli(path)
    assert r.returncode == 0, r.stderr
    assert _steps(out) == [1, 2, 3, 4] and not list(out.glob(".*.tmp.*"))


def test_empty_config_hash_is_rewritten_not_refused(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """An empty config.hash (a pre-atomic write cut short), no fingerprint beside it: the rerun warns and resumes."""
    out = tmp_path / "run"
    train(_cfg(tiny_task, out))
    (out / "config.hash").write_text("")
    (out / "run_fingerprint.json").unlink()
    train(_cfg(tiny_task, out, steps=3))
    assert _steps(out) == [1, 2, 3]
    assert len((out / "config.hash").read_text().strip()) == 16 and (out / "run_fingerprint.json").is_file()


# --- fingerprint ---------------------------------------------------------------------------------


def test_output_dir_spelling_and_a_moved_folder_are_the_same_run(tiny_task: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train(_cfg(tiny_task, "run", steps=1))
    train(_cfg(tiny_task, "run/", steps=2))  # trailing slash
    train(_cfg(tiny_task, str(tmp_path / "run"), steps=3))  # absolute
    shutil.move(tmp_path / "run", tmp_path / "moved")
    train(_cfg(tiny_task, tmp_path / "moved", steps=4))  # moved
    assert _steps(tmp_path / "moved") == [1, 2, 3, 4]


def test_relative_and_absolute_data_paths_are_the_same_run(tiny_task: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_task["train"].parent)
    train(_cfg(tiny_task, tmp_path / "run", steps=1, train=tiny_task["train"].name))
    train(_cfg(tiny_task, tmp_path / "run", steps=2, train=str(tiny_task["train"])))
    assert _steps(tmp_path / "run") == [1, 2]


def test_changed_config_names_the_keys(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_cfg(tiny_task, out))
    d = tiny_config_dict(tiny_task, out, "sft", train={"max_steps": 3, "save_every": 2, "eval_every": 100, "lr": 5e-4})
    d["seed"] = 4
    with pytest.raises(UserError) as e:
        train(config_from_dict(d))
    msg = str(e.value)
    assert "train.lr: 0.001 -> 0.0005" in msg and "seed: 3 -> 4" in msg and "\n" not in msg
    assert _steps(out) == [1, 2]


@pytest.mark.parametrize("mode", ["stat", "hash"])
def test_changed_data_file_is_refused_naming_it(tiny_task: dict[str, Path], tmp_path: Path, mode: str) -> None:
    data = tmp_path / "train.jsonl"
    shutil.copy(tiny_task["train"], data)
    out = tmp_path / "run"
    train(_cfg(tiny_task, out, train=str(data), fingerprint=mode))
    st = data.stat()
    text = data.read_text()
    # same size and modification time, other contents: only the content hash can tell
    data.write_text(text.replace("a", "b", 1) if "a" in text else "x" + text[1:])
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    if mode == "stat":
        train(_cfg(tiny_task, out, steps=3, train=str(data), fingerprint=mode))  # stat cannot see it
        data.write_text(text + "\n")  # a change of size it does see
        steps = 4
    else:
        steps = 3
    with pytest.raises(UserError) as e:
        train(_cfg(tiny_task, out, steps=steps, train=str(data), fingerprint=mode))
    assert f"data.train: {data}" in str(e.value) and "changed since this run started" in str(e.value)


def test_old_run_folder_with_only_config_hash_still_resumes(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    from minillm.fingerprint import legacy_hash

    out = tmp_path / "run"
    train(_cfg(tiny_task, out))
    (out / "run_fingerprint.json").unlink()
    (out / "config.hash").write_text(legacy_hash(_cfg(tiny_task, out)))  # what the code before it wrote
    train(_cfg(tiny_task, out, steps=3))
    assert _steps(out) == [1, 2, 3] and (out / "run_fingerprint.json").is_file()
    (out / "run_fingerprint.json").unlink()
    (out / "config.hash").write_text("0123456789abcdef")  # an old run with another config
    with pytest.raises(UserError, match="different config.*config.yaml"):
        train(_cfg(tiny_task, out, steps=4))


def test_legacy_hash_equals_what_the_code_before_the_fingerprint_wrote() -> None:
    """Pinned from the release that wrote only ``config.hash`` (``trainer._comparable_hash`` of
    minillm before the fingerprint, on ``Config()`` with ``output_dir=runs/x``): keys added since
    must not change it, or every such folder is refused as a different run after an upgrade."""
    from minillm.config import Config
    from minillm.fingerprint import legacy_hash

    cfg = Config()
    cfg.output_dir = "runs/x"
    assert legacy_hash(cfg) == "9ab82bf9f283787a"
