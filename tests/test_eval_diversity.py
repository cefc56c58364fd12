"""Semantic diversity and self-BLEU in the evaluation's outputs: the results.md table the runner
prints and the report's section, from the runner's own writers."""

from __future__ import annotations

import json
from pathlib import Path

from minillm.eval.runner import _extra_tables, aggregate, seed_metrics
from minillm.report import write_report
from minillm.text_metrics import self_bleu, valid_answers


def test_valid_answers_and_self_bleu_reach_the_table_and_the_report(tmp_path: Path) -> None:
    refs = [["red", "blue", "green"], ["bird", "bat"], ["The answer is four."]]
    by_seed = [["red", "bird", "The answer is four."], ["blue", "bird", "The answer is five."]]  # 2 seeds
    per_seed = {str(s): seed_metrics(t, [3] * 3, refs, None, ["rouge_l", "self_bleu"]) for s, t in zip((10, 20), by_seed)}
    assert per_seed["10"]["self_bleu"] == self_bleu(by_seed[0], 4)
    answers = valid_answers([list(x) for x in zip(*by_seed)], refs)
    assert answers == {"distinct": 1.5, "possible": 2.0, "valid": 100.0, "prompts": 2.0, "samples": 2.0}
    results = {"models": {"m": "x"}, "seeds": [10, 20], "metrics": ["rouge_l", "self_bleu"],
               "summary": {"m": {"task": aggregate(per_seed)}}, "valid_answers": {"m": {"task": answers}}}
    assert "| m | task | 1.50 | 2.00 | 100.0 | 2 | 2 |" in _extra_tables(results)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    write_report([tmp_path / "eval"], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| model | Rouge-L | Self-BLEU |" in md
    assert "### Semantic diversity (eval)" in md and "| m | task | 1.50 | 2.00 | 100.0 | 2 | 2 |" in md
