"""Text metrics, pure ExAccErr / ECE, judge parsing and transport, test-set and choice loaders."""

from __future__ import annotations

import http.server
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import loopback_server, reply_json
from minillm.errors import UserError
from minillm.eval import (
    distinct_n,
    ex_acc_err,
    exact_match,
    expected_calibration_error,
    judge_score,
    normalize_answer,
    parse_scores,
    reliability_bins,
    rouge_l,
)
from minillm.eval.calibration import load_choice_records
from minillm.eval.judge import OpenAICompatibleJudge, make_judge
from minillm.eval.metrics import lcs_length, rouge_l_scores
from minillm.eval.testsets import load_test_set, sniff_format

# --- self-BLEU and valid-answer diversity ------------------------------------------------------


def test_self_bleu_hand_computed() -> None:
    from minillm.text_metrics import self_bleu

    # BLEU-2 of "a b c" against "a b d": p1 = 2/3, p2 = 1/2, same length -> sqrt(1/3); symmetric
    assert self_bleu(["a b c", "A B D"], 2) == pytest.approx(100 * math.sqrt(1 / 3))
    # BLEU-1 with clipping: "the the the" -> 1 of 3 ("the" appears at most once in one other response);
    # "the cat" -> 2 of 2; "a cat" -> 1 of 2; no brevity penalty (each at least as long as the closest other)
    assert self_bleu(["the the the", "the cat", "a cat"], 1) == pytest.approx(100 * (1 / 3 + 1 + 1 / 2) / 3)
    # brevity penalty: "cat" against "the cat sat": p1 = 1, BP = exp(1 - 3 / 1); the other: p1 = 1/3, BP 1
    assert self_bleu(["cat", "the cat sat"], 1) == pytest.approx(100 * (math.exp(-2) + 1 / 3) / 2)
    # smoothing (NLTK method1): no matching bigram counts as 0.1 / 1 -> sqrt(1/2 * 0.1)
    assert self_bleu(["a b", "a c"], 2) == pytest.approx(100 * math.sqrt(0.05))
    assert self_bleu(["", "a"], 1) == pytest.approx(0.0)  # no word, and no matching word: 0
    assert self_bleu(["only one"]) is None and self_bleu([]) is None
    with pytest.raises(ValueError):
        self_bleu(["a", "b"], 0)


def test_self_bleu_equals_nltk_sentence_bleu_against_the_others() -> None:
    """Brute force: every response scored by NLTK against all the others, method1 smoothing."""
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    from minillm.text_metrics import self_bleu

    smooth = SmoothingFunction().method1
    rng = random.Random(4)
    for _ in range(60):
        texts = [" ".join(rng.choice("abcdE") for _ in range(rng.randrange(0, 9))) for _ in range(rng.randrange(2, 7))]
        words = [t.lower().split() for t in texts]
        for n in (1, 2, 4):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NLTK warns on zero counts
                want = [100 * sentence_bleu([w for j, w in enumerate(words) if j != i], h, weights=(1 / n,) * n,
                                            smoothing_function=smooth) if h else 0.0 for i, h in enumerate(words)]
            assert self_bleu(texts, n) == pytest.approx(sum(want) / len(want), abs=1e-9), (texts, n)


def test_valid_answers_hand_and_naive() -> None:
    from minillm.text_metrics import valid_answers

    samples = [["red", "Blue.", "red"], ["x", "x"], ["bird", "dog"]]
    refs = [["red", "blue", "green"], ["x"], ["bird", "bat", "bee", "owl"]]
    got = valid_answers(samples, refs)  # the one-answer prompt does not count
    assert got == pytest.approx({"distinct": (2 + 1) / 2, "possible": (3 + 2) / 2, "valid": (100 + 50) / 2,
                                 "prompts": 2, "samples": 2.5})
    assert valid_answers([["a"]], [["a", "A."]]) is None  # one answer after normalisation
    with pytest.raises(ValueError):
        valid_answers([["a"]], [])
    rng = random.Random(5)
    for _ in range(50):
        refs = [rng.sample("abcdef", rng.randrange(1, 5)) for _ in range(6)]
        samples = [[rng.choice("abcdefgh") for _ in range(rng.randrange(1, 6))] for _ in range(6)]
        multi = [i for i, r in enumerate(refs) if len(r) > 1]
        got = valid_answers(samples, refs)
        if not multi:
            assert got is None
            continue
        assert got["distinct"] == pytest.approx(sum(len(set(samples[i]) & set(refs[i])) for i in multi) / len(multi))
        assert got["valid"] == pytest.approx(sum(100 * sum(s in refs[i] for s in samples[i]) / len(samples[i])
                                                 for i in multi) / len(multi))


# --- Rouge-L against the rouge-score package ------------------------------------------------------

WORDS = ["the", "cat", "cats", "running", "runs", "ran", "a", "Dog", "dogs,", "quickly!", "quick", "café", "naïve",
         "東京", "42", "x-ray", "don't", "generously", "generous", "(see", "3.14", "—", "ÉCOLE", "über", "...", "happily"]


def _package_rouge(preds: list[str], refs: list[list[str]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not preds:
        return 0.0
    return 100 * sum(max((scorer.score(r, p)["rougeL"].fmeasure for r in rs), default=0.0) for p, rs in zip(preds, refs)) / len(preds)


def test_rouge_l_matches_rouge_score_on_edge_cases() -> None:
    preds = ["", "The cat sat on the mat.", "", "running dogs!!!", "café au lait", "東京 tower", "x-ray vision, 42 times",
             "a b c", "Generously given."]
    refs = [["the cat"], [""], [""], ["a dog runs", "dogs running fast", "cats"], ["cafe au lait"], ["tower of 東京"],
            ["42 x ray"], ["c b a", "a c"], ["generous gift given"]]
    for p, r in zip(preds, refs):
        assert rouge_l([p], [r]) == pytest.approx(_package_rouge([p], [r]), abs=1e-6), (p, r)
    assert rouge_l(preds, refs) == pytest.approx(_package_rouge(preds, refs), abs=1e-6)
    assert rouge_l(["same words here"], ["same words here"]) == pytest.approx(100.0)
    assert rouge_l([], []) == 0.0


def test_rouge_l_matches_rouge_score_on_random_strings() -> None:
    rng = random.Random(0)
    preds, refs = [], []
    for _ in range(300):
        preds.append(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 14))))
        refs.append([" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 14))) for _ in range(rng.randrange(1, 4))])
    ours = rouge_l_scores(preds, refs)
    for p, r, s in zip(preds, refs, ours):
        assert s == pytest.approx(_package_rouge([p], [r]), abs=1e-6), (p, r)
    assert rouge_l(preds, refs) == pytest.approx(_package_rouge(preds, refs), abs=1e-6)
    # a single string reference is the same as a one-item list
    assert rouge_l(preds[:5], [r[0] for r in refs[:5]]) == pytest.approx(rouge_l(preds[:5], [r[:1] for r in refs[:5]]))


def _lcs_table(a: list[str], b: list[str]) -> int:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


def test_bit_parallel_lcs_equals_dynamic_programming() -> None:
    rng = random.Random(1)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randrange(0, 80))]
        b = [rng.choice("abcde") for _ in range(rng.randrange(0, 80))]
        assert lcs_length(a, b) == _lcs_table(a, b)


def test_metrics_refuse_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        exact_match(["a", "b"], ["a"])


# --- exact match, distinct-n ------------------------------------------------------------------------


def test_exact_match_normalises_case_punctuation_and_spaces_as_the_reference() -> None:
    """The reference code's rule: lowercase, delete ASCII punctuation, collapse whitespace; articles stay."""
    cases = [
        ("The answer is  Seven.", ["the answer is seven"], True),
        ("The answer is seven", ["answer is seven"], False),  # articles are kept
        ("an apple", ["Apple!"], False),
        ("Apple!", ["apple"], True),
        ("apples", ["apple"], False),
        ("Monday, Tuesday", ["monday tuesday"], True),
        ("twenty-one", ["twentyone"], True),  # punctuation is deleted, not spaced
        ("don't", ["dont"], True),
        ("twenty-one", ["twenty one"], False),
        ("blue", ["red", "green", "Blue."], True),
        ("anything", [], False),
        ("«Yes»", ["yes"], False),  # only ASCII punctuation is deleted
    ]
    for pred, refs, hit in cases:
        assert exact_match([pred], [refs]) == (100.0 if hit else 0.0), (pred, refs)
    # independent reference: the rule written out character by character
    import string as _s

    def norm(x: str) -> str:
        return " ".join("".join(c for c in x.lower() if c not in set(_s.punctuation)).split())

    for pred, alternatives, _ in cases:
        assert normalize_answer(pred) == norm(pred)
        assert all(normalize_answer(r) == norm(r) for r in alternatives)
    preds, refs = zip(*[(p, r) for p, r, _ in cases])
    assert exact_match(list(preds), list(refs)) == pytest.approx(100 * 6 / 12)
    assert exact_match([], []) == 0.0


def _naive_distinct(texts: list[str], n: int) -> float:
    grams = []
    for t in texts:
        w = t.lower().split()
        grams += [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]
    return 100 * len(set(grams)) / len(grams) if grams else 0.0


def test_distinct_n_hand_and_naive() -> None:
    # (a b c d), (b c d e) and (a b c d) again: 2 unique of 3
    assert distinct_n(["a b c d e", "A B C D"], 4) == pytest.approx(200 / 3)
    assert distinct_n(["a b", "c d"], 3) == 0.0  # n-grams never join two responses
    assert distinct_n([], 4) == 0.0
    assert distinct_n(["x y x y"], 1) == pytest.approx(50.0)
    rng = random.Random(2)
    texts = [" ".join(rng.choice(["a", "b", "c", "B."]) for _ in range(rng.randrange(0, 12))) for _ in range(40)]
    for n in (1, 2, 4):
        assert distinct_n(texts, n) == pytest.approx(_naive_distinct(texts, n))
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


# --- ExAccErr and ECE (pure) --------------------------------------------------------------------------


def test_ex_acc_err_hand_computation() -> None:
    assert ex_acc_err([1.0, 3.0, 2.0], [0.5, 2.0, 2.0]) == pytest.approx([100.0, 50.0, 0.0])
    out = ex_acc_err([0.0, 0.1], [0.0, 0.0])
    assert out[0] == 0.0 and math.isnan(out[1])
    with pytest.raises(ValueError):
        ex_acc_err([1.0], [1.0, 2.0])


def test_ece_hand_computation() -> None:
    conf = [0.95, 0.9, 0.65, 0.55, 0.3, 0.3]
    correct = [1, 0, 1, 1, 0, 1]
    # bins of width 0.1: (0.9,1] {0.95 right}, (0.8,0.9] {0.9 wrong}, (0.6,0.7] {right}, (0.5,0.6] {right},
    # (0.2,0.3] {0.3 wrong, 0.3 right}
    expected = (0.05 + 0.9 + 0.35 + 0.45 + 2 * 0.2) / 6
    assert expected_calibration_error(conf, correct, 10) == pytest.approx(expected)
    # two bins: (0, 0.5] acc 1/2 conf 0.3; (0.5, 1] acc 3/4 conf 0.7625
    assert expected_calibration_error(conf, correct, 2) == pytest.approx(2 / 6 * 0.2 + 4 / 6 * 0.0125)
    rows = reliability_bins(conf, correct, 10)
    assert [r["count"] for r in rows] == [0, 0, 2, 0, 0, 1, 1, 0, 1, 1]
    assert rows[2]["accuracy"] == 0.5 and rows[2]["confidence"] == pytest.approx(0.3)
    assert rows[0]["accuracy"] is None
    assert expected_calibration_error([], [], 10) == 0.0
    assert reliability_bins([0.0, 1.0], [0, 1], 4)[0]["count"] == 1  # 0 falls in the first bin
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1], 10)


def test_ece_matches_a_naive_reference() -> None:
    rng = random.Random(3)
    conf = [rng.random() for _ in range(200)] + [0.1 * k for k in range(11)]
    correct = [rng.random() < 0.6 for _ in conf]
    for bins in (1, 3, 10, 15):
        total = 0.0
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0.0)]
            if members:
                acc = sum(correct[i] for i in members) / len(members)
                mc = sum(conf[i] for i in members) / len(members)
                total += len(members) / len(conf) * abs(acc - mc)
        assert expected_calibration_error(conf, correct, bins) == pytest.approx(total, abs=1e-12)


def test_choice_records_are_validated_with_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "mc.jsonl"
    good.write_text(json.dumps({"prompt": "2+2?", "choices": ["3", "4"], "answer": 1}) + "\n"
                    + json.dumps({"prompt": "sky?", "choices": ["blue", "red"], "answer": "blue"}) + "\n")
    recs = load_choice_records(str(good))
    assert [r.answer for r in recs] == [1, 0]
    bad = [
        ({"prompt": "q", "choices": ["a"], "answer": 0}, "at least two"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": 2}, "0-based index"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": "c"}, "not one of the choices"),
        ({"choices": ["a", "b"], "answer": 0}, "'prompt'"),
    ]
    for rec, msg in bad:
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps({"prompt": "ok", "choices": ["x", "y"], "answer": 0}) + "\n\n" + json.dumps(rec) + "\n")
        with pytest.raises(UserError, match=rf"bad.jsonl:3: .*{msg}"):
            load_choice_records(str(f))


# --- judge ------------------------------------------------------------------------------------------


def test_parse_scores() -> None:
    assert parse_scores("8 6\nbecause ...") == (8.0, 6.0)
    assert parse_scores("\n  7.5, 9 ") == (7.5, 9.0)
    assert parse_scores("8/10 6/10") == (8.0, 6.0)
    assert parse_scores("Answer 1: 8, Answer 2: 6") == (8.0, 6.0)
    assert parse_scores("7", n=1) == (7.0,)
    for reply in ("", "I think the first is better", "8", "11 3", "1 2 3", "score eight"):
        assert parse_scores(reply) is None, reply


def test_judge_score_with_a_fake_judge() -> None:
    replies = iter(["8 4", "not a rating", "10 10", "6 3"])
    seen: list[list[dict[str, str]]] = []

    def fake(messages: list[dict[str, str]]) -> str:
        seen.append(messages)
        return next(replies)

    res = judge_score(fake, ["i1", "i2", "i3", "i4"], [["r1"], ["r2"], ["r3", "other"], ["r4"]], ["a1", "a2", "a3", "a4"])
    assert res.mode == "paired" and res.rated == 3 and res.failures == 1
    assert res.score == pytest.approx(100 * (4 + 10 + 3) / (8 + 10 + 6))
    user = seen[2][-1]["content"]
    assert "i3" in user and "r3" in user and "a3" in user and "other" not in user
    # a raising judge is a failure, not a crash; no reference at all -> single-answer mode, mean x 10
    calls = iter(["7", "bad", "9"])

    def single(messages: list[dict[str, str]]) -> str:
        reply = next(calls)
        if reply == "bad":
            raise OSError("connection reset")
        return reply

    res = judge_score(single, ["q1", "q2", "q3"], [[], [], []], ["a", "b", "c"])
    assert res.mode == "single" and res.failures == 1 and res.score == pytest.approx(80.0)
    # paired sets skip examples without a reference
    res = judge_score(lambda m: "5 5", ["q1", "q2"], [["r"], []], ["a", "b"])
    assert res.skipped == 1 and res.rated == 1 and res.score == pytest.approx(100.0)


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[dict] = []
    statuses: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        payload = {"choices": [{"message": {"role": "assistant", "content": "9 7\nclear and correct"}}]}
        reply_json(self, status, payload if status == 200 else {"error": "nope"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def judge_server() -> Iterator[str]:
    """A canned OpenAI-compatible server on the loopback interface only."""
    _Handler.requests, _Handler.statuses = [], []
    with loopback_server(_Handler) as url:
        yield url


def test_openai_compatible_judge_against_a_loopback_server(judge_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINILLM_TEST_KEY", "sk-test")
    judge = OpenAICompatibleJudge(judge_server, "judge-model", "MINILLM_TEST_KEY", backoff_s=0.0)
    res = judge_score(judge, ["Add two and two."], [["four"]], ["five"])
    assert res.score == pytest.approx(100 * 7 / 9) and res.failures == 0
    req = _Handler.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["messages"][-1]["role"] == "user"
    assert "Add two and two." in req["body"]["messages"][-1]["content"]
    # a server error is retried; a rejected request is a user error naming the key variable
    _Handler.statuses = [500]
    assert judge([{"role": "user", "content": "x"}]).startswith("9 7")
    _Handler.statuses = [401]
    with pytest.raises(UserError, match="HTTP 401.*MINILLM_TEST_KEY"):
        judge([{"role": "user", "content": "x"}])
    # a base URL ending in /v1 is not doubled; the spec form builds the same judge
    j2 = make_judge(f"openai:m@{judge_server}/v1")
    assert isinstance(j2, OpenAICompatibleJudge) and j2.url == f"{judge_server}/v1/chat/completions"
    with pytest.raises(UserError, match="openai:<model>@<base_url>"):
        make_judge("openai:no-url")


# --- test sets ----------------------------------------------------------------------------------------


def _write(path: Path, records: list[object]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_loaders_for_each_format(tmp_path: Path) -> None:
    dolly = _write(tmp_path / "dolly.jsonl", [
        {"instruction": "Name a colour.", "context": "", "response": "red", "references": ["red", "blue"]},
        {"instruction": "Summarise.", "context": "Long text.", "response": "Short.", "category": "summarization"},
    ])
    ts = load_test_set(dolly)
    assert ts.format == "dolly" and ts.examples[0].references == ["red", "blue"] and ts.examples[1].context == "Long text."
    assert ts.examples[1].references == ["Short."] and ts.examples[1].meta["category"] == "summarization"
    assert ts.examples[1].source.endswith("dolly.jsonl:2")

    selfinst = _write(tmp_path / "selfinst.jsonl", [
        {"id": "u1", "instruction": "Translate.", "instances": [{"input": "hola", "output": "hello"}, {"input": "adios", "output": "bye"}]},
        {"instruction": "Flat one.", "input": "x", "output": "y"},
    ])
    ts = load_test_set(selfinst, "selfinst")
    assert [(e.instruction, e.context, e.references) for e in ts.examples] == [
        ("Translate.", "hola", ["hello"]), ("Translate.", "adios", ["bye"]), ("Flat one.", "x", ["y"])]
    assert load_test_set(selfinst).format == "selfinst"

    vicuna = _write(tmp_path / "vicuna.jsonl", [{"question_id": 1, "text": "How do I relax?", "category": "generic"},
                                                {"question": "What is AI?"}])
    ts = load_test_set(vicuna)
    assert ts.format == "vicuna" and not ts.has_references and ts.examples[0].response is None
    assert [e.instruction for e in ts.examples] == ["How do I relax?", "What is AI?"]

    sni = _write(tmp_path / "sni.jsonl", [
        {"definition": "Answer yes or no.", "input": "Is ice cold?", "output": ["Yes", "yes."]},
        {"prompt": "Full prompt here.", "output": ["a", "b", "c"]},
    ])
    ts = load_test_set(sni)
    assert ts.format == "sni" and ts.examples[0].references == ["Yes", "yes."] and ts.examples[1].references == ["a", "b", "c"]
    assert ts.examples[0].instruction == "Answer yes or no." and ts.examples[0].context == "Is ice cold?"

    unni = _write(tmp_path / "unni.jsonl", [
        {"instruction": "Classify.", "input": "great film", "output": "positive",
         "reformulations": [{"instruction": "Say the sentiment.", "input": "great film", "output": "Positive"},
                            {"instruction": "Again.", "output": "positive"}]},
    ])
    ts = load_test_set(unni)
    assert ts.format == "unni" and ts.examples[0].references == ["positive", "Positive"]

    pr = _write(tmp_path / "pr.jsonl", [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "Bye?", "completion": "Bye."}])
    ts = load_test_set(pr)
    assert ts.format == "prompt_response" and [e.references for e in ts.examples] == [["Hello."], ["Bye."]]

    assert len(load_test_set(selfinst, max_examples=2).examples) == 2


def test_loaders_read_the_raw_releases_and_vicuna_references(tmp_path: Path) -> None:
    # a raw natural-instructions task file: one JSON object, one example per instance
    task = tmp_path / "task001.json"
    task.write_text(json.dumps({"Definition": ["Answer the question.", "Be brief."], "Positive Examples": [],
                                "Instances": [{"id": "t1", "input": "2+2?", "output": ["4", "four"]},
                                              {"id": "t2", "input": "3+3?", "output": ["6"]}]}))
    ts = load_test_set(str(task))
    assert ts.format == "sni" and [(e.instruction, e.context, e.references) for e in ts.examples] == [
        ("Answer the question.\nBe brief.", "2+2?", ["4", "four"]), ("Answer the question.\nBe brief.", "3+3?", ["6"])]
    assert ts.examples[1].source.endswith("task001.json (Instances[1])") and ts.examples[1].meta["id"] == "t2"
    # raw Unnatural Instructions: instances, and reformulations whose outputs are extra references
    unni = _write(tmp_path / "unni_raw.jsonl", [
        {"instruction": "Classify.", "instances": [{"instruction_with_input": "Classify: fine", "input": "fine",
                                                    "constraints": "None.", "output": "positive"}],
         "reformulations": [{"instruction": "Tone?", "input": "fine", "output": "Positive"}]},
        {"instruction": "Add.", "instances": [{"input": "1 1", "output": "2"}, {"input": "2 2", "output": "4"}]},
    ])
    ts = load_test_set(unni, "unni")
    assert [(e.instruction, e.context, e.references) for e in ts.examples] == [
        ("Classify.", "fine", ["positive", "Positive"]), ("Add.", "1 1", ["2"]), ("Add.", "2 2", ["4"])]
    # Vicuna questions with reference answers are scored against them
    vicuna = _write(tmp_path / "vicuna_ref.jsonl", [{"text": "Name a colour.", "reference": "red"},
                                                    {"question": "What is AI?", "answer": ["A field.", "Machines that learn."]}])
    ts = load_test_set(vicuna)
    assert ts.format == "vicuna" and [e.references for e in ts.examples] == [["red"], ["A field.", "Machines that learn."]]


@pytest.mark.parametrize(
    ("fmt", "record", "message"),
    [
        ("dolly", {"instruction": "x"}, "dolly record needs a 'response'"),
        ("dolly", {"instruction": ["x"], "response": "y"}, "'instruction' must be a string"),
        ("selfinst", {"instruction": "x", "instances": [{"input": "a"}]}, r"instances\[0\]\): field 'output'"),
        ("selfinst", {"instruction": "x", "instances": []}, "non-empty list"),
        ("vicuna", {"category": "generic"}, "'text' or 'question'"),
        ("sni", {"definition": "d", "input": "i", "output": []}, "non-empty list of strings"),
        ("sni", {"input": "i", "output": ["o"]}, "'definition'"),
        ("unni", {"instruction": "x", "input": "y"}, "needs an 'output'"),
        ("unni", {"instruction": "x", "output": "y", "reformulations": [{"instruction": "z"}]}, r"reformulations\[0\]"),
        ("dolly", {"instruction": "   ", "response": "y"}, "the prompt is empty"),
        ("dolly", {"instruction": "x", "response": "  "}, "reference 1 of 1 is blank"),
        ("sni", {"definition": "d", "output": ["ok", ""]}, "reference 2 of 2 is blank"),
        ("prompt_response", {"prompt": " ", "response": "y"}, "the prompt is empty"),
        ("unni", {"instruction": "x", "instances": [{"input": "a"}]}, r"instances\[0\]\): field 'output' is missing"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, fmt: str, record: dict, message: str) -> None:
    good = {"dolly": {"instruction": "a", "response": "b"}, "selfinst": {"instruction": "a", "output": "b"},
            "vicuna": {"text": "a"}, "sni": {"definition": "a", "output": ["b"]}, "unni": {"instruction": "a", "output": "b"},
            "prompt_response": {"prompt": "a", "response": "b"}}[fmt]
    path = _write(tmp_path / "t.jsonl", [good, "", record])
    with pytest.raises(UserError, match=rf"t\.jsonl:3.*{message}"):
        load_test_set(path, fmt)


def test_loader_errors_on_json_unknown_fields_and_format(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", [{"instruction": "a", "response": "b"}, "{not json"])
    with pytest.raises(UserError, match=r"t\.jsonl:2: not valid JSON"):
        load_test_set(path)
    with pytest.raises(UserError, match="cannot tell the test-set format.*eval.format"):
        sniff_format({"foo": 1}, "f:1")
    with pytest.raises(UserError, match="unknown format"):
        load_test_set(path, "alpaca")
    with pytest.raises(UserError, match="not found"):
        load_test_set(str(tmp_path / "missing.jsonl"))
