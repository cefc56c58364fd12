"""The demo's summary over pipeline seeds and the README table written from it: computed
conclusions, the block format, and the README's block in that same format."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from minillm.demo_table import (
    COLUMNS,
    END,
    START,
    parse_block,
    readme_section,
    summarize,
    table_header,
    update_readme,
    write_outputs,
)
from minillm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("teacher", "sft", "kd", "seqkd", "minillm")


def fake_results(rouge: dict[str, float], exacc: dict[str, float], fair_len: int = 3) -> dict[str, Any]:
    """A results.json in the eval runner's layout with the given Rouge-L and fixed-length
    ExAccErr(l_max = 24); length-fair curves of ``fair_len`` points (MiniLLM's one shorter), whose
    ExAccErr at l is 10 x l minus a tenth of the fixed-length one."""
    cell = lambda v: {"mean": v, "std": 0.5, "n": 5}  # noqa: E731
    summary = {m: {"task": {k: cell(rouge[m] - i) for i, k in enumerate(("rouge_l", "exact_match", "dist_4"))}
                   | {"lm_loss": cell(0.4)}, "long": {"rouge_l": cell(rouge[m] + 5)}} for m in MODELS}
    fixed = {m: {"lengths": [1, 24], "ex_acc_err": [0.0, exacc[m]], "R": [0.1, 2.0 + exacc[m] / 100],
                 "eps": [0.1, 1.5], "n_samples": 8, "ended_early_student": 2, "protocol": "fixed_length"} for m in MODELS}
    fair = {}
    for m in MODELS:
        n = fair_len - (m == "minillm")
        err = [10.0 * t - exacc[m] / 10 for t in range(1, n + 1)]
        fair[m] = {"lengths": list(range(1, n + 1)), "ex_acc_err": err, "R": [1.0 + e / 100 for e in err], "eps": [1.0] * n,
                   "n_samples": 8, "protocol": "length_fair"}
    return {"summary": summary, "exposure_bias": fixed, "exposure_by_protocol": {"fixed_length": fixed, "length_fair": fair},
            "exposure_settings": {"max_new_tokens": 24}}


def write_seed(tmp: Path, seed: int, results: dict[str, Any]) -> Path:
    d = tmp / f"seed_{seed}" / "eval"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture
def two_seeds(tmp_path: Path) -> dict[str, Any]:
    rouge_a = {"teacher": 95, "sft": 68, "kd": 71, "seqkd": 69, "minillm": 79}
    rouge_b = {"teacher": 94, "sft": 70, "kd": 72, "seqkd": 70, "minillm": 77}
    # ExAccErr: MiniLLM lowest in seed 10, highest in seed 11
    ex_a = {"teacher": 0, "sft": 70, "kd": 66, "seqkd": 77, "minillm": 50}
    ex_b = {"teacher": 0, "sft": 41, "kd": 50, "seqkd": 45, "minillm": 60}
    dirs = {10: write_seed(tmp_path, 10, fake_results(rouge_a, ex_a)), 11: write_seed(tmp_path, 11, fake_results(rouge_b, ex_b))}
    return summarize(dirs)


def test_summary_is_mean_and_std_over_pipeline_seeds(two_seeds: dict[str, Any]) -> None:
    s = two_seeds
    assert s["pipeline_seeds"] == [10, 11] and s["l_max"] == 24
    cell = s["stats"]["minillm"]["task/rouge_l"]
    assert cell["mean"] == pytest.approx(78.0) and cell["std"] == pytest.approx(2 ** 0.5) and cell["n"] == 2
    assert s["per_seed"]["11"]["minillm"]["fixed_length/ex_acc_err"] == 60
    assert s["per_seed"]["11"]["minillm"]["fixed_length/early"] == pytest.approx(25.0)  # 2 of 8 draws
    # length-fair at the longest l every model reaches in every seed (MiniLLM's curve: 2 points)
    assert s["l_fair"] == 2
    assert s["per_seed"]["10"]["sft"]["length_fair/ex_acc_err"] == pytest.approx(20.0 - 7.0)
    assert s["per_seed"]["10"]["minillm"]["length_fair/R"] == pytest.approx(1.0 + (20.0 - 5.0) / 100)


def test_results_from_before_the_protocols_count_as_fixed_length(tmp_path: Path) -> None:
    rouge = {"teacher": 95, "sft": 68, "kd": 71, "seqkd": 69, "minillm": 79}
    old = fake_results(rouge, {"teacher": 0, "sft": 70, "kd": 66, "seqkd": 77, "minillm": 50})
    del old["exposure_by_protocol"]
    s = summarize({10: write_seed(tmp_path, 10, old)})
    assert s["per_seed"]["10"]["minillm"]["fixed_length/ex_acc_err"] == 50
    assert s["per_seed"]["10"]["minillm"]["length_fair/ex_acc_err"] is None and s["l_fair"] is None


def test_conclusions_say_every_seed_only_where_it_holds(two_seeds: dict[str, Any]) -> None:
    lines = two_seeds["conclusions"]
    assert "Rouge-L: MiniLLM is the best of the students in every pipeline seed (2 of 2)." in lines
    assert ("ExAccErr FL(24) %: no ranking of MiniLLM holds across the pipeline seeds (best in 1, worst in 1 of 2)."
            in lines)
    assert len([ln for ln in lines if "excess error is" not in ln]) == len(COLUMNS)
    # per protocol, MiniLLM against each baseline over the seeds, and where its R and eps lie
    assert ("ExAccErr FL(24) %: MiniLLM's excess error is below SFT in 1 of 2, below KD in 1 of 2, below SeqKD in 1 of 2 "
            "pipeline seeds; its R FL is below the baselines' mean in 1 of 2, its eps FL in 0 of 2.") in lines
    # length-fair: ExAccErr = 20 - exacc / 10 at l = 2, so the same order as fixed-length
    assert any(ln.startswith("ExAccErr LF(2) %: MiniLLM's excess error is below SFT in 1 of 2") for ln in lines)


def test_block_round_trips_and_bolds_the_best_student(two_seeds: dict[str, Any], tmp_path: Path) -> None:
    block = write_outputs(tmp_path / "out", two_seeds, "minillm demo --seeds 2", 12.0)
    assert (tmp_path / "out" / "demo_table.md").read_text() == block
    parsed = parse_block(block)
    assert parsed["header"] == table_header(24, 2)
    assert "ExAccErr FL(24) %" in parsed["header"] and "ExAccErr LF(2) %" in parsed["header"]
    assert "fixed-length (FL) at l = 24" in parsed["caption"] and "length-fair (LF) at l = 2" in parsed["caption"]
    assert list(parsed["rows"]) == ["teacher", "SFT", "KD", "SeqKD", "MiniLLM"]
    assert parsed["rows"]["MiniLLM"][0] == "**78.00 ± 1.41**"
    assert parsed["conclusions"] == two_seeds["conclusions"]
    for pkg in ("torch", "transformers", "tokenizers"):
        assert re.search(rf"{pkg} \d", parsed["caption"]), pkg
    assert "2 whole-pipeline seeds (10, 11" in parsed["caption"]


def test_update_readme_replaces_only_the_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{START}\nold\n{END}\nb\n")
    update_readme(readme, "new\n")
    assert readme.read_text() == f"a\n{START}\nnew\n{END}\nb\n"
    readme.write_text("no markers")
    with pytest.raises(UserError, match="no demo table markers"):
        update_readme(readme, "new\n")


def test_parse_block_refuses_a_hand_edited_cell() -> None:
    block = "`minillm demo` (torch 1, transformers 1, tokenizers 1, numpy 1, safetensors 1)\n\n| model | Rouge-L |\n|---|---:|\n| SFT | about 70 |\n"
    with pytest.raises(ValueError, match="mean ± std"):
        parse_block(block)


def test_readme_demo_table_is_the_demo_commands_output_format() -> None:
    """The README's table was written by `minillm demo --readme README.md`: same header, same rows,
    the versions in the caption, and the README command itself as the command."""
    parsed = parse_block(readme_section((ROOT / "README.md").read_text()))
    assert parsed["header"][0] == "model" and parsed["header"][1:] == table_header(*parsed_l(parsed))[1:]
    assert list(parsed["rows"]) == ["teacher", "SFT", "KD", "SeqKD", "MiniLLM"]
    assert parsed["caption"].startswith("`minillm demo` on ")
    assert len([ln for ln in parsed["conclusions"] if "excess error is" not in ln]) == len(COLUMNS)


def parsed_l(parsed: dict[str, Any]) -> tuple[int, int]:
    header = " ".join(parsed["header"])
    fl, lf = re.search(r"ExAccErr FL\((\d+)\)", header), re.search(r"ExAccErr LF\((\d+)\)", header)
    assert fl and lf, parsed["header"]
    return int(fl.group(1)), int(lf.group(1))
