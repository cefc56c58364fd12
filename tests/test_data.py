"""Instruction data: record formats, errors with file:line, templates, length rules, batching,
the epoch sampler and the packed pre-training stream."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from minillm.config import load_config
from minillm.data import load_run_data, read_examples
from minillm.data.formats import Example
from minillm.data.instruct import (
    Encoded,
    EpochSampler,
    collate_lm,
    collate_prompts,
    encode_examples,
    render_prompt,
)
from minillm.data.pretrain import PretrainStream
from minillm.errors import UserError
from minillm.tiny import build_word_tokenizer

_PRETOKEN = re.compile(r"\w+|[^\w\s]+")  # the Whitespace pre-tokenizer: words and runs of punctuation
CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. ### Instruction: Input: Response:",
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu one two three four five six seven",
    "user assistant system < > |",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_word_tokenizer(CORPUS)


def n_words(text: str) -> int:
    """Token count under the word-level tokenizer: one token per word or run of punctuation."""
    return len(_PRETOKEN.findall(text))


def _jsonl(tmp_path: Path, records: list[Any], name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return p


# --- record formats --------------------------------------------------------------------------


def test_dolly_records(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, [{"instruction": "Add.", "context": "1 2", "response": "3", "category": "x"},
                          {"instruction": "Say hi.", "response": "hi"}])
    a, b = read_examples(str(p))
    assert (a.instruction, a.context, a.response, a.references) == ("Add.", "1 2", "3", ["3"])
    assert a.source == f"{p}:1" and b.source == f"{p}:2"
    assert b.context == "" and b.response == "hi"


def test_prompt_response_and_aliases(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, [
        {"prompt": "P", "response": "R"},
        {"prompt": "P", "completion": "C"},
        {"instruction": "I", "input": "X", "output": "O"},
        {"question": "Q", "answer": 42},  # numbers are read as text
    ])
    ex = read_examples(str(p))
    assert [(e.instruction, e.context, e.response) for e in ex] == [("P", "", "R"), ("P", "", "C"), ("I", "X", "O"), ("Q", "", "42")]


def test_chat_messages(tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name a colour"},
            {"role": "assistant", "content": "red"}]
    p = _jsonl(tmp_path, [{"messages": msgs}, {"messages": msgs[:2]}])
    full, open_ended = read_examples(str(p))
    assert full.response == "red" and full.references == ["red"]
    assert full.instruction == "name a colour"
    assert full.messages == msgs[:-1]  # every turn before the answer
    assert open_ended.response is None and open_ended.messages == msgs[:2]


def test_chat_messages_errors(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(UserError, match=rf"^{re.escape(str(p))}:1: 'messages' has no user turn"):
        read_examples(str(p))
    p = _jsonl(tmp_path, [{"messages": "hello"}])
    with pytest.raises(UserError, match=r":1: 'messages' must be a list"):
        read_examples(str(p))


def test_references(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, [
        {"prompt": "Name a colour.", "references": ["red", "blue"]},
        {"prompt": "Name a colour.", "response": "red", "references": ["red", "green"]},
        {"prompt": "Name a colour.", "output": ["blue", "red"]},  # S-NI style list of outputs
    ])
    a, b, c = read_examples(str(p))
    assert a.response == "red" and a.references == ["red", "blue"]
    assert b.response == "red" and b.references == ["red", "green"]
    assert c.response == "blue" and c.references == ["blue", "red"]


def test_column_mapping(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, [{"q": "what?", "ctx": "c", "a": "that", "refs": ["that", "this"]}])
    cfg = load_config(None, ["data.columns={prompt: q, context: ctx, response: a, references: refs}"])
    (ex,) = read_examples(str(p), columns=cfg.data.columns)
    assert (ex.instruction, ex.context, ex.response, ex.references) == ("what?", "c", "that", ["that", "this"])
    with pytest.raises(UserError, match=r":1: column 'a' \(data.columns.response\) is missing; fields: \['prompt'\]"):
        read_examples(str(_jsonl(tmp_path, [{"prompt": "x"}], "e.jsonl")), columns={"response": "a"})


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, [{"prompt": "a", "response": "b"}, "", '{"prompt": "a", "response": }'])
    with pytest.raises(UserError) as e:
        read_examples(str(p))
    assert str(e.value).startswith(f"{p}:3: not valid JSON")


def test_record_without_prompt_names_fields(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, [{"prompt": "a", "response": "b"}, {"text": "a", "label": "b"}])
    with pytest.raises(UserError) as e:
        read_examples(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: no prompt field")
    assert "['label', 'text']" in msg and "data.columns" in msg


def test_non_string_field(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, [{"instruction": "a", "response": {"text": "b"}}])
    with pytest.raises(UserError, match=rf"^{re.escape(str(p))}:1: field 'response' must be a string, got dict"):
        read_examples(str(p))
    p = _jsonl(tmp_path, [{"instruction": True, "response": "b"}], "b.jsonl")
    with pytest.raises(UserError, match=r":1: field 'instruction' must be a string, got bool"):
        read_examples(str(p))


def test_not_an_object(tmp_path: Path) -> None:
    p = _jsonl(tmp_path, ['["a", "b"]'])
    with pytest.raises(UserError, match=r":1: expected a JSON object, got list"):
        read_examples(str(p))


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(p))}: no records found"):
        read_examples(str(p))


def test_missing_file_does_not_ask_the_hub(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope.jsonl: data file not found"):
        read_examples(str(tmp_path / "nope.jsonl"))


def test_json_list_file(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]))
    ex = read_examples(str(p))
    assert [e.instruction for e in ex] == ["a", "c"] and ex[1].source == f"{p}[1]"
    one = tmp_path / "one.json"  # one record object (a raw S-NI task file, say): read by training and evaluation alike
    one.write_text(json.dumps({"instruction": "Say hi", "instances": [{"input": "", "output": "hi"}]}))
    (ex,) = read_examples(str(one))
    assert (ex.instruction, ex.response, ex.source) == ("Say hi", "hi", f"{one} (instances[0])")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps("just a string"))
    with pytest.raises(UserError, match=r"bad\.json: a \.json data file must hold a list of records or one record object"):
        read_examples(str(bad))


def test_saved_hf_dataset_and_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"i{k}", "context": "", "response": f"r{k}"} for k in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert [e.response for e in read_examples(str(tmp_path / "one"))] == ["r0", "r1", "r2"]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(read_examples(str(tmp_path / "dict"), "train")) == 3
    assert [e.instruction for e in read_examples(str(tmp_path / "dict"), "test")] == ["i0"]
    with pytest.raises(UserError, match=r"no split 'validation'; available: \['test', 'train'\]"):
        read_examples(str(tmp_path / "dict"), "validation")


def test_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a saved Hugging Face dataset"):
        read_examples(str(tmp_path))


# --- templates -------------------------------------------------------------------------------


def test_alpaca_template() -> None:
    with_ctx = render_prompt(Example("Add the numbers.", context="1 2"), "alpaca")
    assert with_ctx == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n"
    )
    no_ctx = render_prompt(Example("Say hi.", context="  "), "alpaca")  # blank context counts as none
    assert no_ctx == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )


def test_raw_template() -> None:
    assert render_prompt(Example("Say hi."), "raw") == "Say hi."
    assert render_prompt(Example("Add.", context="1 2"), "raw") == "Add.\n1 2"


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_template(tok: Any) -> None:
    chat_tok = build_word_tokenizer(CORPUS)
    chat_tok.chat_template = CHAT_TEMPLATE
    assert render_prompt(Example("one two", context="three"), "chat", chat_tok) == "<user> one two\n\nthree | <assistant>"
    ex = Example("four", messages=[{"role": "system", "content": "five"}, {"role": "user", "content": "four"}])
    assert render_prompt(ex, "chat", chat_tok) == "<system> five | <user> four | <assistant>"
    with pytest.raises(UserError, match="data.template: 'chat' needs a tokenizer with a chat template"):
        render_prompt(ex, "chat", tok)


# --- encoding with the paper's length rules --------------------------------------------------


def test_encode_skips_long_prompts_and_cuts_long_responses(tok: Any) -> None:
    eos = tok.eos_token_id
    examples = [
        Example("one two", response="three four", source="f:1"),  # 2 + (2 + EOS) = 5 tokens: fits exactly
        Example("one two three four", response="five", source="f:2"),  # prompt of 4 > 3: skipped
        Example("one", response="two three four five six", source="f:3"),  # 1 + 6 > 5: response cut to 4
        Example("one two", response=None, source="f:4"),  # no response
        Example("one two three", response="", source="f:5"),  # empty response: EOS alone
    ]
    enc, stats = encode_examples(examples, tok, "raw", max_prompt_len=3, max_len=5)
    assert [e.index for e in enc] == [0, 2, 4]
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc[0].prompt_ids == ids("one two") and enc[0].response_ids == [*ids("three four"), eos]
    assert enc[1].prompt_ids == ids("one") and enc[1].response_ids == ids("two three four five")  # cut: no EOS
    assert enc[2].response_ids == [eos]
    assert all(len(e.prompt_ids) <= 3 and len(e.prompt_ids) + len(e.response_ids) <= 5 for e in enc)
    assert (stats.kept, stats.skipped_long_prompt, stats.truncated_response, stats.no_response) == (3, 1, 1, 1)
    assert stats.skipped_sources == ["f:2"]

    # a prompt is never truncated, whatever the template adds
    enc, stats = encode_examples(examples[:1], tok, "alpaca", max_prompt_len=3, max_len=5)
    assert enc == [] and stats.skipped_long_prompt == 1

    kept, _ = encode_examples(examples[3:4], tok, "raw", max_prompt_len=3, max_len=5, require_response=False)
    assert kept[0].response_ids == []


def test_encode_lengths_follow_the_template(tok: Any) -> None:
    ex = Example("one two", context="three", response="four")
    (enc,), _ = encode_examples([ex], tok, "alpaca", max_prompt_len=200, max_len=300)
    assert len(enc.prompt_ids) == n_words(render_prompt(ex, "alpaca"))


def test_encode_chat_uses_template_tokens(tok: Any) -> None:
    chat_tok = build_word_tokenizer(CORPUS)
    chat_tok.chat_template = CHAT_TEMPLATE
    (enc,), _ = encode_examples([Example("one", response="two")], chat_tok, "chat", max_prompt_len=20, max_len=30)
    assert chat_tok.decode(enc.prompt_ids).replace(" ", "") == "<user>one|<assistant>"


# --- batching --------------------------------------------------------------------------------


def test_collate_lm_masks_only_response_targets() -> None:
    items = [Encoded([5, 6, 7], [8, 9], 0), Encoded([5], [8, 9, 10, 11], 1), Encoded([5, 6], [], 2)]
    b = collate_lm(items, pad_id=0)
    L = 5
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 11], [5, 6, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 5, [1] * 5, [1, 1, 0, 0, 0]]
    assert torch.equal(b["targets"], b["input_ids"][:, 1:])
    for row, x in enumerate(items):
        p, r = len(x.prompt_ids), len(x.response_ids)
        # target t is token t+1: a loss only where token t+1 belongs to the response
        expect = [1.0 if p <= t + 1 < p + r else 0.0 for t in range(L - 1)]
        assert b["loss_mask"][row].tolist() == expect
    assert b["loss_mask"].sum() == 2 + 4


def test_collate_prompts_left_pads() -> None:
    ids, attn = collate_prompts([[1, 2, 3], [4], []], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


# --- sampler ---------------------------------------------------------------------------------


def test_epoch_sampler_covers_each_index_once_per_epoch() -> None:
    n = 20
    s = EpochSampler(n, seed=5)
    drawn = [i for _ in range(9) for i in s.take(7)]  # 63 draws: 3 epochs and a bit, crossing boundaries
    epochs = [drawn[k * n : (k + 1) * n] for k in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    assert epochs[0] != list(range(n))  # shuffled
    assert (s.epoch, s.pos) == (3, 3)
    assert EpochSampler(n, seed=5, shuffle=False).take(25) == [*range(20), *range(5)]


def test_epoch_sampler_is_deterministic_and_resumable() -> None:
    a, b = EpochSampler(13, seed=1), EpochSampler(13, seed=1)
    assert a.take(30) == b.take(30)
    assert EpochSampler(13, seed=2).take(13) != EpochSampler(13, seed=1).take(13)
    a.take(4)
    state = a.state_dict()
    resumed = EpochSampler(13, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    assert resumed.take(40) == a.take(40)


def test_epoch_sampler_refuses_empty() -> None:
    with pytest.raises(UserError, match="training set is empty"):
        EpochSampler(0, seed=1)


# --- pre-training stream ---------------------------------------------------------------------


def _flat_tokens(tok: Any, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


DOCS = ["one two three", "four five", "six seven one two three four", "five"]


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_pretrain_blocks(tmp_path: Path, tok: Any, fmt: str) -> None:
    p = tmp_path / f"corpus.{fmt}"
    if fmt == "txt":
        p.write_text(DOCS[0] + "\n\n" + "\n".join(DOCS[1:]) + "\n")  # blank lines are skipped
    else:
        p.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    flat = _flat_tokens(tok, DOCS)  # 16 tokens, EOS after each document
    stream = PretrainStream(str(p), tok, block_len=5)
    got = [stream.next_batch(2) for _ in range(4)]  # 40 tokens: wraps into later passes
    rows = [r for b in got for r in b["pt_input_ids"].tolist()]
    expect = (flat * 3)[:40]
    assert rows == [expect[i : i + 5] for i in range(0, 40, 5)]
    b = got[0]
    assert b["pt_input_ids"].shape == (2, 5)
    assert torch.equal(b["pt_targets"], b["pt_input_ids"][:, 1:])
    assert b["pt_mask"].shape == (2, 4) and bool((b["pt_mask"] == 1).all())
    assert stream.state_dict()["blocks_served"] == 8


def test_pretrain_resume_continues_with_same_blocks(tmp_path: Path, tok: Any) -> None:
    p = tmp_path / "c.txt"
    p.write_text("\n".join(DOCS) + "\n")
    a = PretrainStream(str(p), tok, block_len=3)
    for _ in range(3):
        a.next_batch(2)
    state = a.state_dict()
    assert state["offset"] > 0 and state["buf"]  # mid-file, with tokens read but not yet served
    resumed = PretrainStream(str(p), tok, block_len=3)
    resumed.load_state_dict(state)
    for _ in range(4):  # on into the next passes
        assert torch.equal(resumed.next_batch(3)["pt_input_ids"], a.next_batch(3)["pt_input_ids"])


def test_pretrain_resume_seeks_instead_of_rereading(tmp_path: Path, tok: Any) -> None:
    docs = [f"{DOCS[i % 4]} {DOCS[(i + 1) % 4]}" for i in range(200)]
    p = tmp_path / "big.txt"
    p.write_text("\n".join(docs) + "\n")
    for served in (60, 100):  # mid-file, and exactly at the end of the file (200 docs x 7 tokens)
        _resume_after(p, tok, served)


def _resume_after(p: Path, tok: Any, batches: int) -> None:
    a = PretrainStream(str(p), tok, block_len=7)
    for _ in range(batches):
        a.next_batch(2)
    seen: list[str] = []

    class Counting:
        eos_token_id = tok.eos_token_id

        def __call__(self, text: str, **kw: Any) -> Any:
            seen.append(text)
            return tok(text, **kw)

    resumed = PretrainStream(str(p), Counting(), block_len=7)
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(resumed.next_batch(4)["pt_input_ids"], a.next_batch(4)["pt_input_ids"])
    assert len(seen) < 10  # only the documents the next blocks need, not the 100+ before them


def test_pretrain_corpus_shorter_than_a_block_still_streams(tmp_path: Path, tok: Any) -> None:
    p = tmp_path / "short.txt"
    p.write_text("one two three four five six seven one two three four\n")  # 11 words + EOS = 12 tokens
    stream = PretrainStream(str(p), tok, block_len=13)  # some passes end without a block
    rows = [r for _ in range(20) for r in stream.next_batch(2)["pt_input_ids"].tolist()]
    flat = _flat_tokens(tok, ["one two three four five six seven one two three four"])
    assert rows == [(flat * 50)[i * 13 : (i + 1) * 13] for i in range(40)]


def test_pretrain_errors(tmp_path: Path, tok: Any) -> None:
    small = tmp_path / "small.txt"
    small.write_text("one two\n")  # 3 tokens with EOS
    with pytest.raises(UserError, match=r"data.pretrain: .*small.txt holds fewer than 64 tokens"):
        PretrainStream(str(small), tok, block_len=64).next_batch(1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(bad))}:2: expected an object with a string field 'text'"):
        PretrainStream(str(bad), tok, block_len=2).next_batch(2)
    with pytest.raises(UserError, match="data.pretrain: .*missing.txt not found"):
        PretrainStream(str(tmp_path / "missing.txt"), tok, block_len=2)


# --- the run's data --------------------------------------------------------------------------


def test_load_run_data_holds_out_validation(tmp_path: Path, tok: Any) -> None:
    recs = [{"instruction": "one two", "response": "three"} for _ in range(30)]
    recs[-1]["response"] = "four"
    p = _jsonl(tmp_path, recs)
    cfg = load_config(None, [f"data.train={p}", "data.template=raw", "data.max_prompt_len=8", "data.max_len=16", "generation.max_new_tokens=8"])
    data = load_run_data(cfg, tok)
    assert len(data.train) == 27 and len(data.valid) == 3  # a tenth of the file, taken from its end
    assert data.valid_examples[-1].response == "four"
    assert all(e.response == "three" for e in data.train_examples)
    assert data.pretrain is None

    capped = load_run_data(load_config(None, [f"data.train={p}", "data.max_examples=5", "data.template=raw",
                                              "data.max_prompt_len=8", "data.max_len=16", "generation.max_new_tokens=8"]), tok)
    assert len(capped.train) == 5


def test_load_run_data_with_valid_file_and_no_usable_example(tmp_path: Path, tok: Any) -> None:
    train = _jsonl(tmp_path, [{"instruction": "one two three four", "response": "x"}] * 3, "t.jsonl")
    valid = _jsonl(tmp_path, [{"instruction": "one", "response": "two"}], "v.jsonl")
    base = [f"data.train={train}", f"data.valid={valid}", "data.template=raw", "data.max_len=16", "generation.max_new_tokens=8"]
    data = load_run_data(load_config(None, [*base, "data.max_prompt_len=8"]), tok)
    assert len(data.train) == 3 and len(data.valid) == 1
    with pytest.raises(UserError, match=r"data.train: no usable example .*: dropped 3 with a prompt over data.max_prompt_len=2"):
        load_run_data(load_config(None, [*base, "data.max_prompt_len=2"]), tok)


def test_demo_task_is_deterministic_with_three_kinds_and_a_long_subset(tmp_path: Path) -> None:
    from minillm.data.task import make_examples, write_task

    a = write_task(tmp_path / "a", seed=3, n_train=200, n_valid=20, n_test=60, n_pretrain=10)
    b = write_task(tmp_path / "b", seed=3, n_train=200, n_valid=20, n_test=60, n_pretrain=10)
    c = write_task(tmp_path / "c", seed=4, n_train=200, n_valid=20, n_test=60, n_pretrain=10)
    for name in ("train", "valid", "test", "test_long", "pretrain"):
        assert a[name].read_bytes() == b[name].read_bytes()  # same seed, same files
    assert a["train"].read_bytes() != c["train"].read_bytes()
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    train, test, long = read(a["train"]), read(a["test"]), read(a["test_long"])
    assert {r["kind"] for r in train} == {"exact", "open", "long"}
    assert all(r["response"] in r["references"] for r in train)
    assert any(len(r["references"]) > 1 for r in train if r["kind"] == "open")  # several right answers
    assert long == [r for r in test if r["kind"] == "long"] and long
    assert read(a["valid"]) != train[:20]  # splits are drawn independently
    mean_words = lambda kind: sum(len(r["response"].split()) for r in train if r["kind"] == kind) / sum(  # noqa: E731
        r["kind"] == kind for r in train)
    assert mean_words("long") > 2 * mean_words("exact")
    # long answers: 65-81 tokens (words and commas), each list ending at a word its prompt names
    from minillm.data.task import corpus_texts
    from minillm.tiny import build_word_tokenizer

    tok = build_word_tokenizer(corpus_texts())
    sizes = [len(tok(r["response"])["input_ids"]) for r in train if r["kind"] == "long"]
    assert min(sizes) >= 65 and max(sizes) <= 81
    assert all(tok.unk_token_id not in tok(r["instruction"])["input_ids"] for r in train if r["kind"] == "long")
    four = [r for r in make_examples(40, 9, long_rounds=4) if r["kind"] == "long"]
    assert four and all(r["instruction"].endswith("Say it four times.") for r in four)
    assert all(263 <= len(tok(r["response"])["input_ids"]) <= 327 for r in four)
    assert make_examples(5, 9) == make_examples(5, 9)
