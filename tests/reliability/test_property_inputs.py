"""Property tests (hypothesis): random records and random bytes through every loader, training
data, test sets, the pre-training corpus, config files and dotted overrides. Each input either
loads or raises UserError, never anything else (issue 7)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.config import Config, load_config
from minillm.data import read_examples
from minillm.data.instruct import encode_examples
from minillm.data.pretrain import PretrainStream
from minillm.errors import UserError
from minillm.eval.testsets import load_test_set
from minillm.tiny import build_word_tokenizer

# fast and reproducible: a fixed number of examples per property, no example database on disk
SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# field names the formats look at (and a few they do not), so random records reach every parser branch
KEYS = ["instruction", "context", "response", "prompt", "input", "output", "completion", "answer", "question", "text",
        "turns", "reference", "references", "messages", "role", "content", "instances", "Instances", "Definition",
        "definition", "reformulations", "instruction_with_input", "constraints", "category", "question_id", "id", "x"]
TEXT = st.text(max_size=12) | st.sampled_from(["", " ", "one two", "\ud800", "\udfff x", "\U0001f600", "\x00"])
SCALARS = st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | TEXT, inner,
                                                                                         max_size=5), max_leaves=16)
RECORDS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6) | VALUES
LINES = st.lists(RECORDS.map(json.dumps) | st.sampled_from(["", "{", "[" * 3000, '{"prompt": "a"} x', "\ufeff{}"]),
                 min_size=1, max_size=6)

TOKENIZER = build_word_tokenizer(["one two three four five six seven eight nine ten", "x"])


def loads_or_user_error(load: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``load``; a UserError is an answer, any other exception fails the property."""
    try:
        return load(*args, **kwargs)
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e), repr(str(e))  # one line
        return None


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _put(folder: Path, name: str, data: bytes) -> str:
    p = folder / name
    p.write_bytes(data)
    return str(p)


def _train_and_test(path: str) -> None:
    examples = loads_or_user_error(read_examples, path)
    if examples is not None:
        for template in ("alpaca", "raw"):
            encode_examples(examples, TOKENIZER, template, max_prompt_len=32, max_len=48)
    loads_or_user_error(load_test_set, path)


@SETTINGS
@given(lines=LINES, name=st.sampled_from(["d.jsonl", "d.json"]))
def test_random_records(folder: Path, lines: list[str], name: str) -> None:
    _train_and_test(_put(folder, name, "\n".join(lines).encode("utf-8", "surrogatepass")))


@SETTINGS
@given(records=st.lists(RECORDS, max_size=4))
def test_random_json_lists(folder: Path, records: list[Any]) -> None:
    _train_and_test(_put(folder, "l.json", json.dumps(records).encode()))


@SETTINGS
@given(data=st.binary(max_size=300), name=st.sampled_from(["b.jsonl", "b.json"]))
def test_random_bytes_as_data(folder: Path, data: bytes, name: str) -> None:
    _train_and_test(_put(folder, name, data))


@SETTINGS
@given(data=st.binary(max_size=300) | LINES.map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
       name=st.sampled_from(["c.txt", "c.jsonl"]))
def test_random_pretraining_corpus(folder: Path, data: bytes, name: str) -> None:
    def read() -> None:
        stream = PretrainStream(_put(folder, name, data), TOKENIZER, block_len=4)
        stream.next_batch(2)

    loads_or_user_error(read)


CONFIG_KEYS = [f"{section}.{key}" if isinstance(values, dict) else section
               for section, values in Config().to_dict().items() for key in (values if isinstance(values, dict) else [""])]
YAML_VALUES = VALUES | st.sampled_from(["1e-5", "2024-13-01", "1" + "0" * 400, "~", "[1, 2]", "{a: b}", "&a [*a]", "!!binary x"])


@SETTINGS
@given(values=st.dictionaries(st.sampled_from(CONFIG_KEYS) | TEXT, YAML_VALUES, max_size=5))
def test_random_config_files(folder: Path, values: dict[str, Any]) -> None:
    nested: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name] = value
    try:
        text = yaml.safe_dump(nested, allow_unicode=True)
    except yaml.YAMLError:  # e.g. a lone surrogate PyYAML will not write
        return
    loads_or_user_error(load_config, _put(folder, "c.yaml", text.encode("utf-8", "surrogatepass")))


RAW_YAML_VALUES = st.sampled_from(["&a [*a]", "!!binary x", "2024-13-01", "1" + "0" * 400, "[" * 2000, "{a: [b, {c: d}]}", "*x",
                                   "!!python/object:os.system ls", "<<: {a: 1}", "'unterminated", "0x1F", ".nan", "-.inf", "", "~"])


@SETTINGS
@given(lines=st.lists(st.builds(lambda key, value: key.replace(".", ":\n  ", 1) + f": {value}", st.sampled_from(CONFIG_KEYS),
                                RAW_YAML_VALUES | TEXT), max_size=4))
def test_random_yaml_text(folder: Path, lines: list[str]) -> None:
    text = "\n".join(lines)
    loads_or_user_error(load_config, _put(folder, "y.yaml", text.encode("utf-8", "surrogatepass")))


@SETTINGS
@given(data=st.binary(max_size=200) | st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_random_bytes_as_config(folder: Path, data: bytes) -> None:
    loads_or_user_error(load_config, _put(folder, "r.yaml", data))


@SETTINGS
@given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(CONFIG_KEYS) | TEXT, YAML_VALUES.map(str) | TEXT)
                          | TEXT, max_size=3))
def test_random_dotted_overrides(overrides: list[str]) -> None:
    loads_or_user_error(load_config, None, overrides)
