"""`minillm eval`: every model x test set x sampling seed, then mean +- std over seeds.

For each model of ``eval.models`` (display name -> folder / Hub id / .gguf) and each test set of
``eval.test`` (name -> file, read by :mod:`minillm.eval.testsets`), the prompts are rendered with
``data.template`` (prompts over ``data.max_prompt_len`` tokens are skipped and counted, as in
training) and one response per prompt is sampled for every seed of ``eval.seeds`` with the
``generation.*`` settings (the paper: temperature 1, no top-k / top-p); a prompt's noise depends
only on (seed, example index), so a response does not depend on the batch. Per seed the runner
scores Rouge-L, exact match, Dist-4, self-BLEU, response length (tokens, words) and optionally the judge;
the LM loss on the first reference does not depend on the seed (teacher-forced) and is repeated
for every seed (std 0). Test sets without references (Vicuna) report n/a for Rouge-L, exact match
and the loss. On the prompts of a set that have several valid answers (two or more distinct
references, e.g. the demo task's ``open`` prompts), the responses of the k = ``len(eval.seeds)``
seeds give the semantic diversity (:func:`minillm.text_metrics.valid_answers`): how many distinct
valid answers a model gives per prompt.

Files under ``eval.out`` (default ``output_dir/eval``):

* ``responses/<model>/<testset>/seed<k>.jsonl``: one line per example: ``index``, ``source``,
  ``instruction``, ``context``, ``references``, ``response``, ``tokens``, ``seed`` (and
  ``judge`` = the parsed ratings when the judge ran).
* ``results.json``, with these keys (the report reads them):

  - ``models``: {model: path}; ``seeds``: [int]; ``metrics``: the metric keys shown in the table;
  - ``test_sets``: {set: {"path", "format", "examples", "has_references"}};
  - ``skipped_long_prompt``: {model: {set: count}};
  - ``per_seed``: {model: {set: {"<seed>": {metric: value or null}}}};
  - ``summary``: {model: {set: {metric: {"mean", "std", "n"} or null}}}; ``std`` is the sample
    standard deviation over seeds (0 for one seed); null = n/a;
  - ``valid_answers``: {model: {set: {"distinct", "possible", "valid", "prompts", "samples"}}} for
    the sets with multi-answer prompts (means over those prompts; ``valid`` in %);
  - ``judge`` (when ``eval.judge`` is set): {model: {set: {"<seed>": {"score", "mode", "rated",
    "failures", "skipped", "model_total", "reference_total"}}}};
  - ``exposure_by_protocol`` (when ``eval.exposure_bias``): {protocol: {model: {"lengths": [1..L],
    "ex_acc_err": [...], "R": [...], "eps": [...], "n_samples", "protocol", ...}}} for every protocol of
    ``eval.exposure_protocols`` (``length_fair`` adds "kl_student", "kl_teacher", "at_risk_student",
    "at_risk_teacher"; ``fixed_length`` adds "ended_early_student", "ended_early_teacher"; see
    :mod:`minillm.eval.exposure`); ``exposure_bias``: the first protocol's {model: curve}; and
    ``exposure_settings``: {"teacher", "test_set", "prompts", "samples", "max_new_tokens",
    "protocols", "min_at_risk", "seed"};
  - ``calibration`` (when ``eval.calibration`` is set): {model: {"ece", "accuracy",
    "mean_confidence", "n", "bins": [{"lo", "hi", "count", "accuracy", "confidence"}]}}, ECE as
    a fraction in [0, 1];
  - ``generation``: the generation settings; ``config``: the whole resolved config.

  Non-finite numbers are written as null.
* ``results.csv``: model, dataset, metric, mean, std, n (one row per cell of the table).
* ``results.md``: the Markdown table :func:`run_eval` returns (rows models, columns
  "set metric" as "mean ± std"), followed by ExAccErr / ECE tables when they were measured.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minillm.atomic import write_text_atomic
from minillm.config import Config, ModelConfig
from minillm.data.formats import Example
from minillm.data.instruct import Encoded, encode_examples
from minillm.decoding import generate, stop_token_ids
from minillm.errors import UserError
from minillm.eval.calibration import calibration_report, choice_probabilities, load_choice_records
from minillm.eval.exposure import exposure_curves
from minillm.eval.judge import Judge, judge_score, make_judge
from minillm.eval.metrics import distinct_n, exact_match, mean_words, rouge_l, self_bleu, valid_answers
from minillm.eval.testsets import TestSet, load_test_set
from minillm.models import check_same_vocabulary, load_model, load_tokenizer, resolve_device
from minillm.preflight import check_paths
from minillm.validate import response_loss

log = logging.getLogger("minillm")

LABELS = {
    "rouge_l": "Rouge-L",
    "exact_match": "EM",
    "dist_4": "Dist-4",
    "self_bleu": "Self-BLEU",
    "lm_loss": "Loss",
    "length": "Len (tok)",
    "length_words": "Len (words)",
    "judge": "Judge",
}
REFERENCE_METRICS = ("rouge_l", "exact_match", "lm_loss")


def _safe_name(name: str) -> str:
    """A display name as one path component."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "model"


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def seed_metrics(
    texts: Sequence[str], token_counts: Sequence[int], references: Sequence[Sequence[str]], lm_loss: float | None, wanted: Sequence[str]
) -> dict[str, float | None]:
    """The metrics of one seed's responses; reference metrics use the examples that have references
    and are None (n/a) when none has."""
    with_ref = [i for i, r in enumerate(references) if r]
    preds = [texts[i] for i in with_ref]
    refs = [list(references[i]) for i in with_ref]
    out: dict[str, float | None] = {}
    for m in wanted:
        if m == "rouge_l":
            out[m] = rouge_l(preds, refs) if with_ref else None
        elif m == "exact_match":
            out[m] = exact_match(preds, refs) if with_ref else None
        elif m == "dist_4":
            out[m] = distinct_n(texts, 4)
        elif m == "self_bleu":
            out[m] = self_bleu(texts, 4)
        elif m == "lm_loss":
            out[m] = lm_loss
        elif m == "length":
            out[m] = sum(token_counts) / len(token_counts) if token_counts else 0.0
        elif m == "length_words":
            out[m] = mean_words(texts)
    return out


def aggregate(per_seed: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float] | None]:
    """{seed: {metric: v}} -> {metric: {"mean", "std", "n"}} (sample std; None if any seed is n/a)."""
    metrics: list[str] = []
    for row in per_seed.values():
        metrics += [m for m in row if m not in metrics]
    out: dict[str, dict[str, float] | None] = {}
    for m in metrics:
        values = [row.get(m) for row in per_seed.values()]
        if not values or any(v is None or not math.isfinite(v) for v in values):
            out[m] = None
            continue
        vals = [float(v) for v in values]  # type: ignore[arg-type]
        out[m] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    return out


def format_cell(cell: dict[str, float] | None, metric: str) -> str:
    """'mean ± std' of a summary cell (3 decimals for the LM loss, 2 otherwise); 'n/a' when missing."""
    if cell is None:
        return "n/a"
    digits = 3 if metric == "lm_loss" else 2
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def markdown_table(summary: dict[str, dict[str, dict[str, Any]]], sets: Sequence[str], metrics: Sequence[str]) -> str:
    """Rows models, columns "<set> <metric>", cells "mean ± std" (n/a where not measured)."""
    header = ["model"] + [f"{s} {LABELS.get(m, m)}" for s in sets for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for model, by_set in summary.items():
        cells = [format_cell(by_set.get(s, {}).get(m), m) for s in sets for m in metrics]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return "\n".join(lines)


def _extra_tables(results: dict[str, Any]) -> str:
    parts = []
    if results.get("valid_answers"):
        rows = ["| model | test set | distinct valid answers | of possible | valid % | prompts | samples |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for model, sets in results["valid_answers"].items():
            for set_name, v in sets.items():
                rows.append(f"| {model} | {set_name} | {v['distinct']:.2f} | {v['possible']:.2f} | {v['valid']:.1f} | "
                            f"{int(v['prompts'])} | {v['samples']:g} |")
        parts.append("Semantic diversity (prompts with several valid answers; per prompt over the sampling seeds):\n\n"
                     + "\n".join(rows))
    by_protocol = results.get("exposure_by_protocol") or ({"fixed_length": results["exposure_bias"]} if results.get("exposure_bias") else {})
    for protocol, curves in by_protocol.items():
        rows = ["| model | ExAccErr(l_max) % | R(l_max) | eps(l_max) | l_max | draws |", "|---|---:|---:|---:|---:|---:|"]
        for model, c in curves.items():
            if not c["lengths"]:
                rows.append(f"| {model} | n/a | n/a | n/a | 0 | {c['n_samples']} |")
                continue
            err = c["ex_acc_err"][-1]
            rows.append(f"| {model} | {'n/a' if err is None or not math.isfinite(err) else f'{err:.2f}'} | "
                        f"{c['R'][-1]:.4f} | {c['eps'][-1]:.4f} | {c['lengths'][-1]} | {c['n_samples']} |")
        parts.append(f"Exposure bias, {protocol} (excess accumulated error against the teacher):\n\n" + "\n".join(rows))
    if results.get("calibration"):
        rows = ["| model | ECE | accuracy | mean confidence | n |", "|---|---:|---:|---:|---:|"]
        for model, c in results["calibration"].items():
            rows.append(f"| {model} | {c['ece']:.4f} | {c['accuracy']:.4f} | {c['mean_confidence']:.4f} | {c['n']} |")
        parts.append("Calibration:\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def _model_config(path: str, like: ModelConfig) -> ModelConfig:
    return ModelConfig(path=path, dtype=like.dtype, trust_remote_code=like.trust_remote_code)


def _encode(ts: TestSet, tok: Any, cfg: Config) -> tuple[list[Encoded], int]:
    d = cfg.data
    items, stats = encode_examples(ts.examples, tok, d.template, d.max_prompt_len, d.max_len, require_response=False)
    return items, stats.skipped_long_prompt


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


class _Progress:
    def __init__(self, progress: Any, total: int) -> None:
        self.p = progress
        self.task = progress.add_task("eval", total=total) if progress is not None else None

    def step(self, desc: str) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=1, description=desc)

    def describe(self, desc: str) -> None:
        if self.p is not None:
            self.p.update(self.task, description=desc)


def _check(cfg: Config) -> None:
    e = cfg.eval
    if not e.models:
        raise UserError("eval.models: is empty; map display names to model paths, e.g. eval.models={student: runs/x/best}")
    if not e.test:
        raise UserError("eval.test: is empty; map test-set names to files, e.g. eval.test={dolly: data/dolly/test.jsonl}")
    if e.exposure_bias and cfg.teacher.path is None:
        raise UserError("eval.exposure_bias: needs teacher.path (the p of ExAccErr); set it or turn exposure_bias off")


def run_eval(cfg: Config, progress: Any = None) -> str:
    """Evaluate ``cfg.eval.models`` on ``cfg.eval.test`` over ``cfg.eval.seeds``; write
    results.json / .csv / .md under ``eval.out`` and return the Markdown comparison table."""
    _check(cfg)
    check_paths(cfg, "eval")
    e, g = cfg.eval, cfg.generation
    out = Path(e.out) if e.out else Path(cfg.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    test_sets = {name: load_test_set(path, e.formats.get(name, e.format), e.max_examples) for name, path in e.test.items()}
    choice_records = load_choice_records(e.calibration) if e.calibration else None
    judge: Judge | None = make_judge(e.judge, e.judge_api_key_env, cfg.train.device) if e.judge else None
    shown = list(e.metrics) + (["judge"] if judge is not None else [])

    results: dict[str, Any] = {
        "models": dict(e.models), "seeds": list(e.seeds), "metrics": shown,
        "test_sets": {n: {"path": e.test[n], "format": ts.format, "examples": len(ts.examples), "has_references": ts.has_references,
                          "with_references": sum(1 for ex in ts.examples if ex.references)}  # the examples Rouge-L / EM score
                      for n, ts in test_sets.items()},
        "skipped_long_prompt": {}, "per_seed": {}, "summary": {}, "valid_answers": {},
        "generation": {"temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens,
                       "no_repeat_ngram_size": g.no_repeat_ngram_size},
        "config": cfg.to_dict(),
    }
    if judge is not None:
        results["judge"] = {}

    teacher = teacher_tok = None
    if e.exposure_bias:
        teacher_tok = load_tokenizer(cfg.teacher, "teacher")
        teacher = load_model(cfg.teacher, "teacher", device, "teacher")
        results["exposure_by_protocol"] = {p: {} for p in e.exposure_protocols}
    if choice_records is not None:
        results["calibration"] = {}

    per_model = len(test_sets) * len(e.seeds) + int(e.exposure_bias) + int(choice_records is not None)
    bar = _Progress(progress, len(e.models) * per_model)
    teacher_draws = None
    for name, path in e.models.items():
        key = f"eval.models.{name}"
        mc = _model_config(path, cfg.student)
        bar.describe(f"eval {name}: loading")
        tok = load_tokenizer(mc, key)
        model = load_model(mc, key, device, "teacher")
        vocab = len(tok.get_vocab())
        results["per_seed"][name], results["summary"][name], results["skipped_long_prompt"][name] = {}, {}, {}
        for set_name, ts in test_sets.items():
            items, skipped = _encode(ts, tok, cfg)
            results["skipped_long_prompt"][name][set_name] = skipped
            if skipped:
                log.warning("%s on %s: skipped %d prompts over data.max_prompt_len=%d tokens", name, set_name, skipped, cfg.data.max_prompt_len)
            if not items:
                raise UserError(f"eval.test.{set_name}: every prompt is longer than data.max_prompt_len={cfg.data.max_prompt_len} tokens for {name}'s tokenizer")
            examples: list[Example] = [ts.examples[x.index] for x in items]
            lm_loss = None
            scored = [x for x, ex in zip(items, examples) if ex.references and x.response_ids]
            if "lm_loss" in e.metrics and scored:
                lm_loss, _ = response_loss(model, scored, tok.pad_token_id, vocab, e.batch_size)
            seeds_out: dict[str, dict[str, float | None]] = {}
            texts_by_seed: list[list[str]] = []
            for seed in e.seeds:
                bar.describe(f"eval {name} / {set_name} / seed {seed}")
                ids = generate(
                    model, [x.prompt_ids for x in items], [x.index for x in items], seed=seed, tokenizer=tok,
                    vocab_size=vocab, max_new_tokens=g.max_new_tokens, max_len=cfg.data.max_len, batch_size=e.batch_size,
                    temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, no_repeat_ngram_size=g.no_repeat_ngram_size,
                    engine=g.engine,
                )
                texts = [tok.decode(r, skip_special_tokens=True).strip() for r in ids]
                texts_by_seed.append(texts)
                refs = [ex.references for ex in examples]
                metrics = seed_metrics(texts, [len(r) for r in ids], refs, lm_loss, e.metrics)
                rows = [
                    {"index": x.index, "source": ex.source, "instruction": ex.instruction, "context": ex.context,
                     "references": ex.references, "response": t, "tokens": len(r), "seed": seed}
                    for x, ex, t, r in zip(items, examples, texts, ids)
                ]
                if judge is not None:
                    jr = judge_score(judge, [ex.instruction + (f"\n\n{ex.context}" if ex.context else "") for ex in examples], refs, texts)
                    metrics["judge"] = jr.score
                    results["judge"].setdefault(name, {}).setdefault(set_name, {})[str(seed)] = jr.to_dict()
                    for row, rating in zip(rows, jr.ratings):
                        row["judge"] = list(rating) if rating is not None else None
                _write_jsonl(out / "responses" / _safe_name(name) / _safe_name(set_name) / f"seed{seed}.jsonl", rows)
                seeds_out[str(seed)] = metrics
                bar.step(f"eval {name} / {set_name} / seed {seed}")
            results["per_seed"][name][set_name] = seeds_out
            results["summary"][name][set_name] = aggregate(seeds_out)
            answers = valid_answers([list(s) for s in zip(*texts_by_seed)], [ex.references for ex in examples])
            if answers is not None:
                results["valid_answers"].setdefault(name, {})[set_name] = answers

        if teacher is not None:
            bar.describe(f"eval {name}: exposure bias")
            curves, teacher_draws = _exposure(cfg, name, model, tok, teacher, teacher_tok, test_sets, teacher_draws, results)
            for protocol, curve in curves.items():
                results["exposure_by_protocol"][protocol][name] = curve
            results["exposure_bias"] = results["exposure_by_protocol"][e.exposure_protocols[0]]
            bar.step(f"eval {name}: exposure bias")
        if choice_records is not None:
            bar.describe(f"eval {name}: calibration")
            probs = choice_probabilities(model, tok, choice_records, template=cfg.data.template, vocab_size=vocab, batch_size=e.batch_size)
            results["calibration"][name] = calibration_report(probs, [r.answer for r in choice_records], e.calibration_bins)
            bar.step(f"eval {name}: calibration")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = markdown_table(results["summary"], list(test_sets), shown)
    extra = _extra_tables(results)
    text = table + (f"\n\n{extra}" if extra else "")
    write_text_atomic(out / "results.json", json.dumps(_json_clean(results), indent=2, ensure_ascii=False))
    _write_csv(out / "results.csv", results["summary"], list(test_sets), shown)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    log.info("eval: wrote %s", out / "results.json")
    return text


def _write_csv(path: Path, summary: dict[str, Any], sets: Sequence[str], metrics: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "dataset", "metric", "mean", "std", "n"])
        for model, by_set in summary.items():
            for s in sets:
                for m in metrics:
                    cell = by_set.get(s, {}).get(m)
                    w.writerow([model, s, m, *(("", "", 0) if cell is None else (cell["mean"], cell["std"], cell["n"]))])


def _exposure(
    cfg: Config, name: str, model: Any, tok: Any, teacher: Any, teacher_tok: Any, test_sets: dict[str, TestSet],
    teacher_draws: Any, results: dict[str, Any],
) -> tuple[dict[str, dict[str, Any]], Any]:
    """ExAccErr of one model against the teacher on the exposure test set's first prompts, per protocol."""
    e = cfg.eval
    try:
        vocab = check_same_vocabulary(tok, teacher_tok)
    except UserError as err:
        raise UserError(f"eval.models.{name}: cannot measure exposure bias against teacher.path: {err}") from None
    set_name = e.exposure_test or next(iter(test_sets))
    items, _ = _encode(test_sets[set_name], teacher_tok, cfg)
    prompts = [x.prompt_ids for x in items[: e.exposure_max_prompts]]
    if not prompts:
        raise UserError(f"eval.exposure_test: {set_name} has no prompt within data.max_prompt_len")
    length = min(e.exposure_max_len or cfg.generation.max_new_tokens, cfg.data.max_len - max(len(p) for p in prompts))
    if length < 1:
        raise UserError(f"eval.exposure_max_len: no room to generate: data.max_len={cfg.data.max_len} is filled by the prompts")
    # draws to EOS stop at either model's stop tokens; fixed-length draws only count them
    stops = sorted(set(stop_token_ids(teacher_tok, teacher, vocab)) | set(stop_token_ids(tok, model, vocab)))
    if not stops and any(p != "fixed_length" for p in e.exposure_protocols):
        raise UserError(f"eval.exposure_protocols: {name} and the teacher have no end-of-sequence token; use [fixed_length]")
    seed = e.seeds[0]
    curves, teacher_draws = exposure_curves(
        model, teacher, prompts, protocols=e.exposure_protocols, samples=e.exposure_samples, seed=seed,
        max_new_tokens=length, pad_id=teacher_tok.pad_token_id, vocab_size=vocab, batch_size=e.batch_size,
        stop_ids=stops, teacher_samples=teacher_draws, engine=cfg.generation.engine, min_at_risk=e.exposure_min_at_risk,
    )
    results["exposure_settings"] = {"teacher": cfg.teacher.path, "test_set": set_name, "prompts": len(prompts),
                                    "samples": e.exposure_samples, "max_new_tokens": length,
                                    "protocols": list(e.exposure_protocols), "min_at_risk": e.exposure_min_at_risk,
                                    "seed": seed}
    return {p: c.to_dict() for p, c in curves.items()}, teacher_draws
