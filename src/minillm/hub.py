"""Is a name that is not on disk a Hugging Face Hub repo we can use? Decided once, up front.

transformers and datasets treat any missing local path as a Hub id and retry the network for
tens of seconds before giving up (49 s measured here, with each warning printed twice). The checks
here settle the question before anything loads: a name that cannot be a repo id is a missing
local path; with ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) set it
must already be in the local Hub cache; otherwise one request to the Hub, without retries, says
whether the repo exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from minillm.errors import UserError

_TRUE = {"1", "on", "yes", "true"}
PROBE_TIMEOUT_S = 10.0


def offline(repo_type: str = "model") -> str | None:
    """The environment variable that forbids Hub requests, or None (read at call time, not at import)."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE" if repo_type == "model" else "HF_DATASETS_OFFLINE"]
    return next((n for n in names if os.environ.get(n, "").strip().lower() in _TRUE), None)


def could_be_repo_id(name: str) -> bool:
    """``org/name`` or ``name`` in the Hub's id alphabet; never a path that starts with / . ~."""
    if not name or name[0] in "/.~" or "\\" in name or name.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def in_cache(repo_id: str, repo_type: str) -> bool:
    """Whether a snapshot of ``repo_id`` sits in the local Hub cache (any revision)."""
    from huggingface_hub import constants

    folder = f"{repo_type}s--" + repo_id.replace("/", "--")
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    return (Path(cache) / folder / "snapshots").is_dir()


def probe(repo_id: str, repo_type: str, revision: str | None) -> str | None:
    """One GET of the Hub API (no retries): None when the repo (and revision) exists, else why it
    cannot be used. Plain urllib, so it behaves the same under every huggingface_hub version."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    url = f"{endpoint}/api/{repo_type}s/{repo_id}"
    if revision is not None:
        url += f"/revision/{urllib.parse.quote(revision, safe='')}"
    headers = {}
    try:
        from huggingface_hub import get_token

        if token := get_token():
            headers["Authorization"] = f"Bearer {token}"
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as e:
        code = e.headers.get("X-Error-Code", "")
        if code == "GatedRepo":  # it exists; loading it needs an accepted licence and a token
            return None
        if code == "RevisionNotFound":
            return f"the Hub {repo_type} {repo_id!r} has no revision {revision!r}"
        if code == "RepoNotFound" or e.code in (401, 404):
            return f"the Hub has no {repo_type} {repo_id!r} (or it is private: log in with `hf auth login`)"
        return f"{endpoint} answered HTTP {e.code}"
    except (OSError, ValueError) as e:  # URLError, timeouts, refused or reset connections, a malformed HF_ENDPOINT
        reason = getattr(e, "reason", e)
        return f"could not reach {endpoint}: {str(reason).strip() or type(e).__name__}"


def check_hub_id(name: str, where: str, repo_type: str = "model", revision: str | None = None, missing: str = "no such folder") -> None:
    """Refuse ``name`` (not found on disk) unless it is a Hub repo that can be used now.

    ``where`` names the config key; ``missing`` says what was not found on disk."""
    if not could_be_repo_id(name):
        raise UserError(f"{where}: {name}: {missing}")
    if in_cache(name, repo_type):
        return
    if (var := offline(repo_type)) is not None:
        reason = f"{var} is set and it is not in the local Hub cache"
    else:
        reason = probe(name, repo_type, revision)
        if reason is None:
            return
    raise UserError(f"{where}: {name}: {missing}, and not a Hub id that could be reached ({reason})")
