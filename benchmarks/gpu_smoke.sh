#!/usr/bin/env bash
# End-to-end smoke on a CUDA device: the quick demo (every method, graph-engine rollouts and
# generation, evaluation with exposure bias, the report) and an on-policy KD run.
set -euo pipefail
work=${WORK:-/tmp/minillm-gpu-smoke}
rm -rf "$work"
python3 -m minillm demo --quick --device "${DEVICE:-cuda}" --out "$work/demo"
python3 -m minillm train "$work/demo/runs/kd/config.yaml" kd.onpolicy_fraction=0.5 train.max_steps=10 \
    train.resume=false output_dir="$work/kd-onpolicy"
tail -n 2 "$work/kd-onpolicy/metrics.jsonl"
if [[ -n "${OUT:-}" ]]; then
    cp "$work/demo/eval/results.md" "$work/demo/timings.json" "$OUT/" 
    cp "$work/demo/report/report.html" "$OUT/"
fi
