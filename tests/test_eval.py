"""Model-level evaluation on tiny models: exposure bias, choice probabilities, `minillm eval`."""

from __future__ import annotations

import csv
import http.server
import json
import math
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from conftest import loopback_server, reply_json, tiny_config_dict
from minillm.eval.calibration import ChoiceRecord, choice_probabilities
from minillm.eval.exposure import Samples, accumulated_kl, exposure_bias
from minillm.eval.metrics import rouge_l


@pytest.fixture(scope="module")
def tiny_models(tiny_task: dict[str, Path]) -> tuple[object, object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_task["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_task["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_task["student"]).eval()
    return tok, teacher, student


def _prompts(tok: object) -> list[list[int]]:
    texts = ["Add two and three.", "Name a colour.", "Count from one to nine."]
    return [tok(t)["input_ids"] for t in texts]  # type: ignore[operator]


def _naive_kl_sum(student: object, teacher: object, prompt: list[int], response: list[int], V: int) -> list[float]:
    """sum_{t<=l} KL(p || q) for one draw: one unpadded forward per position, float64 softmax."""
    out, acc = [], 0.0
    for t in range(len(response)):
        ids = torch.tensor([prompt + response[:t]])
        with torch.no_grad():
            lq = torch.log_softmax(student(input_ids=ids).logits[0, -1, :V].double(), -1)  # type: ignore[operator]
            lp = torch.log_softmax(teacher(input_ids=ids).logits[0, -1, :V].double(), -1)  # type: ignore[operator]
        acc += float((lp.exp() * (lp - lq)).sum())
        out.append(acc)
    return out


def test_exposure_bias_teacher_against_itself_is_zero(tiny_models: tuple) -> None:
    tok, teacher, _ = tiny_models
    V = len(tok.get_vocab())
    curve = exposure_bias(teacher, teacher, _prompts(tok), samples=2, seed=5, max_new_tokens=4, pad_id=tok.pad_token_id,
                          vocab_size=V, batch_size=6)
    assert curve.lengths == [1, 2, 3, 4] and curve.n_samples == 6
    assert curve.R == [0.0] * 4 and curve.eps == [0.0] * 4 and curve.ex_acc_err == [0.0] * 4


def test_exposure_bias_of_a_different_student_matches_the_definition(tiny_models: tuple) -> None:
    tok, teacher, student = tiny_models
    V = len(tok.get_vocab())
    prompts = _prompts(tok)[:2]
    L = 4
    curve = exposure_bias(student, teacher, prompts, samples=2, seed=7, max_new_tokens=L, pad_id=tok.pad_token_id,
                          vocab_size=V, batch_size=4)
    assert curve.lengths == list(range(1, L + 1)) and len(curve.R) == len(curve.eps) == len(curve.ex_acc_err) == L
    assert all(math.isfinite(x) for x in curve.R + curve.eps + curve.ex_acc_err)
    assert all(b >= a for a, b in zip(curve.R, curve.R[1:]))  # a sum of KLs only grows
    # by default every draw runs to the full length (EOS ignored)
    assert all(len(r) == L for r in curve.student_samples.responses + curve.teacher_samples.responses)
    # independent float64 recomputation from the draws: R from the student's, eps from the teacher's
    for draws, got in ((curve.student_samples, curve.R), (curve.teacher_samples, curve.eps)):
        sums = [_naive_kl_sum(student, teacher, prompts[i], r, V) for i, r in zip(draws.prompt_index, draws.responses)]
        want = [sum(s[t] for s in sums) / len(sums) for t in range(L)]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    # the first position sees only the prompt: R(1) = eps(1)
    assert curve.R[0] == pytest.approx(curve.eps[0], rel=1e-5)
    want_err = [(r - e) / e * 100 for r, e in zip(curve.R, curve.eps)]
    assert curve.ex_acc_err == pytest.approx(want_err)
    # batch size does not change the draws or the curve
    again = exposure_bias(student, teacher, prompts, samples=2, seed=7, max_new_tokens=L, pad_id=tok.pad_token_id,
                          vocab_size=V, batch_size=3)
    assert again.student_samples.responses == curve.student_samples.responses
    assert pytest.approx(curve.R, rel=1e-5) == again.R


def test_accumulated_kl_with_draws_of_different_lengths(tiny_models: tuple) -> None:
    tok, teacher, student = tiny_models
    V = len(tok.get_vocab())
    prompts = _prompts(tok)
    draws = Samples(prompt_index=[0, 1, 2, 0], responses=[[5, 6, 7, 8], [9], [], [10, 11]])
    got = accumulated_kl(student, teacher, prompts, draws, length=5, pad_id=tok.pad_token_id, vocab_size=V, batch_size=3)
    sums = [_naive_kl_sum(student, teacher, prompts[i], r, V) for i, r in zip(draws.prompt_index, draws.responses)]
    # a draw that ended keeps its final sum; an empty draw adds 0
    want = [sum((s[min(t, len(s) - 1)] if s else 0.0) for s in sums) / 4 for t in range(5)]
    assert got.shape == (5,) and got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_choice_probabilities_match_a_naive_computation(tiny_models: tuple) -> None:
    tok, _, student = tiny_models
    V = len(tok.get_vocab())
    records = [ChoiceRecord("Name a colour.", ["red", "blue green", "two"], 0), ChoiceRecord("Add one and one.", ["two", "three"], 0)]
    probs = choice_probabilities(student, tok, records, template="raw", vocab_size=V, batch_size=2)
    for rec, got in zip(records, probs):
        prompt = tok(rec.prompt)["input_ids"]
        logps = []
        for choice in rec.choices:
            ids = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(student(input_ids=torch.tensor([prompt + ids])).logits[0, :, :V].double(), -1)
            logps.append(sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)))
        z = sum(math.exp(v) for v in logps)
        assert got == pytest.approx([math.exp(v) / z for v in logps], rel=1e-5)
        assert sum(got) == pytest.approx(1.0)


def test_local_model_judge_runs_and_counts_unparsable_replies(tiny_task: dict[str, Path]) -> None:
    from minillm.eval.judge import LocalModelJudge, judge_score, make_judge

    judge = LocalModelJudge(str(tiny_task["teacher"]), device="cpu", max_new_tokens=6)
    reply = judge([{"role": "user", "content": "Add two and three."}])
    assert isinstance(reply, str)
    # an untrained model does not answer "score score": every such reply is a counted failure
    res = judge_score(judge, ["Name a colour.", "Add one and one."], [["red"], ["two"]], ["blue", "two"])
    assert res.rated + res.failures == 2 and (res.score is None) == (res.rated == 0)
    assert isinstance(make_judge(str(tiny_task["teacher"]), device="cpu"), LocalModelJudge)


class _RecordingProgress:
    """The part of rich's Progress the runner uses."""

    def __init__(self) -> None:
        self.total, self.completed = 0, 0

    def add_task(self, description: str, total: int) -> int:
        self.total = total
        return 0

    def update(self, task: int, advance: int = 0, description: str = "") -> None:
        self.completed += advance


class _CannedJudge(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        paired = "[Answer 1]" in body["messages"][-1]["content"]  # with a reference: two ratings
        reply_json(self, 200, {"choices": [{"message": {"content": "8 6" if paired else "8"}}]})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback_judge() -> Iterator[str]:
    with loopback_server(_CannedJudge) as url:
        yield f"openai:canned@{url}"


def test_run_eval_two_models_with_exposure_calibration_and_judge(tiny_task: dict[str, Path], tmp_path: Path, loopback_judge: str) -> None:
    from minillm.config import config_from_dict
    from minillm.eval.runner import run_eval

    vicuna = tmp_path / "vicuna.jsonl"
    vicuna.write_text("".join(json.dumps({"text": q, "category": "generic"}) + "\n" for q in ["Name a fruit.", "Name a season."]))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Name a colour.", "choices": ["red", "two"], "answer": 0},
        {"prompt": "Add one and one.", "choices": ["two", "five", "Monday"], "answer": 0},
        {"prompt": "Which day comes after Monday?", "choices": ["Sunday", "Tuesday"], "answer": 1},
    ]))
    out = tmp_path / "eval"
    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", eval={
        "models": {"teacher": str(tiny_task["teacher"]), "student": str(tiny_task["student"])},
        "test": {"task": str(tiny_task["test"]), "vicuna": str(vicuna)},
        "seeds": [10, 20], "max_examples": 6, "batch_size": 4, "out": str(out),
        "exposure_bias": True, "exposure_samples": 1, "exposure_max_prompts": 2, "exposure_max_len": 4,
        "calibration": str(mc), "calibration_bins": 5, "judge": loopback_judge,
    }, generation={"max_new_tokens": 12}))
    progress = _RecordingProgress()
    table = run_eval(cfg, progress=progress)
    # one step per model x set x seed, plus exposure and calibration per model
    assert progress.total == progress.completed == 2 * (2 * 2 + 2)
    lines = table.splitlines()
    assert lines[0].startswith("| model | task Rouge-L | task EM |") and "vicuna Judge" in lines[0]
    assert lines[2].startswith("| teacher |") and lines[3].startswith("| student |")
    assert "n/a" in lines[2] and "±" in lines[2]  # vicuna has no reference: Rouge-L n/a
    assert "ExAccErr" in table and "ECE" in table

    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().strip() == table.strip()
    assert results["test_sets"]["task"]["format"] == "dolly" and results["test_sets"]["vicuna"]["format"] == "vicuna"
    assert results["test_sets"]["task"]["with_references"] == results["test_sets"]["task"]["examples"]
    assert results["test_sets"]["vicuna"]["with_references"] == 0
    for model in ("teacher", "student"):
        per_seed = results["per_seed"][model]["task"]
        assert sorted(per_seed) == ["10", "20"]
        for seed in (10, 20):
            rows = [json.loads(x) for x in (out / "responses" / model / "task" / f"seed{seed}.jsonl").read_text().splitlines()]
            assert len(rows) == 6 and all(r["seed"] == seed for r in rows)
            # the stored metric is reproducible from the saved responses
            assert per_seed[str(seed)]["rouge_l"] == pytest.approx(rouge_l([r["response"] for r in rows], [r["references"] for r in rows]))
            assert per_seed[str(seed)]["length"] == pytest.approx(sum(r["tokens"] for r in rows) / 6)
            assert per_seed[str(seed)]["judge"] == pytest.approx(75.0) and all(r["judge"] == [8.0, 6.0] for r in rows)
        vals = [per_seed[s]["rouge_l"] for s in ("10", "20")]
        cell = results["summary"][model]["task"]["rouge_l"]
        assert cell["mean"] == pytest.approx(statistics.fmean(vals)) and cell["std"] == pytest.approx(statistics.stdev(vals))
        assert results["summary"][model]["task"]["lm_loss"]["std"] == 0.0
        assert results["summary"][model]["vicuna"]["rouge_l"] is None
        assert results["summary"][model]["vicuna"]["judge"]["mean"] == pytest.approx(80.0)  # single mode: 8 x 10
        curve = results["exposure_bias"][model]
        assert curve["lengths"] == [1, 2, 3, 4] and len(curve["ex_acc_err"]) == len(curve["R"]) == len(curve["eps"]) == 4
        # both default protocols, each in its own section; the first is also exposure_bias
        fixed, fair = (results["exposure_by_protocol"][p][model] for p in ("fixed_length", "length_fair"))
        assert fixed == curve and fixed["protocol"] == "fixed_length" and fair["protocol"] == "length_fair"
        assert 0 <= fixed["ended_early_student"] <= 2 and 0 <= fixed["ended_early_teacher"] <= 2
        assert len(fair["at_risk_student"]) == len(fair["kl_student"]) == len(fair["lengths"]) <= 4
        cal = results["calibration"][model]
        assert cal["n"] == 3 and len(cal["bins"]) == 5 and 0.0 <= cal["ece"] <= 1.0
    assert results["exposure_bias"]["teacher"]["ex_acc_err"] == [0.0] * 4  # the teacher against itself
    assert results["exposure_settings"]["protocols"] == ["fixed_length", "length_fair"]
    assert "Exposure bias, fixed_length" in table and "Exposure bias, length_fair" in table
    # the seeds differ: responses are not copies of each other
    r10 = (out / "responses" / "student" / "task" / "seed10.jsonl").read_text()
    assert r10 != (out / "responses" / "student" / "task" / "seed20.jsonl").read_text()
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {"teacher", "student"} and {r["dataset"] for r in rows} == {"task", "vicuna"}
    assert len(rows) == 2 * 2 * len(results["metrics"])


def test_cli_eval_prints_the_table(tiny_task: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from minillm.cli import main

    cfg = tiny_config_dict(tiny_task, tmp_path / "run", eval={
        "models": {"teacher": str(tiny_task["teacher"]), "student": str(tiny_task["student"])},
        "test": {"task": str(tiny_task["test"])}, "seeds": [10, 20], "max_examples": 6, "batch_size": 8,
        "metrics": ["rouge_l", "dist_4"],
    }, generation={"max_new_tokens": 12})
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["eval", str(path)])
    printed = capsys.readouterr().out
    assert "| model | task Rouge-L | task Dist-4 |" in printed and "| teacher |" in printed and "| student |" in printed
    default_out = tmp_path / "run" / "eval"
    for name in ("results.json", "results.csv", "results.md"):
        assert (default_out / name).exists()
    assert len(list((default_out / "responses").rglob("seed*.jsonl"))) == 4
    # a user mistake is one line and exit status 2
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(path), "eval.models={}"])
    assert exc.value.code == 2
    assert "eval.models: is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(path), "eval.metrics=[rouge]"])
    assert "unknown metric 'rouge'" in capsys.readouterr().err
