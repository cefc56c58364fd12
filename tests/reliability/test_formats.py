"""One format registry for training and evaluation (issue 7): every public release below is read by
both readers, in the shape it is published (records written from the formats' public
documentation and repositories: databricks-dolly-15k, yizhongw/self-instruct, lm-sys/FastChat,
allenai/natural-instructions, orhonovich/unnatural-instructions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from minillm.config import DATA_FORMATS, load_config
from minillm.data import load_run_data, read_examples
from minillm.data.formats import FORMATS
from minillm.errors import UserError
from minillm.eval import testsets
from minillm.eval.testsets import load_test_set
from minillm.tiny import build_word_tokenizer

DOLLY = [{"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia commenced services on 31 August 2000.",
          "response": "Virgin Australia commenced services on 31 August 2000.", "category": "closed_qa"},
         {"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope", "category": "classification"}]
SELFINST_SEED = [{"id": "seed_task_0", "name": "breakfast_suggestion", "instruction": "Suggest a breakfast without eggs.",
                  "instances": [{"input": "", "output": "Oatmeal with banana and protein powder."}], "is_classification": False},
                 {"id": "seed_task_1", "name": "antonym_relation", "instruction": "What is the relation between the given pairs?",
                  "instances": [{"input": "Night : Day :: Right : Left", "output": "They are opposites."}], "is_classification": False}]
SELFINST_HUB = [{"id": "user_oriented_task_0", "motivation_app": "Grammarly", "instruction": "Rewrite the sentence concisely.",
                 "instances": {"input": ["If you have any questions, please do let me know."], "output": ["Questions? Let me know."]}}]
VICUNA_OLD = [{"question_id": 1, "text": "How can I improve my time management skills?", "category": "generic"}]
VICUNA_BENCH = [{"question_id": 1, "category": "generic", "turns": ["How can I improve my time management skills?"]}]
MT_BENCH = [{"question_id": 81, "category": "writing", "turns": ["Compose a travel blog post about Hawaii.", "Rewrite it; start every sentence with A."]},
            {"question_id": 101, "category": "reasoning", "turns": ["You overtook the second person. What is your position?",
                                                                    "And if it was the last person?"],
             "reference": ["You are in second place.", "Uncertain."]}]
SNI_TASK = {"Contributors": ["x"], "Source": ["quoref"], "Categories": ["Question Generation"],
            "Definition": ["In this task, you're given a passage.", "Write a question about it."],
            "Positive Examples": [{"input": "p", "output": "q", "explanation": "e"}], "Negative Examples": [],
            "Instances": [{"id": "task001-1", "input": "Passage: the cat sat.", "output": ["Where did the cat sit?"]},
                          {"id": "task001-2", "input": "Passage: it rained.", "output": ["What happened?", "What fell?"]}],
            "Instance License": ["CC BY 4.0"]}
SNI_PROCESSED = [{"definition": "Answer yes or no.", "input": "Is ice cold?", "output": ["Yes", "yes."]}]
UNNI_CORE = [{"instruction": "Classify the sentiment.", "instances": [{"instruction_with_input": "Classify the sentiment.\n\nfine",
                                                                       "input": "fine", "constraints": "positive or negative.",
                                                                       "output": "positive"}]}]
UNNI_FULL = [{**UNNI_CORE[0], "reformulations": [{"instruction": "What is the tone?", "instruction_with_input": "What is the tone? fine",
                                                  "input": "fine", "output": "Positive"}]}]
PAIRS = [{"prompt": "Make a list of 3 ways to study.\n\nOutput:", "completion": " 1. Plan. 2. Rest. 3. Review."}]
CHAT = [{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]}]

# (name, file name, content, format, [(instruction, context, references), ...])
RELEASES = [
    ("dolly", "dolly.jsonl", DOLLY, "dolly", [(DOLLY[0]["instruction"], DOLLY[0]["context"], [DOLLY[0]["response"]]),
                                              (DOLLY[1]["instruction"], "", ["Tope"])]),
    ("self-instruct seed tasks", "seed_tasks.jsonl", SELFINST_SEED, "selfinst", [
        ("Suggest a breakfast without eggs.", "", ["Oatmeal with banana and protein powder."]),
        ("What is the relation between the given pairs?", "Night : Day :: Right : Left", ["They are opposites."])]),
    ("self-instruct on the Hub", "user_oriented.jsonl", SELFINST_HUB, "selfinst", [
        ("Rewrite the sentence concisely.", "If you have any questions, please do let me know.", ["Questions? Let me know."])]),
    ("Vicuna (fastchat/eval)", "vicuna_old.jsonl", VICUNA_OLD, "vicuna", [(VICUNA_OLD[0]["text"], "", [])]),
    ("Vicuna bench (llm_judge)", "vicuna.jsonl", VICUNA_BENCH, "vicuna", [(VICUNA_BENCH[0]["turns"][0], "", [])]),
    ("MT-bench", "mt_bench.jsonl", MT_BENCH, "vicuna", [(MT_BENCH[0]["turns"][0], "", []),
                                                        (MT_BENCH[1]["turns"][0], "", ["You are in second place."])]),
    ("S-NI task file", "task001_quoref_question_generation.json", SNI_TASK, "sni", [
        ("In this task, you're given a passage.\nWrite a question about it.", "Passage: the cat sat.", ["Where did the cat sit?"]),
        ("In this task, you're given a passage.\nWrite a question about it.", "Passage: it rained.", ["What happened?", "What fell?"])]),
    ("S-NI processed", "sni.jsonl", SNI_PROCESSED, "sni", [("Answer yes or no.", "Is ice cold?", ["Yes", "yes."])]),
    ("UnNI core_data", "core_data.jsonl", UNNI_CORE, "unni", [("Classify the sentiment.", "fine", ["positive"])]),
    ("UnNI full_data", "full_data.jsonl", UNNI_FULL, "unni", [("Classify the sentiment.", "fine", ["positive", "Positive"])]),
    ("prompt / completion", "pairs.jsonl", PAIRS, "prompt_response", [(PAIRS[0]["prompt"], "", [PAIRS[0]["completion"]])]),
    ("chat messages", "chat.jsonl", CHAT, "prompt_response", [("Name a colour.", "", ["Red."])]),
]


def _write(tmp_path: Path, name: str, content: Any) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(content) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in content))
    return str(p)


def test_one_registry_names_the_config_choices() -> None:
    assert DATA_FORMATS == ("auto", *FORMATS) == testsets.FORMATS


@pytest.mark.parametrize(("name", "file", "content", "fmt", "want"), RELEASES, ids=[r[0] for r in RELEASES])
def test_each_release_trains_and_evaluates_alike(tmp_path: Path, name: str, file: str, content: Any, fmt: str,
                                                 want: list[tuple[str, str, list[str]]]) -> None:
    path = _write(tmp_path, file, content)
    train = read_examples(path)
    test = load_test_set(path)
    assert test.format == fmt
    for examples in (train, test.examples):
        assert [(e.instruction, e.context, e.references) for e in examples] == want
    assert [e.response for e in train] == [refs[0] if refs else None for _, _, refs in want]
    assert [e.source for e in train] == [e.source for e in test.examples]
    forced = load_test_set(path, fmt)  # the sniffed format, set by hand, reads the same
    assert [e.references for e in forced.examples] == [e.references for e in test.examples]


def test_mt_bench_keeps_its_ids_and_notes_the_follow_up_turns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: refused by eval as an unknown format."""
    path = _write(tmp_path, "question.jsonl", MT_BENCH)
    with caplog.at_level("INFO", logger="minillm"):
        ts = load_test_set(path)
    assert [e.meta["question_id"] for e in ts.examples] == [81, 101] and ts.examples[0].meta["category"] == "writing"
    assert f"{path}: 2 questions have follow-up turns; only the first turn is asked" in caplog.text


def test_self_instruct_seed_tasks_give_sft_examples(tmp_path: Path) -> None:
    """Before: inputs and outputs were dropped, so SFT found no usable example."""
    words = " ".join(str(v) for r in SELFINST_SEED for v in (r["instruction"], *r["instances"][0].values()))
    tok = build_word_tokenizer([words])
    path = _write(tmp_path, "seed_tasks.jsonl", SELFINST_SEED * 5)
    cfg = load_config(None, [f"data.train={path}", "data.max_prompt_len=64", "data.max_len=96", "generation.max_new_tokens=8"])
    data = load_run_data(cfg, tok)
    assert len(data.train) + len(data.valid) == 10
    ex = data.train_examples[1]
    assert ex.context == "Night : Day :: Right : Left" and ex.response == "They are opposites."
    assert data.train[1].response_ids[:-1] == tok(ex.response, add_special_tokens=False)["input_ids"]


def test_data_format_and_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, "flat.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"}])
    assert read_examples(path, fmt="unni")[0].references == ["3"]
    with pytest.raises(UserError, match="sni record needs 'definition'"):
        read_examples(path, fmt="sni")
    with pytest.raises(UserError, match=r"data\.format: must be one of"):
        load_config(None, ["data.format=alpaca"])
    # data.columns renames before the format is picked: the mapped column wins over a field of our name
    renamed = _write(tmp_path, "renamed.jsonl", [{"q": "Name a colour.", "prompt": "not this", "a": "red"}])
    (ex,) = read_examples(renamed, columns={"prompt": "q", "response": "a"})
    assert (ex.instruction, ex.response) == ("Name a colour.", "red")


def test_eval_refuses_what_training_drops(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.jsonl", [DOLLY[0], {"instruction": "No answer here."}])
    assert [e.response for e in read_examples(path)] == [DOLLY[0]["response"], None]  # training counts and drops it
    with pytest.raises(UserError, match=r"d\.jsonl:2: dolly record needs a 'response'"):
        load_test_set(path)
