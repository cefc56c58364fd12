"""``minillm generate``: sample responses to the training prompts (SeqKD data), resumable.

The prompts are exactly those a training run on the same config would use: ``data.train`` minus
the held-out validation part, rendered with ``data.template``, prompts over ``data.max_prompt_len``
tokens skipped, ``data.max_examples`` applied. Each prompt gets ``samples`` responses; response
``k`` of example ``i`` is drawn with the row seed ``row_seeds(seed, [i], salt=k)`` and cut to
min(generation.max_new_tokens, data.max_len - prompt length), so a record never depends on the
batch size or on which prompts shared its batch.

Output: JSONL, one record per (prompt, sample) in prompt-major order, with the fields the normal
readers load (``instruction``, ``context``, ``response``; ``messages`` for chat data) plus
``sample``, ``seed``, ``index`` (position among the training prompts), ``source`` (file:line) and
``finished`` (the response ended with a stop token rather than at the length cap). A sidecar
``<out>.meta.json`` records the settings; a rerun with the same settings continues after the last
complete line (a half-written last line is dropped and redone), a rerun with other settings is
refused. Records are written and flushed batch by batch, so a crash loses at most one batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm.config import Config
from minillm.data import Example, split_examples
from minillm.data.instruct import encode_examples
from minillm.decoding import row_seeds, sample, stop_token_ids
from minillm.errors import UserError
from minillm.models import autocast_dtype, load_model, load_tokenizer, resolve_device
from minillm.preflight import check_paths

log = logging.getLogger("minillm")

META_SUFFIX = ".meta.json"
WHICH = ("teacher", "student")


@dataclass
class Job:
    """One output record to produce: sample ``k`` of training prompt ``index``."""

    example: Example
    prompt_ids: list[int]
    index: int
    k: int
    seed: int


def meta_path(path: str | Path) -> Path:
    """The sidecar that holds the settings a generated file was written with."""
    p = Path(path)
    return p.with_name(p.name + META_SUFFIX)


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The settings ``minillm generate`` stored beside ``path``, or None when it has none."""
    m = meta_path(path)
    if not m.is_file():
        return None
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def plan_jobs(cfg: Config, tokenizer: Any, samples: int) -> list[Job]:
    """Every record to write, in output order: the training prompts x ``samples``, with row seeds."""
    d = cfg.data
    train_ex, _ = split_examples(cfg)
    encoded, stats = encode_examples(
        train_ex, tokenizer, template=d.template, max_prompt_len=d.max_prompt_len, max_len=d.max_len, require_response=False
    )
    if d.max_examples is not None:
        encoded = encoded[: d.max_examples]
    if stats.skipped_long_prompt:
        log.info("generate: skipped %d prompts over data.max_prompt_len=%d tokens", stats.skipped_long_prompt, d.max_prompt_len)
    if not encoded:
        raise UserError(f"data.train: no prompt of {d.train} fits data.max_prompt_len={d.max_prompt_len} tokens")
    keys = [e.index for e in encoded]
    seeds_k = [row_seeds(cfg.seed, keys, salt=k).tolist() for k in range(samples)]
    return [
        Job(train_ex[e.index], e.prompt_ids, e.index, k, int(seeds_k[k][j]))
        for j, e in enumerate(encoded)
        for k in range(samples)
    ]


def settings(cfg: Config, which: str, samples: int, total: int) -> dict[str, Any]:
    """What the output depends on; a resumed file must have been written with the same."""
    m = cfg.teacher if which == "teacher" else cfg.student
    d = cfg.data
    return {
        "which": which, "model": m.path, "revision": m.revision, "seed": cfg.seed, "samples": samples, "records": total,
        # the engine is left out: every engine draws the same tokens for the same seeds
        "generation": {k: v for k, v in dataclasses.asdict(cfg.generation).items() if k != "engine"},
        "data": {k: getattr(d, k) for k in ("train", "split", "valid", "valid_split", "valid_size", "columns", "template",
                                            "max_prompt_len", "max_len", "max_examples")},
    }


def resume_point(path: Path, meta: dict[str, Any], jobs: list[Job]) -> int:
    """The number of complete records already in ``path`` (0 when it does not exist).

    A last line without its newline is a write cut short: it is truncated away and redone. The
    file must come with settings equal to ``meta`` and its last record must be the planned one.
    """
    if not path.exists():
        return 0
    old = read_meta(path)
    if old is None:
        raise UserError(f"{path}: exists but has no {meta_path(path).name} from `minillm generate`; delete it or pick another --out")
    changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
    if changed:
        raise UserError(
            f"{path}: was written with other settings ({', '.join(changed)} differ); delete it to start over, or pick another --out"
        )
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        log.info("generate: %s ends in a half-written record; rewriting it", path)
        with path.open("r+b") as fh:
            fh.truncate(end)
    n = 0
    last: Any = None
    for lineno, line in enumerate(raw[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            last = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{lineno}: not valid JSON; delete the file to start over") from None
        n += 1
    if n > len(jobs):
        raise UserError(f"{path}: holds {n} records but the settings plan {len(jobs)}; delete it to start over")
    if n:
        want = jobs[n - 1]
        if not isinstance(last, dict) or (last.get("index"), last.get("sample"), last.get("seed")) != (want.index, want.k, want.seed):
            raise UserError(f"{path}: record {n} is not the planned one (index {want.index}, sample {want.k}); delete it to start over")
    return n


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    m = meta_path(path)
    tmp = m.with_name(m.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, m)


def record(job: Job, response: str, finished: bool) -> dict[str, Any]:
    """One JSONL record the instruction readers load as a (prompt, response) example."""
    ex = job.example
    rec: dict[str, Any] = {"instruction": ex.instruction, "context": ex.context, "response": response}
    if ex.messages is not None:  # chat data: keep the turns; the reader takes the last assistant turn as the response
        rec["messages"] = [*ex.messages, {"role": "assistant", "content": response}]
    rec.update(sample=job.k, seed=job.seed, index=job.index, source=ex.source, finished=finished)
    return rec


def sample_batch(
    model: Any, tokenizer: Any, jobs: list[Job], cfg: Config, vocab_size: int, stop_ids: list[int], autocast: torch.dtype | None
) -> list[dict[str, Any]]:
    """Sample one response per job -> records, in the order of ``jobs``."""
    g, d = cfg.generation, cfg.data
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].prompt_ids))  # similar lengths share padding
    batch = [jobs[i] for i in order]
    caps = [min(g.max_new_tokens, d.max_len - len(j.prompt_ids)) for j in batch]
    r = sample(
        model, [j.prompt_ids for j in batch], torch.tensor([j.seed for j in batch], dtype=torch.int64),
        max_new_tokens=max(caps), stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, vocab_size=vocab_size,
        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, no_repeat_ngram_size=g.no_repeat_ngram_size,
        autocast=autocast, engine=g.engine,
    )
    stops = set(stop_ids)
    out: list[dict[str, Any] | None] = [None] * len(jobs)
    for b, i in enumerate(order):
        ids = r.response_ids[b, : min(int(r.response_mask[b].sum()), caps[b])].tolist()
        finished = bool(ids) and ids[-1] in stops
        if finished:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        out[i] = record(jobs[i], text, finished)
    return [rec for rec in out if rec is not None]


def run_generate(cfg: Config, out: str | Path | None = None, samples: int = 1, which: str = "teacher", progress: Any = None) -> Path:
    """Write ``samples`` responses per training prompt from the ``which`` model; return the JSONL path."""
    if samples < 1:
        raise UserError(f"--samples: must be at least 1, got {samples}")
    if which not in WHICH:
        raise UserError(f"--model: must be one of {WHICH}, got {which!r}")
    mcfg = cfg.teacher if which == "teacher" else cfg.student
    if mcfg.path is None:
        raise UserError(f"{which}.path: is required by `minillm generate --model {which}`")
    if cfg.data.train is None:
        raise UserError("data.train: is required: the prompts to answer")
    check_paths(cfg, "generate", which)
    path = Path(out) if out is not None else Path(cfg.output_dir) / "generated.jsonl"
    if path.is_dir():
        raise UserError(f"--out: {path} is a folder; give a .jsonl file path")
    tokenizer = load_tokenizer(mcfg, which)
    jobs = plan_jobs(cfg, tokenizer, samples)
    meta = settings(cfg, which, samples, len(jobs))
    done = resume_point(path, meta, jobs)
    task = progress.add_task(f"generate ({which})", total=len(jobs), completed=done) if progress is not None else None
    if done == len(jobs):
        log.info("generate: %s already holds all %d records", path, done)
        return path
    if done:
        log.info("generate: resuming %s after %d of %d records", path, done, len(jobs))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_meta(path, meta)

    device = resolve_device(cfg.train.device)
    model = load_model(mcfg, which, device, which)
    model.eval()
    vocab_size = len(tokenizer.get_vocab())
    if model.get_output_embeddings().weight.shape[0] < vocab_size:
        raise UserError(f"{which}.path: the model's output layer has fewer rows than the tokenizer has tokens")
    stop_ids = stop_token_ids(tokenizer, model, vocab_size)
    # a trained student runs under autocast on GPU as in training; the teacher in its loaded dtype
    autocast = autocast_dtype(cfg.train.dtype, device) if which == "student" else None
    bs = cfg.train.eval_batch_size
    with path.open("a", encoding="utf-8") as fh:
        for start in range(done, len(jobs), bs):
            chunk = jobs[start : start + bs]
            recs = sample_batch(model, tokenizer, chunk, cfg, vocab_size, stop_ids, autocast)
            fh.write("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in recs))
            fh.flush()
            os.fsync(fh.fileno())
            if task is not None:
                progress.advance(task, len(chunk))
    log.info("generate: wrote %d records to %s", len(jobs), path)
    return path
