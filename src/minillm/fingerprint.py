"""The run fingerprint: what a resumed run must share with the run that wrote its checkpoints.

``output_dir/run_fingerprint.json`` holds the comparable config (every key that changes results,
paths resolved to absolute, normalised form) and a stamp of each data file (``data.train``,
``data.valid``, ``data.pretrain``: size and modification time, and with ``data.fingerprint: hash``
a SHA-256 of the contents). ``output_dir/config.hash`` is its digest. Not part of it: run length,
logging, tracking, the layout over ranks, and where the output folder is (a trailing slash, an
absolute spelling or a moved folder is the same run).

At resume :func:`check_resume` compares the stored fingerprint with this run's and refuses in one
line naming the keys that differ or the data file that changed. A folder from before the
fingerprint (only ``config.hash``) is compared by that hash; an unreadable or empty ``config.hash``
(a write cut short by a kill) is rewritten with a warning rather than bricking the folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from minillm.atomic import write_text_atomic
from minillm.config import Config, flat_keys

log = logging.getLogger("minillm")

FORMAT = "minillm-fingerprint-1"
FINGERPRINT_FILE = "run_fingerprint.json"
HASH_FILE = "config.hash"
DATA_KEYS = ("train", "valid", "pretrain")
# config keys that hold a local path (when the path exists; otherwise a Hub id, kept as given)
_PATH_KEYS = ("path", "tokenizer", "adapter")


def _resolve(value: Any) -> Any:
    """An existing local path as an absolute, normalised string; anything else unchanged."""
    if not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def _neutral(cfg: Config) -> dict[str, Any]:
    """``cfg`` as a dict with the keys a resume may change set to fixed values."""
    c = copy.deepcopy(cfg)
    c.train.max_steps = c.train.eval_every = c.train.save_every = c.train.keep_last = 0
    c.train.progress = c.train.resume = True
    c.train.epochs = None
    # where the work runs is not what it computes: a run may resume on other ranks, another layout,
    # or from a run folder copied or mounted elsewhere
    c.output_dir = ""
    c.train.parallel, c.train.teacher_sharding, c.train.activation_checkpointing, c.train.dist_timeout_s = "ddp", "auto", False, 1.0
    c.train.report_to, c.train.log_every, c.train.wandb_project, c.train.wandb_mode = [], 0, "", ""  # tracking only
    d = c.to_dict()
    d["data"].pop("fingerprint", None)  # how data files are stamped, not what they hold (and new in 0.3)
    return d


def comparable_config(cfg: Config) -> dict[str, Any]:
    """The config keys that change results, with local paths resolved (see the module doc)."""
    d = _neutral(cfg)
    for section in ("student", "teacher"):
        for k in _PATH_KEYS:
            d[section][k] = _resolve(d[section][k])
    for k in DATA_KEYS:
        d["data"][k] = _resolve(d["data"][k])
    d["eval"]["calibration"] = _resolve(d["eval"]["calibration"])
    d["eval"]["out"] = None  # an evaluation's output folder is not part of training
    for k in ("test", "models"):
        d["eval"][k] = {name: _resolve(v) for name, v in d["eval"][k].items()}
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def data_stamp(source: str, mode: str) -> dict[str, Any]:
    """Size and mtime (and in ``hash`` mode the SHA-256) of a data file, or of every file in a saved
    dataset folder; a Hub dataset id gets no stamp (its revision is the Hub's business)."""
    p = Path(source).expanduser()
    if not p.exists():
        return {"source": source}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    stamp: dict[str, Any] = {"source": str(p.resolve()), "size": 0, "mtime_ns": 0}
    digest = hashlib.sha256() if mode == "hash" else None
    for f in files:
        st = f.stat()
        stamp["size"] += st.st_size
        stamp["mtime_ns"] = max(stamp["mtime_ns"], st.st_mtime_ns)
        if digest is not None:
            digest.update(f"{f.relative_to(p) if f != p else ''}\0{_sha256(f)}\0".encode())
    if digest is not None:
        stamp["sha256"] = digest.hexdigest()
    return stamp


def run_fingerprint(cfg: Config) -> dict[str, Any]:
    """This run's fingerprint: the comparable config, the data stamps and their digest."""
    config = comparable_config(cfg)
    data = {f"data.{k}": data_stamp(v, cfg.data.fingerprint) for k in DATA_KEYS if (v := getattr(cfg.data, k))}
    digest = hashlib.sha256(json.dumps({"config": config, "data": data}, sort_keys=True).encode()).hexdigest()[:16]
    return {"format": FORMAT, "hash": digest, "config": config, "data": data}


# keys added after run folders carried only config.hash: such a folder was written without them
_NEW_SINCE_LEGACY = {"train": ("max_bad_steps", "loss_jump", "length_collapse", "distinct_collapse"),
                     "eval": ("exposure_protocols", "exposure_min_at_risk")}


def legacy_hash(cfg: Config) -> str:
    """The ``config.hash`` of a run folder written before the fingerprint (paths as spelled), as
    that code computed it: keys it did not have yet are left out."""
    d = _neutral(cfg)
    d["eval"]["exposure_stop_at_eos"] = cfg.eval.exposure_protocols[0] == "to_eos"  # the key the protocols replaced
    for section, keys in _NEW_SINCE_LEGACY.items():
        for k in keys:
            d[section].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (a key only one side has too)."""
    a, b = flat_keys(old), flat_keys(new)
    missing = object()
    return [f"{k}: {_short(a.get(k, missing))} -> {_short(b.get(k, missing))}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _short(v: Any) -> str:
    text = "(absent)" if not isinstance(v, (type(None), bool, int, float, str, list, dict)) else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def data_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """A line per data file whose stamp differs (only the fields both stamps have are compared)."""
    changes = []
    for key, now in new.items():
        was = old.get(key)
        if not isinstance(was, dict) or was.get("source") != now.get("source"):
            continue  # a different path is a config difference, reported as such
        for field, what in (("size", "its size"), ("sha256", "its contents"), ("mtime_ns", "its modification time")):
            if field in was and field in now and was[field] != now[field]:
                detail = f" ({was[field]} -> {now[field]} bytes)" if field == "size" else ""
                changes.append(f"{key}: {now['source']} changed since this run started: {what} differs{detail}")
                break
    return changes


def _read_fingerprint(out: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((out / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("config"), dict)
    return doc if ok and isinstance(doc.get("data"), dict) else None


def check_resume(out: Path, cfg: Config, now: dict[str, Any]) -> None:
    """Refuse (one :class:`UserError` line) to resume in ``out`` a run whose fingerprint differs
    from ``now``; warn and go on when the stored fingerprint cannot be read."""
    from minillm.errors import UserError

    how = "pick another output_dir, or pass train.resume=false to start over there (it deletes the checkpoints)"
    stored = _read_fingerprint(out)
    if stored is not None:
        diff = config_diff(stored["config"], now["config"])
        if diff:
            shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
            raise UserError(f"{out}: holds checkpoints of a run with a different config ({shown}); {how}")
        changes = data_changes(stored["data"], now["data"])
        if changes:
            raise UserError(f"{changes[0]}; restore the file the run was started with, or {how}")
        return
    try:
        old = (out / HASH_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        old = ""
    if len(old) != 16 or any(ch not in "0123456789abcdef" for ch in old):
        log.warning("%s: unreadable or empty (a write cut short?); taking this config as the run's and rewriting it",
                    out / HASH_FILE)
        return
    if old == now["hash"]:
        return
    if old == legacy_hash(cfg):
        log.info("%s: a run folder from before the run fingerprint; its config matches, adding %s", out, FINGERPRINT_FILE)
        return
    raise UserError(f"{out}: holds checkpoints of a run with a different config (an older run folder: it stores only "
                    f"a digest, so the keys that differ cannot be named; compare {out / 'config.yaml'}); {how}")


def write_fingerprint(out: Path, fp: dict[str, Any]) -> None:
    """``run_fingerprint.json`` then ``config.hash``, each written atomically."""
    write_text_atomic(out / FINGERPRINT_FILE, json.dumps(fp, indent=1, sort_keys=True) + "\n")
    write_text_atomic(out / HASH_FILE, fp["hash"] + "\n")
