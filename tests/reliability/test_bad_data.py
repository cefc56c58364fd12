"""Bad data gives one line with file and line and exit 2 (issue 7, defect 6): bytes that are not
UTF-8, JSON nested past the parser's limit, lone surrogates, prompts that are all empty or null;
records that training drops are counted by reason, one line per file."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_config_dict
from minillm.cli import main
from minillm.config import load_config
from minillm.data import load_run_data, read_examples
from minillm.data.pretrain import PretrainStream
from minillm.errors import UserError
from minillm.eval.testsets import load_test_set
from minillm.tiny import build_word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = json.dumps({"prompt": "one two", "response": "three"})
DEEP = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "response": "x"}'


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_word_tokenizer(["one two three four five six seven eight nine ten"])


def _file(tmp_path: Path, name: str, body: bytes | str) -> str:
    p = tmp_path / name
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    return str(p)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (f"{GOOD}\n".encode() + b'{"prompt": "caf\xe9", "response": "x"}\n', r":2: not UTF-8 text \(byte 0xe9\)"),
        (f"{GOOD}\n{DEEP}\n", r":2: JSON nested deeper than Python's parser allows"),
        (f'{GOOD}\n\n{{"prompt": "a \\ud800 b", "response": "x"}}\n', r":3: prompt holds a lone UTF-16 surrogate"),
        (f'{GOOD}\n{{"prompt": "a", "response": ["ok", "\\udc00"]}}\n', r":2: response\[1\] holds a lone UTF-16 surrogate"),
    ],
    ids=["not-utf8", "deep-json", "surrogate", "surrogate-in-list"],
)
def test_unreadable_records_name_file_and_line(tmp_path: Path, body: bytes | str, message: str) -> None:
    """Training data, test sets and the pre-training corpus all refuse them with file:line."""
    path = _file(tmp_path, "d.jsonl", body)
    for read in (read_examples, load_test_set):
        with pytest.raises(UserError, match=rf"^{re.escape(path)}{message}"):
            read(path)


def test_a_valid_surrogate_pair_and_a_byte_order_mark_are_fine(tmp_path: Path) -> None:
    path = _file(tmp_path, "d.jsonl", "\ufeff" + json.dumps({"prompt": "emoji \U0001f600", "response": "\\ud83d"}) + "\n")
    (ex,) = read_examples(path)  # json.dumps wrote the emoji as the pair \ud83d\ude00; the response is a literal backslash text
    assert ex.instruction == "emoji \U0001f600" and ex.response == "\\ud83d"


def test_whole_json_files_and_pretraining_corpora(tmp_path: Path, tok: Any) -> None:
    bad_json = _file(tmp_path, "d.json", b'[{"prompt": "a", "response": "b"},\n {"prompt": "\xff"}]')
    with pytest.raises(UserError, match=r"d\.json:2: not UTF-8 text"):
        read_examples(bad_json)
    deep_json = _file(tmp_path, "deep.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"deep\.json: JSON nested deeper"):
        load_test_set(deep_json)
    surrogate_json = _file(tmp_path, "s.json", json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "\ud800", "response": "b"}]))
    with pytest.raises(UserError, match=r"s\.json: \[1\]\.prompt holds a lone UTF-16 surrogate"):
        read_examples(surrogate_json)
    for name, body, message in [
        ("c.txt", b"one two\nthree \xc3\n", r"c\.txt:2: not UTF-8"),
        ("c.jsonl", f'{{"text": "one"}}\n{"[" * 100_000}\n'.encode(), r"c\.jsonl:2: JSON nested deeper"),
        ("s.jsonl", b'{"text": "one"}\n{"text": "\\udfff"}\n', r"s\.jsonl:2: text holds a lone UTF-16 surrogate"),
    ]:
        stream = PretrainStream(_file(tmp_path, name, body), tok, block_len=64)
        with pytest.raises(UserError, match=message):
            stream.next_batch(1)


def test_config_files_with_bad_bytes_or_nesting(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"c\.yaml:3: not UTF-8 text"):
        load_config(_file(tmp_path, "c.yaml", b"seed: 1\nmethod: sft\noutput_dir: caf\xe9\n"))
    with pytest.raises(UserError, match=r"d\.yaml: YAML nested deeper"):
        load_config(_file(tmp_path, "d.yaml", "seed: " + "[" * 5000 + "]" * 5000 + "\n"))
    with pytest.raises(UserError, match=r"t\.yaml: not valid YAML \(month must be in 1\.\.12\)"):
        load_config(_file(tmp_path, "t.yaml", "output_dir: 2024-13-01\n"))
    with pytest.raises(UserError, match=r"train\.lr: 1000+ is too large"):
        load_config(None, ["train.lr=1" + "0" * 400])
    assert load_config(None, ["output_dir=" + "[" * 5000]).output_dir == "[" * 5000  # not YAML: kept as text


def _write_cfg(tmp_path: Path, tiny_task: dict[str, Path], train: str, method: str = "minillm", **data: Any) -> str:
    cfg = tiny_config_dict(tiny_task, tmp_path / "run", method=method, data={"train": train, **data},
                           train={"max_steps": 1, "eval_every": 1, "save_every": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("prompt", ["", None, "   "])
def test_all_empty_prompts_are_one_line_not_a_rollout_crash(tiny_task: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str], prompt: str | None) -> None:
    """Before: a RuntimeError inside the rollout (a prompt of zero tokens). Now: exit 2, one line."""
    train = _file(tmp_path, "empty.jsonl", "".join(json.dumps({"prompt": prompt, "response": "one"}) + "\n" for _ in range(20)))
    with pytest.raises(SystemExit) as e:
        main(["train", _write_cfg(tmp_path, tiny_task, train, template="raw")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err == f"error: data.train: no usable example in {train}: dropped 20 with an empty prompt"


def test_dropped_records_are_counted_by_reason_one_line_per_file(tmp_path: Path, tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Before: records without a response left SFT data without a word."""
    rows = ([{"prompt": "one two", "response": "three"}] * 6 + [{"prompt": "one"}] * 3 + [{"prompt": " ", "response": "x"}] * 2
            + [{"prompt": "one two three four five six seven eight nine ten", "response": "x"}])
    train = _file(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    valid = _file(tmp_path, "v.jsonl", json.dumps({"prompt": "two", "response": "one"}) + "\n" + json.dumps({"prompt": "two"}) + "\n")
    cfg = load_config(None, [f"data.train={train}", f"data.valid={valid}", "data.template=raw", "data.max_prompt_len=8",
                             "data.max_len=16", "generation.max_new_tokens=8"])
    with caplog.at_level(logging.INFO, logger="minillm"):
        data = load_run_data(cfg, tok)
    assert len(data.train) == 6 and len(data.valid) == 1
    lines = {r.getMessage().split(": ", 1)[0]: r for r in caplog.records if r.getMessage().startswith(str(tmp_path))}
    assert sorted(lines) == [train, valid]
    assert lines[train].levelno == logging.WARNING and lines[train].getMessage() == (
        f"{train}: 12 examples, 6 used; dropped 3 without a response; dropped 2 with an empty prompt; "
        f"dropped 1 with a prompt over data.max_prompt_len=8 tokens (e.g. {train}:12)")
    assert lines[valid].getMessage() == f"{valid}: 2 examples, 1 used; dropped 1 without a response"


def test_held_out_validation_shares_its_file_line(tmp_path: Path, tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"prompt": "one two", "response": "three"}] * 9 + [{"prompt": "one"}]
    train = _file(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.train={train}", "data.template=raw", "data.max_prompt_len=8", "data.max_len=16",
                             "generation.max_new_tokens=8"])
    with caplog.at_level(logging.INFO, logger="minillm"):
        load_run_data(cfg, tok)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(train)]
    assert line == f"{train}: 10 examples, 9 used; dropped 1 without a response"
