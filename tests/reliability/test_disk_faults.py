"""Issue 7, defect 7 (disk part): a full disk, a read-only folder and an output_dir that runs
through a file each give one line and exit 2, with no half-written checkpoint left behind."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import minillm.checkpoint as checkpoint_mod
from conftest import tiny_config_dict, train_cli
from minillm.config import config_from_dict
from minillm.errors import UserError
from minillm.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _dict(task: dict[str, Path], out: Path, steps: int = 4) -> dict[str, Any]:
    return tiny_config_dict(task, out, "sft", train={"max_steps": steps, "save_every": 2, "eval_every": 100})


_cli = train_cli


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


# how the writers word a full disk: Python's OSError, and safetensors' own error type (never an OSError)
FULL = {
    "oserror": lambda p: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p)),
    "safetensors": lambda p: RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })'),
}


@pytest.mark.parametrize("kind", list(FULL))
def test_full_disk_while_checkpointing_is_one_line(kind: str, tiny_task: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real = checkpoint_mod.save_state

    def full_at_4(state: Any, folder: Path, name: str) -> Any:
        if state["step"] == 4:
            (Path(folder) / "trainer_state.safetensors").write_bytes(b"half")  # what a writer leaves
            raise FULL[kind](folder)
        return real(state, folder, name)

    monkeypatch.setattr(checkpoint_mod, "save_state", full_at_4)
    with pytest.raises(UserError) as e:
        train(config_from_dict(_dict(tiny_task, out)))
    msg = str(e.value)
    assert msg.startswith(f"no space left on device while writing {out / 'checkpoints' / '.tmp_step_00000004'}")
    assert f"the last complete checkpoint is {out / 'checkpoints' / 'step_00000002'}" in msg and "\n" not in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # no .tmp_step_* left


def test_read_only_filesystem_while_checkpointing(tiny_task: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(checkpoint_mod, "save_state", read_only)
    with pytest.raises(UserError, match=r"cannot write .*\.tmp_step_00000002 \(the filesystem is read-only\); the last "
                                        r"complete checkpoint is none"):
        train(config_from_dict(_dict(tiny_task, tmp_path / "run", steps=2)))


def test_full_disk_through_the_command_line(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """A real process with a full-disk fault injected into the checkpoint writer: exit 2, one line,
    the temp folder gone; the same command without the fault then finishes the run."""
    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_dict(tiny_task, out, steps=2)))
    line = _one_error_line(_cli(path, fault="enospc:checkpoint"))
    assert "no space left on device while writing" in line and ".tmp_step_00000002" in line
    assert "the last complete checkpoint is none" in line
    assert list((out / "checkpoints").iterdir()) == []
    assert _cli(path).returncode == 0 and (out / "checkpoints" / "step_00000002").is_dir()


def test_output_dir_below_a_file_is_one_line(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    """A path that runs through a file (the read-only case a root user can still make)."""
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_dict(tiny_task, tmp_path / "afile" / "run")))
    line = _one_error_line(_cli(path))
    assert "cannot write" in line and "afile" in line and "a part of the path is a file" in line


def test_output_dir_that_is_a_file_is_one_line(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="output_dir: .*afile is a file"):
        train(config_from_dict(_dict(tiny_task, tmp_path / "afile")))


def test_read_only_output_folder_is_one_line(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config_from_dict(_dict(tiny_task, out, steps=2)))
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (the file-as-folder test covers this path)")
        with pytest.raises(UserError, match="cannot write .*permission denied"):
            train(config_from_dict(_dict(tiny_task, out, steps=3)))
    finally:
        out.chmod(0o755)


def test_unwritable_output_folder_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only folder gives a non-root user (EACCES on the first temp file), made here
    without chmod, which root ignores."""
    import minillm.atomic as atomic
    from minillm.trainer import prepare_output_dir

    def denied(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(atomic, "open", denied, raising=False)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        prepare_output_dir(config_from_dict({"output_dir": str(out)}))
    assert str(e.value) == f"cannot write {out / 'config.yaml'} (permission denied); give an output_dir you can write to"
