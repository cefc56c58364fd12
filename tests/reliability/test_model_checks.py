"""Model and path checks before anything loads (issue 7, defect 7, the input part): a model whose
context is shorter than data.max_len, a missing model folder (no Hub retries), and every path of
train / eval / generate checked before the first model loads."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_config_dict
from minillm.config import config_from_dict
from minillm.errors import UserError
from minillm.preflight import check_paths

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a tokenizer or weights fails the test: the check must come first."""
    import transformers

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a model or tokenizer was loaded before the paths were checked: {args[:1]}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def short_model(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny student with 64 positions (the tiny configs use data.max_len=96)."""
    from transformers import AutoTokenizer

    from minillm.tiny import save_pair, tiny_gpt2

    tok = AutoTokenizer.from_pretrained(tiny_task["student"])
    return save_pair(tiny_gpt2(tok, n_layer=1, n_embd=16, n_positions=64), tok, tmp_path_factory.mktemp("short") / "model")


def _cfg(tiny_task: dict[str, Path], tmp_path: Path, method: str = "sft", **sections: dict) -> Any:
    return config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", method=method, **sections))


def test_short_context_is_refused_before_weights_load(tiny_task: dict[str, Path], tmp_path: Path, short_model: Path,
                                                      no_model_loads: None) -> None:
    """Before: an IndexError deep inside GPT-2's position embedding, after both models loaded."""
    from minillm.trainer import train

    want = (rf"^data\.max_len: 96 tokens is longer than the context of student\.path '{short_model}' \(64 tokens, config "
            r"max_position_embeddings\); set data\.max_len to at most 64")
    with pytest.raises(UserError, match=want):
        train(_cfg(tiny_task, tmp_path, student={"path": str(short_model)}))
    teacher = want.replace("student", "teacher")
    with pytest.raises(UserError, match=teacher):
        train(_cfg(tiny_task, tmp_path, method="kd", teacher={"path": str(short_model)}))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    with pytest.raises(UserError, match=r"^data\.max_len: .* context of eval\.models\.short "):
        check_paths(_cfg(tiny_task, tmp_path, eval={"models": {"short": str(short_model)}, "test": {"t": str(tiny_task["test"])}}), "eval")
    check_paths(_cfg(tiny_task, tmp_path, student={"path": str(short_model)}, data={"max_prompt_len": 32, "max_len": 64},
                     generation={"max_new_tokens": 16}), "train")  # fits: no error


def test_short_context_through_the_cli_is_one_line(tiny_task: dict[str, Path], tmp_path: Path, short_model: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from minillm.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_task, tmp_path / "run", student={"path": str(short_model)})))
    with pytest.raises(SystemExit) as e:
        main(["generate", str(path), "--model", "student"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: data.max_len: 96 tokens")


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("data", {"valid": "{root}/missing/valid.jsonl"}, r"^data\.valid: .*valid\.jsonl: data file not found"),
        ("data", {"pretrain": "{root}/corpus.txt"}, r"^data\.pretrain: .*corpus\.txt: file not found"),
        ("data", {"train": "{root}"}, r"^data\.train: .*: a folder that is not a saved Hugging Face dataset"),
        ("student", {"path": "{root}/no-such-model"}, r"^student\.path: .*no-such-model: no such folder$"),
        ("student", {"path": "{root}"}, r"^student\.path: .*: a folder without a model \(config\.json\)"),
        ("student", {"path": "{root}/student.gguf"}, r"^student\.path: .*student\.gguf: GGUF file not found"),
        ("student", {"tokenizer": "{root}/tok"}, r"^student\.tokenizer: .*tok: no such folder"),
        ("teacher", {"path": "org/missing-model"}, r"^teacher\.path: org/missing-model: no such folder, and not a Hub id that "
                                                   r"could be reached \(HF_HUB_OFFLINE is set and it is not in the local Hub cache\)"),
        ("", {"output_dir": "{root}/a-file"}, r"^output_dir: .*a-file is a file"),
    ],
)
def test_train_checks_every_path_before_loading(tiny_task: dict[str, Path], tmp_path: Path, no_model_loads: None,
                                                monkeypatch: pytest.MonkeyPatch, section: str, values: dict, message: str) -> None:
    """Before: a missing data file was reported only after both models had loaded."""
    from minillm.trainer import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a-file").write_text("x")
    values = {k: v.format(root=tmp_path) for k, v in values.items()}
    raw = tiny_config_dict(tiny_task, tmp_path / "run", method="kd", **({section: values} if section else {}))
    if not section:
        raw.update(values)
    with pytest.raises(UserError, match=message):
        train(config_from_dict(raw))


def test_eval_and_generate_check_their_paths_first(tiny_task: dict[str, Path], tmp_path: Path, no_model_loads: None) -> None:
    from minillm.eval.runner import run_eval
    from minillm.generate_data import run_generate

    ev = {"models": {"a": str(tiny_task["student"])}, "test": {"t": str(tiny_task["test"]), "u": str(tmp_path / "u.jsonl")}}
    with pytest.raises(UserError, match=r"^eval\.test\.u: .*u\.jsonl: data file not found"):
        run_eval(_cfg(tiny_task, tmp_path, eval=ev))
    ev = {**ev, "test": {"t": str(tiny_task["test"])}, "calibration": str(tmp_path / "mc.jsonl")}
    with pytest.raises(UserError, match=r"^eval\.calibration: .*mc\.jsonl: file not found"):
        run_eval(_cfg(tiny_task, tmp_path, eval=ev))
    ev = {**ev, "calibration": None, "models": {"a": str(tiny_task["student"]), "b": str(tmp_path / "gone")}}
    with pytest.raises(UserError, match=r"^eval\.models\.b: .*gone: no such folder"):
        run_eval(_cfg(tiny_task, tmp_path, eval=ev))
    ev = {**ev, "models": {"a": str(tiny_task["student"])}, "judge": str(tmp_path / "judge")}
    with pytest.raises(UserError, match=r"^eval\.judge: .*judge: no such folder"):
        run_eval(_cfg(tiny_task, tmp_path, eval=ev))
    with pytest.raises(UserError, match=r"^teacher\.path: .*gone: no such folder"):
        run_generate(_cfg(tiny_task, tmp_path, teacher={"path": str(tmp_path / "gone")}))


# --- a missing model folder is found at once, without Hub retries ----------------------------------


@pytest.fixture
def closing_endpoint() -> Iterator[tuple[str, list[int]]]:
    """A local 'Hub' that accepts each connection and closes it at once: what an unreachable or
    broken network looks like to an HTTP client. Yields (url, [connections so far])."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    count = [0]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            count[0] += 1
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", count
    stop.set()
    thread.join()
    srv.close()


def test_missing_model_folder_asks_the_hub_once(tiny_task: dict[str, Path], tmp_path: Path,
                                                closing_endpoint: tuple[str, list[int]]) -> None:
    """Before: 24-50 s of retries (49 s measured, one connection per retry), each warning printed
    twice, then a message about repo ids. Now: one request, one line, exit 2."""
    url, connections = closing_endpoint
    cfg = tiny_config_dict(tiny_task, tmp_path / "run", student={"path": "runs/student-typo"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=url, HF_HUB_CACHE=str(tmp_path / "hub-cache"), PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "minillm", "train", str(path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.startswith("error: student.path: runs/student-typo: no such folder, and not a Hub id that could be reached "
                          f"(could not reach {url}") and len(err.splitlines()) == 1, err
    assert connections[0] == 1


def test_hub_probe_tells_a_missing_repo_from_a_present_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import loopback_server, reply_json
    from minillm.hub import check_hub_id

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.startswith("/api/models/org/present"):
                reply_json(self, 200, {"id": "org/present"})
            elif self.path.startswith("/api/models/org/gated"):
                self.send_response(401)
                self.send_header("X-Error-Code", "GatedRepo")
                self.end_headers()
            else:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with loopback_server(Hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        check_hub_id("org/present", "student.path")
        check_hub_id("org/gated", "student.path")  # exists; loading will ask for a token
        with pytest.raises(UserError, match=r"^student\.path: org/absent: no such folder, and not a Hub id that could be reached "
                                            r"\(the Hub has no model 'org/absent'"):
            check_hub_id("org/absent", "student.path")
    snap = tmp_path / "models--org--cached" / "snapshots"
    snap.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub_id("org/cached", "student.path")  # offline but in the cache: fine
    with pytest.raises(UserError, match=r"^student\.path: \./org/x: no such folder$"):
        check_hub_id("./org/x", "student.path")  # a path shape no Hub id has: never asked
