"""Benchmark: peak memory of the reverse KL, forward + backward, at a large vocabulary (CPU, fp32).

Shapes: V = 152,064 (Qwen2.5's padded vocabulary), B = 2, T = 512, hidden size d = 896
(Qwen2.5-0.5B). Each variant runs in a fresh process; the figure is the peak resident memory above
what the process held once its inputs existed (``ru_maxrss``), so it counts every temporary the
loss and its backward create, including the gradients of the inputs.

Two settings:

* ``logits``: inputs are the student's logits (requiring grad) and the teacher's logits, as in
  issue 11's figures: ``plain`` (full log-softmax tensors), ``per_token``
  (:func:`minillm.losses.per_token`, checkpointed chunks) and ``fused-logits``
  (:func:`minillm.fused.head_terms` on logits);
* ``head``: inputs are the student's last hidden states and output layer (both requiring grad)
  and the teacher's logits; the logits are made from them: ``plain`` and ``per_token`` build
  ``h @ W.T`` first, ``fused`` never builds them (chunks recomputed in backward), and
  ``fused-both`` takes the teacher as hidden states + head too, so no ``(B, T, V)`` tensor exists.

    PYTHONPATH=src python benchmarks/bench_loss_memory.py

Prints a table and writes ``loss_memory.json`` to $OUT when set.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

V, B, T, D = 152_064, 2, 512, 896
VARIANTS = [("logits", "plain"), ("logits", "per_token"), ("logits", "fused-logits"),
            ("head", "plain"), ("head", "per_token"), ("head", "fused"), ("head", "fused-both")]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB -> GB


def worker(setting: str, variant: str) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from minillm.fused import Head, head_terms
    from minillm.losses import per_token

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    t_h = t_w = t_logits = None
    if variant == "fused-both":
        t_h, t_w = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) * 0.05
    else:
        t_logits = torch.randn(B, T, V, generator=g)
    if setting == "logits":
        x = torch.randn(B, T, V, generator=g).requires_grad_(True)
        w = None
    else:
        x = torch.randn(B, T, D, generator=g).requires_grad_(True)
        w = (torch.randn(V, D, generator=g) * 0.05).requires_grad_(True)
    base = _rss_gb()
    t0 = time.perf_counter()
    if variant in ("plain", "per_token"):
        logits = x if w is None else x @ w.T
        if variant == "plain":
            logq, logp = F.log_softmax(logits, -1), F.log_softmax(t_logits, -1)
            kl = (logq.exp() * (logq - logp)).sum(-1)
        else:
            kl = per_token("reverse_kl", logits, t_logits)
    elif variant == "fused-logits":
        kl = head_terms(x, None, divergence="reverse_kl", teacher_BTD=t_logits)["divergence"]
    elif variant == "fused":
        kl = head_terms(x, Head(w, None, V), divergence="reverse_kl", teacher_BTD=t_logits)["divergence"]
    else:
        kl = head_terms(x, Head(w, None, V), divergence="reverse_kl", teacher_BTD=t_h, teacher_head=Head(t_w, None, V))["divergence"]
    kl.sum().backward()
    dt = time.perf_counter() - t0
    return {"peak_above_inputs_GB": round(_rss_gb() - base, 3), "seconds": round(dt, 2)}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3])))
        return
    results = []
    for setting, variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--worker", setting, variant], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append({"setting": setting, "variant": variant, **res})
        print(setting, variant, res, flush=True)
    logits_gb = B * T * V * 4 / 1e9
    print(f"\nreverse KL forward + backward, V = {V:,}, B = {B}, T = {T}, d = {D}, fp32, CPU "
          f"(one (B, T, V) float32 tensor = {logits_gb:.2f} GB; the head's weight gradient = {V * D * 4 / 1e9:.2f} GB)\n")
    print("| inputs | variant | peak above inputs (GB) | vs plain | time (s) |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        plain = next(x for x in results if x["setting"] == r["setting"] and x["variant"] == "plain")
        ratio = r["peak_above_inputs_GB"] / plain["peak_above_inputs_GB"]
        print(f"| {r['setting']} | {r['variant']} | {r['peak_above_inputs_GB']:.2f} | {ratio:.2f}x | {r['seconds']:.1f} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "loss_memory.json"), "w") as fh:
            json.dump({"V": V, "B": B, "T": T, "d": D, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
