"""`minillm prepare dolly`: filtering, deterministic shuffled splits, length rule, errors, CLI.

The raw file is Dolly-shaped (instruction / context / response / category) and built in tmp. Token
counts are checked against an independent count: the word-level test tokenizer maps every piece of
its ``Whitespace`` pre-tokenizer (``\\w+`` or a run of ``[^\\w\\s]``) to exactly one id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from minillm.cli import main
from minillm.data.formats import Example
from minillm.data.instruct import render_prompt
from minillm.errors import UserError
from minillm.prepare import prepare_dolly

N_GOOD = 1520  # usable records: 1000 valid + 500 test + 20 train with the default sizes
N_EMPTY_INSTRUCTION = 4
N_EMPTY_RESPONSE = 6
N_LONG = 9  # prompts far over 256 tokens
PIECES = re.compile(r"\w+|[^\w\s]+")


def _records() -> list[dict]:
    recs = []
    for i in range(N_GOOD):
        recs.append({
            "instruction": f"Question number {i}: what is item {i % 13}?",
            "context": f"Some context for {i}." if i % 3 == 0 else "",
            "response": f"The answer to {i} is {i * 7}.",
            "category": ["open_qa", "closed_qa", "brainstorming"][i % 3],
        })
    for i in range(N_EMPTY_INSTRUCTION):
        recs.append({"instruction": "   " if i % 2 else "", "context": "", "response": f"orphan {i}", "category": "open_qa"})
    for i in range(N_EMPTY_RESPONSE):
        recs.append({"instruction": f"Unanswered {i}", "context": "", "response": "\n " if i % 2 else "", "category": "open_qa"})
    for i in range(N_LONG):
        recs.append({"instruction": f"Long {i}: " + " ".join(f"w{j}" for j in range(400)), "context": "",
                     "response": f"long answer {i}", "category": "summarization"})
    # interleave so that the drops are spread through the file, not at its end
    return [recs[j] for j in sorted(range(len(recs)), key=lambda j: (j * 7919) % len(recs))]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from minillm.tiny import build_word_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_word_tokenizer([r["instruction"] + " " + r["response"] for r in _records()[:50]]).save_pretrained(out)
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_in_order(out: Path) -> list[dict]:
    """valid, then test, then train: the shuffled order the splits were cut from."""
    return [r for name in ("valid", "test", "train") for r in _read(out / f"{name}.jsonl")]


def test_splits_cover_the_usable_records_once(raw: Path, tmp_path: Path) -> None:
    paths = prepare_dolly(str(raw), tmp_path / "out")
    assert set(paths) == {"train", "valid", "test", "stats"}
    splits = {name: _read(paths[name]) for name in ("train", "valid", "test")}
    assert [len(splits[n]) for n in ("valid", "test", "train")] == [1000, 500, N_GOOD + N_LONG - 1500]

    # every usable raw record lands in exactly one split, unchanged; the empty ones nowhere
    usable = [r for r in _records() if r["instruction"].strip() and r["response"].strip()]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    written = [key(r) for s in splits.values() for r in s]
    assert sorted(written) == sorted(key(r) for r in usable)
    assert all(set(r) == {"instruction", "context", "response", "category"} for s in splits.values() for r in s)

    stats = json.loads(paths["stats"].read_text())
    assert stats["read"] == len(_records())
    assert stats["dropped"] == {"empty_instruction": N_EMPTY_INSTRUCTION, "empty_response": N_EMPTY_RESPONSE, "long_prompt": 0}
    assert stats["counts"] == {"train": N_GOOD + N_LONG - 1500, "valid": 1000, "test": 500}
    assert stats["seed"] == 10 and stats["tokenizer"] is None


def test_deterministic_for_a_seed_and_shuffled(raw: Path, tmp_path: Path) -> None:
    a = prepare_dolly(str(raw), tmp_path / "a", seed=10)
    b = prepare_dolly(str(raw), tmp_path / "b", seed=10)
    c = prepare_dolly(str(raw), tmp_path / "c", seed=11)
    for name in ("train", "valid", "test"):
        assert a[name].read_bytes() == b[name].read_bytes()
    assert a["valid"].read_bytes() != c["valid"].read_bytes()
    # shuffled: the validation split is not simply the first usable records of the file
    usable = [r for r in _records() if r["instruction"].strip() and r["response"].strip()]
    assert _read(a["valid"]) != usable[:1000]


def test_tokenizer_drops_long_prompts_after_the_shuffle(raw: Path, word_tokenizer: Path, tmp_path: Path) -> None:
    plain = prepare_dolly(str(raw), tmp_path / "plain")
    cut = prepare_dolly(str(raw), tmp_path / "cut", tokenizer=str(word_tokenizer), max_prompt_len=256)
    stats = json.loads(cut["stats"].read_text())
    assert stats["dropped"]["long_prompt"] == N_LONG
    assert stats["counts"]["train"] == N_GOOD - 1500
    # filtering after the shuffle: the survivors keep the order they have without a tokenizer
    expected = [r for r in _all_in_order(tmp_path / "plain") if not r["instruction"].startswith("Long ")]
    assert _all_in_order(tmp_path / "cut") == expected
    assert plain["stats"].exists()


def test_prompt_length_boundary_matches_an_independent_count(word_tokenizer: Path, tmp_path: Path) -> None:
    recs = [{"instruction": f"Item {i} asks a short thing?", "context": "ctx" if i % 2 else "", "response": "yes"} for i in range(8)]
    probe = {"instruction": "Exactly this many pieces: " + " ".join(f"p{j}" for j in range(30)), "context": "", "response": "ok"}
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in [probe, *recs]))
    n_probe = len(PIECES.findall(render_prompt(Example(probe["instruction"]), "alpaca")))
    n_longest_other = max(len(PIECES.findall(render_prompt(Example(r["instruction"], r["context"]), "alpaca"))) for r in recs)
    assert n_probe > n_longest_other

    kept = prepare_dolly(str(raw), tmp_path / "at", tokenizer=str(word_tokenizer), max_prompt_len=n_probe, valid_size=2, test_size=2)
    assert json.loads(kept["stats"].read_text())["dropped"]["long_prompt"] == 0
    dropped = prepare_dolly(str(raw), tmp_path / "below", tokenizer=str(word_tokenizer), max_prompt_len=n_probe - 1,
                            valid_size=2, test_size=2)
    assert json.loads(dropped["stats"].read_text())["dropped"]["long_prompt"] == 1
    assert all(r["instruction"] != probe["instruction"] for r in _all_in_order(tmp_path / "below"))


def test_too_few_records_names_the_count_and_the_fix(tmp_path: Path) -> None:
    raw = tmp_path / "small.jsonl"
    raw.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(1200)))
    with pytest.raises(UserError, match=r"1200 usable records of 1200 read.*needs 1501.*--valid-size"):
        prepare_dolly(str(raw), tmp_path / "out")
    paths = prepare_dolly(str(raw), tmp_path / "out", valid_size=100, test_size=100)
    assert [len(_read(paths[n])) for n in ("train", "valid", "test")] == [1000, 100, 100]


def test_bad_inputs(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"instruction": "a", "response": "b"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        prepare_dolly(str(bad_json), tmp_path / "o1")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    with pytest.raises(UserError, match=r"chat.jsonl:1: a chat"):
        prepare_dolly(str(chat), tmp_path / "o2")
    with pytest.raises(UserError, match=r"--valid-size / --test-size"):
        prepare_dolly(str(bad_json), tmp_path / "o3", valid_size=0)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5)))
    with pytest.raises(UserError, match=r"--tokenizer: could not load a tokenizer"):
        prepare_dolly(str(good), tmp_path / "o4", tokenizer=str(tmp_path / "no-such-tokenizer"), valid_size=1, test_size=1)


def test_saved_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    recs = [{"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "open_qa"} for i in range(40)]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    paths = prepare_dolly(str(tmp_path / "ds"), tmp_path / "out", valid_size=5, test_size=5)
    assert sorted(r["instruction"] for r in _all_in_order(tmp_path / "out")) == sorted(r["instruction"] for r in recs)
    assert len(_read(paths["train"])) == 30


def test_cli_prepare(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main(["prepare", "dolly", "--source", str(raw), "--out", str(out), "--valid-size", "50", "--test-size", "60", "--seed", "3"])
    printed = capsys.readouterr().out
    assert f"train: {out / 'train.jsonl'}" in printed
    direct = prepare_dolly(str(raw), tmp_path / "direct", seed=3, valid_size=50, test_size=60)
    for name in ("train", "valid", "test"):
        assert (out / f"{name}.jsonl").read_bytes() == direct[name].read_bytes()

    with pytest.raises(SystemExit) as exc:
        main(["prepare", "dolly", "--source", str(raw), "--out", str(tmp_path / "x"), "--valid-size", "5000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--valid-size" in err and len(err.strip().splitlines()) == 1
