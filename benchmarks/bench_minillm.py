"""Benchmark: one MiniLLM rollout + score + optimizer step at the anchors' shapes.

Shapes follow ../shared/anchors (H200, bf16): GPT-2 XL teacher (1.56B) and GPT-2 base student
(124M), random init from configs (no download), 32 prompts x 128 tokens, 256 new tokens, vocab 50257.
Measures, with CUDA events / synchronised clocks, median of repeats after a warm-up:

* ``rollout_mixed_s``: our paired decode, teacher-mixed sampling (alpha 0.2), both KV caches;
* ``rollout_student_s``: the same decode without a teacher (alpha 0);
* ``score_s``: teacher-forced forward of both models over the 32 x 384 sequences;
* ``train_step_s``: MiniLLM loss (clipped PG + single-step reverse KL) forward + backward + AdamW
  step over the 32 rollouts as 4 micro-batches of 8 (student fp32 master weights, bf16 autocast);
* ``loss_peak_GB``: peak memory of that step above the models and optimizer state.

SIZE=tiny runs the same code on CPU with tiny shapes (a dry run). Results print as JSON and go to
$OUT/bench.json when OUT is set.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minillm.decoding import response_logits, row_seeds, sample, sequence_batch
from minillm.losses import clipped_pg, future_returns, per_token, token_logprobs

SIZE = os.environ.get("SIZE", "gpu")
dev = torch.device("cuda" if torch.cuda.is_available() and SIZE != "tiny" else "cpu")
if SIZE == "tiny":
    T_CFG, S_CFG = dict(n_layer=2, n_embd=64, n_head=2), dict(n_layer=1, n_embd=32, n_head=2)
    B, P, G, V, MICRO, REPS = 4, 8, 8, 512, 2, 2
else:
    T_CFG, S_CFG = dict(n_layer=48, n_embd=1600, n_head=25), dict(n_layer=12, n_embd=768, n_head=12)
    B, P, G, V, MICRO, REPS = 32, 128, 256, 50257, 8, 3
teacher_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
autocast = torch.bfloat16 if dev.type == "cuda" else None


def make(cfg: dict, seed: int, dtype: torch.dtype) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    with torch.device(dev):  # initialise on the device: a 1.5B model builds in seconds there
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=1024, **cfg)).to(dtype)


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = REPS) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts), 4)


def main() -> None:
    teacher = make(T_CFG, 0, teacher_dtype).eval().requires_grad_(False)
    student = make(S_CFG, 1, torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (B, P), generator=g).tolist()
    seeds = row_seeds(10, range(B))
    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                 "B": B, "prompt_len": P, "gen_len": G, "vocab": V}
    kw = dict(max_new_tokens=G, stop_ids=[], pad_id=0, vocab_size=V, autocast=autocast)
    student.eval()
    eager = dict(kw, engine="eager")
    fast = dict(kw, engine="static")
    res["rollout_mixed_eager_s"] = timed(lambda: sample(student, prompts, seeds, teacher=teacher, alpha=0.2, **eager), reps=1)
    res["rollout_student_eager_s"] = timed(lambda: sample(student, prompts, seeds, **eager), reps=1)
    res["rollout_mixed_static_s"] = timed(lambda: sample(student, prompts, seeds, teacher=teacher, alpha=0.2, **fast))
    res["rollout_student_static_s"] = timed(lambda: sample(student, prompts, seeds, **fast))
    r = sample(student, prompts, seeds, teacher=teacher, alpha=0.2, **fast)
    r_eager = sample(student, prompts, seeds, teacher=teacher, alpha=0.2, **eager)
    same = (r.response_ids == r_eager.response_ids).float()
    res["static_vs_eager_token_agreement"] = round(float(same.mean()), 4)
    # rows agree up to their first differing token (after it the contexts differ)
    first_diff = [(row == 0).nonzero()[0].item() if (row == 0).any() else G for row in same]
    res["static_vs_eager_mean_prefix_agreement"] = round(sum(first_diff) / (B * G), 4)
    res["static_vs_eager_max_logq_diff_step0"] = round(float((r.logq[:, 0] - r_eager.logq[:, 0]).abs().max()), 5)
    seq = sequence_batch(r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    seq = {k: v.to(dev) for k, v in seq.items()}
    ids, mask = r.response_ids.to(dev), r.response_mask.to(dev)

    def fwd(model, rows=slice(None)):
        ctx = torch.autocast("cuda", dtype=autocast) if autocast and model is student else torch.autocast("cpu", enabled=False)
        with ctx:
            out = model(input_ids=seq["input_ids"][rows], attention_mask=seq["attention_mask"][rows],
                        position_ids=seq["position_ids"][rows], use_cache=False, logits_to_keep=ids.shape[1] + 1)
        return response_logits(out.logits, 1, ids.shape[1])  # response positions only (MiniLLM._response_outputs goes further: hidden states, packed rows)

    @torch.no_grad()
    def score():
        return token_logprobs(fwd(student), ids), token_logprobs(fwd(teacher), ids)

    res["score_s"] = timed(score)
    logq_old, logp = score()
    adv = future_returns((logp - logq_old) * mask, mask)
    logmix = r.logmix.to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    student.train(False)

    def step():
        n = mask.sum()
        for s in range(0, B, MICRO):
            rows = slice(s, s + MICRO)
            sl = fwd(student, rows)
            with torch.no_grad():
                tl = fwd(teacher, rows)
            logq = token_logprobs(sl, ids[rows])
            w = torch.exp(logq_old[rows] - logmix[rows]) * mask[rows]
            pg, _ = clipped_pg(logq, logq_old[rows], w, adv[rows], 0.2)
            kl = per_token("reverse_kl", sl, tl) * w
            ((pg + kl) * mask[rows]).sum().div(n).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state before measuring memory
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    res["train_step_s"] = timed(step)
    if dev.type == "cuda":
        res["loss_peak_GB"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 2)
        res["logits_BTV_GB_fp32_per_micro"] = round(MICRO * G * V * 4 / 1e9, 2)
    res["minillm_step_total_static_s"] = round(res["rollout_mixed_static_s"] + res["score_s"] + res["train_step_s"], 3)
    res["minillm_step_total_eager_s"] = round(res["rollout_mixed_eager_s"] + res["score_s"] + res["train_step_s"], 3)
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench.json"), "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
