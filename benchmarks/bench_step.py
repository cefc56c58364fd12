"""Benchmark: one MiniLLM training step, side by side with TRL and a plain reference-style loop.

Three systems do the same work at the same shapes, each as a user runs it (a fresh process, models
loaded from disk, ``steps`` optimizer steps):

* **minillm**: ``python -m minillm train`` with ``method: minillm``, a = 0, one PPO epoch, no
  L_PT; per-phase times from its ``metrics.jsonl`` (rollout, score, update = step - rollout - score);
* **TRL**: TRL's ``DistillationTrainer`` (beta = 1: reverse KL, fully on-policy, its defaults
  otherwise) through a *separate* interpreter (``--trl-python`` or ``$TRL_PYTHON``, a virtual
  environment with ``trl``; never a project dependency). Without one the column is skipped with a
  message. Its generation time is measured around the student's ``generate``;
* **plain**: a reference-style loop (HF ``generate``, teacher-forced forwards of both models with
  full log-softmax tensors, the policy-gradient + single-step loss with the teacher run again in
  the update, AdamW).

Configurations: ``cpu`` (the issue's world: random GPT-2 pair, teacher 4 x 256, student 2 x 128,
vocabulary 8,192, 8 prompts x 32 tokens per step, 32 new tokens, 100 steps), ``gpu`` (the shapes of
``../shared/anchors``: GPT-2 XL teacher, GPT-2 base student, 32 x 128 prompts, 256 new tokens,
vocabulary 50,257, bf16) and ``tiny`` (a seconds-long dry run). Every system stops a response at EOS
(random models rarely sample it); the table prints the mean response length each one produced.

    PYTHONPATH=src python benchmarks/bench_step.py --config cpu --trl-python /work/venvs/trl/bin/python

Prints one table (median seconds per step after the first ``--warmup`` steps, whole-process wall
time, ratios against minillm) and writes ``bench_step.json`` to ``--out`` (default: $OUT or a temp
folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "cpu": dict(teacher=(4, 256, 4), student=(2, 128, 2), vocab=8192, B=8, P=32, G=32, steps=100, dtype="float32"),
    "gpu": dict(teacher=(48, 1600, 25), student=(12, 768, 12), vocab=50257, B=32, P=128, G=256, steps=20, dtype="bfloat16"),
    "tiny": dict(teacher=(2, 64, 2), student=(1, 32, 2), vocab=512, B=4, P=8, G=8, steps=6, dtype="float32"),
}
LR = 1e-5
SEED = 10


# --- the world: tokenizer, models and prompts on disk -------------------------------------------------


def build_world(cfg: dict[str, Any], root: Path) -> Path:
    """A word tokenizer of exactly ``vocab`` ids, a random GPT-2 teacher / student pair and
    ``steps x B`` distinct prompts of ``P`` tokens (raw template), written under ``root``."""
    import torch

    from minillm.tiny import SPECIALS, build_word_tokenizer, save_pair, tiny_gpt2

    if (root / "ready").exists():
        return root
    V = cfg["vocab"]
    words = [f"w{i}" for i in range(V - len(SPECIALS))]
    tok = build_word_tokenizer([" ".join(words)])
    assert len(tok) == V, len(tok)
    for name, (n_layer, n_embd, n_head), seed in (("teacher", cfg["teacher"], 0), ("student", cfg["student"], 1)):
        model = tiny_gpt2(tok, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, seed=seed)
        save_pair(model, tok, root / name)
    g = torch.Generator().manual_seed(0)
    n = cfg["B"] * (cfg["steps"] + 4)
    ids = torch.randint(0, len(words), (n, cfg["P"]), generator=g)
    with (root / "train.jsonl").open("w") as fh:
        for row in ids.tolist():
            fh.write(json.dumps({"prompt": " ".join(words[i] for i in row), "response": "w1"}) + "\n")
    with (root / "valid.jsonl").open("w") as fh:
        for row in ids[: cfg["B"]].tolist():
            fh.write(json.dumps({"prompt": " ".join(words[i] for i in row), "response": "w1"}) + "\n")
    (root / "ready").write_text("1")
    return root


def read_prompts(root: Path) -> list[str]:
    return [json.loads(ln)["prompt"] for ln in (root / "train.jsonl").read_text().splitlines() if ln.strip()]


# --- minillm ------------------------------------------------------------------------------------------


def run_minillm(cfg: dict[str, Any], root: Path, out: Path, device: str) -> dict[str, Any]:
    import yaml

    run = out / "minillm-run"
    conf = {
        "method": "minillm", "output_dir": str(run), "seed": SEED,
        "teacher": {"path": str(root / "teacher"), "dtype": cfg["dtype"] if device == "cuda" else "float32"},
        "student": {"path": str(root / "student")},
        "data": {"train": str(root / "train.jsonl"), "valid": str(root / "valid.jsonl"), "template": "raw",
                 "max_prompt_len": cfg["P"], "max_len": cfg["P"] + cfg["G"]},
        "train": {"max_steps": cfg["steps"], "lr": LR, "warmup": 0, "batch_size": cfg["B"], "grad_accum": 1,
                  "eval_every": 10**6, "save_every": 10**6, "eval_max_examples": cfg["B"], "progress": False,
                  "resume": False, "device": device},
        "generation": {"max_new_tokens": cfg["G"]},
        "minillm": {"alpha": 0.0, "ppo_epochs": 1, "rollouts_per_step": cfg["B"], "rollout_batch_size": cfg["B"]},
    }
    path = out / "minillm.yaml"
    path.write_text(yaml.safe_dump(conf))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minillm", "train", str(path)], check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    step = [r["step_time_s"] for r in rows]
    roll = [r["rollout_time_s"] for r in rows]
    score = [r["score_time_s"] for r in rows]
    return {"wall_s": wall, "step_s": step, "rollout_s": roll, "score_s": score,
            "update_s": [s - a - b for s, a, b in zip(step, roll, score)],
            "response_len": statistics.mean(r["response_len"] for r in rows)}


# --- TRL (runs inside the TRL interpreter) --------------------------------------------------------------


def trl_worker(cfg: dict[str, Any], root: Path, out: Path) -> None:
    """TRL's DistillationTrainer on the same models and prompts; writes trl.json."""
    t_start = time.perf_counter()
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(root / "student")
    student = AutoModelForCausalLM.from_pretrained(root / "student")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=getattr(torch, cfg["dtype"]) if cuda else torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen_times: list[float] = []
    generate = student.generate

    def timed_generate(*a: Any, **k: Any) -> Any:
        sync()
        t = time.perf_counter()
        res = generate(*a, **k)
        sync()
        gen_times.append(time.perf_counter() - t)
        return res

    student.generate = timed_generate
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            stamps.append(time.perf_counter())

    ds = Dataset.from_dict({"prompt": read_prompts(root)[: cfg["B"] * (cfg["steps"] + 1)]})
    args = DistillationConfig(
        output_dir=str(out / "trl-run"), per_device_train_batch_size=cfg["B"], max_steps=cfg["steps"], beta=1.0,
        max_completion_length=cfg["G"], temperature=1.0, learning_rate=LR, bf16=cuda and cfg["dtype"] == "bfloat16",
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=not cuda, seed=SEED,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                  processing_class=tok, callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    starts = [t0, *stamps[:-1]]
    step = [b - a for a, b in zip(starts, stamps)]
    lens = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    res = {"version": trl.__version__, "step_s": step, "rollout_s": gen_times[: len(step)],
           "update_s": [s - g for s, g in zip(step, gen_times)], "train_s": train_s,
           "setup_s": t0 - t_start, "response_len": statistics.mean(lens) if lens else None}
    (out / "trl.json").write_text(json.dumps(res))


def run_trl(cfg: dict[str, Any], root: Path, out: Path, python: str | None, config: str) -> dict[str, Any] | str:
    if not python:
        return "no TRL interpreter: pass --trl-python PATH or set TRL_PYTHON (a virtual environment with trl installed)"
    if not Path(python).exists():
        return f"TRL interpreter {python} not found"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    t0 = time.perf_counter()
    proc = subprocess.run([python, __file__, "--worker", "trl", "--config", config, "--steps", str(cfg["steps"]),
                           "--world", str(root), "--out", str(out)], env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return f"the TRL run failed (exit {proc.returncode}); see its output above"
    res = json.loads((out / "trl.json").read_text())
    res["wall_s"] = wall
    return res


# --- plain reference-style loop ---------------------------------------------------------------------------


def plain_worker(cfg: dict[str, Any], root: Path, out: Path) -> None:
    """The MiniLLM step written the straightforward way (as the reference code does): HF ``generate``,
    full-vocabulary log-softmax tensors, the teacher run again for the single-step term."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(root / "student")
    student = AutoModelForCausalLM.from_pretrained(root / "student").to(dev)
    t_dtype = getattr(torch, cfg["dtype"]) if dev.type == "cuda" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=t_dtype).to(dev).eval().requires_grad_(False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    prompts = read_prompts(root)
    B, G, V = cfg["B"], cfg["G"], cfg["vocab"]
    times: dict[str, list[float]] = {"rollout_s": [], "score_s": [], "update_s": [], "step_s": []}
    lengths = []
    for step in range(cfg["steps"]):
        sync()
        t0 = time.perf_counter()
        enc = tok(prompts[step * B : (step + 1) * B], return_tensors="pt", padding=True).to(dev)
        student.eval()
        with torch.no_grad(), autocast:
            seq = student.generate(**enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=G, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
        sync()
        t1 = time.perf_counter()
        P = enc["input_ids"].shape[1]
        resp = seq[:, P:]
        # real response tokens: up to and including the first EOS
        is_eos = resp == tok.eos_token_id
        after = (is_eos.cumsum(-1) - is_eos.long()) > 0
        mask = (~after).float()
        attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        lengths.append(float(mask.sum(-1).mean()))
        with torch.no_grad():
            with autocast:
                s_logits = student(input_ids=seq, attention_mask=attn).logits[:, P - 1 : -1, :V].float()
            t_logits = teacher(input_ids=seq, attention_mask=attn).logits[:, P - 1 : -1, :V].float()
            logq_old = F.log_softmax(s_logits, -1).gather(-1, resp[..., None]).squeeze(-1)
            logp = F.log_softmax(t_logits, -1).gather(-1, resp[..., None]).squeeze(-1)
            r = (logp - logq_old) * mask
            # length-normalised future return R_{t+1} / (T - t), backwards over positions as the reference loops do
            adv = torch.zeros_like(r)
            total, remaining = torch.zeros(B, device=dev), torch.zeros(B, device=dev)
            for t in range(r.shape[1] - 1, -1, -1):
                adv[:, t] = torch.where(remaining > 0, total / remaining.clamp(min=1), 0.0) * mask[:, t]
                total, remaining = total + r[:, t], remaining + mask[:, t]
        sync()
        t2 = time.perf_counter()
        student.train()
        with autocast:
            logits = student(input_ids=seq, attention_mask=attn).logits[:, P - 1 : -1, :V].float()
        with torch.no_grad():
            t_logits = teacher(input_ids=seq, attention_mask=attn).logits[:, P - 1 : -1, :V].float()
        logq_all = F.log_softmax(logits, -1)
        logq = logq_all.gather(-1, resp[..., None]).squeeze(-1)
        ratio = torch.exp(logq - logq_old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        logp_all = F.log_softmax(t_logits, -1)
        kl = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
        loss = ((pg + kl) * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        for k, v in (("rollout_s", t1 - t0), ("score_s", t2 - t1), ("update_s", t3 - t2), ("step_s", t3 - t0)):
            times[k].append(v)
    (out / "plain.json").write_text(json.dumps({**times, "response_len": statistics.mean(lengths)}))


def run_plain(cfg: dict[str, Any], root: Path, out: Path, config: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", "plain", "--config", config, "--steps", str(cfg["steps"]),
                    "--world", str(root), "--out", str(out)], check=True)
    res = json.loads((out / "plain.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


# --- the table ----------------------------------------------------------------------------------------------


def median(xs: list[float] | None, skip: int) -> float | None:
    xs = (xs or [])[skip:] or (xs or [])
    return statistics.median(xs) if xs else None


def table(results: dict[str, Any], skip: int) -> str:
    systems = [s for s in ("minillm", "trl", "plain") if isinstance(results.get(s), dict)]
    rows = [("rollout (s/step)", "rollout_s"), ("score (s/step)", "score_s"), ("update (s/step)", "update_s"),
            ("whole step (s/step)", "step_s")]
    head = "| | " + " | ".join(systems) + " | " + " | ".join(f"{s} / minillm" for s in systems if s != "minillm") + " |"
    lines = [head, "|---" * (1 + 2 * len(systems) - 1) + "|"]
    ours = results.get("minillm") if isinstance(results.get("minillm"), dict) else None

    def fmt(v: float | None, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    for label, key in rows:
        vals = {s: median(results[s].get(key), skip) for s in systems}
        ratios = [fmt(vals[s] / vals["minillm"], 2) + "x" if ours and vals[s] and vals.get("minillm") else "-"
                  for s in systems if s != "minillm"]
        lines.append(f"| {label} | " + " | ".join(fmt(vals[s]) for s in systems) + " | " + " | ".join(ratios) + " |")
    walls = {s: results[s]["wall_s"] for s in systems}
    ratios = [f"{walls[s] / walls['minillm']:.2f}x" if ours else "-" for s in systems if s != "minillm"]
    lines.append("| whole process (s) | " + " | ".join(f"{walls[s]:.1f}" for s in systems) + " | " + " | ".join(ratios) + " |")
    lens = [fmt(results[s].get("response_len"), 1) for s in systems]
    lines.append("| mean response length | " + " | ".join(lens) + " |" + " |" * (len(systems) - 1))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per system (default: the config's)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    ap.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON"), help="interpreter of an environment with trl")
    ap.add_argument("--systems", default="minillm,trl,plain", help="comma-separated subset of minillm,trl,plain")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every system (OMP_NUM_THREADS); default: torch's own choice. On shared, loaded "
                         "cores 1 avoids OpenMP spin-waiting (2026-12-01, load ~10: a rollout took 25-32 s with 2 threads, 0.5-0.8 s with 1)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--world", default=None, help="reuse (or build) the models and prompts in this folder")
    ap.add_argument("--worker", choices=["trl", "plain"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)  # inherited by every system
    cfg = dict(CONFIGS[a.config])
    if a.steps:
        cfg["steps"] = a.steps
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_step-"))
    out.mkdir(parents=True, exist_ok=True)
    if a.worker:
        {"trl": trl_worker, "plain": plain_worker}[a.worker](cfg, Path(a.world), out)
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = build_world(cfg, Path(a.world) if a.world else out / "world")
    results: dict[str, Any] = {"config": a.config, "shapes": cfg, "device": device, "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "threads": a.threads or torch.get_num_threads(),
                               "load_average": os.getloadavg()}
    wanted = a.systems.split(",")
    if "minillm" in wanted:
        results["minillm"] = run_minillm(cfg, root, out, device)
    if "trl" in wanted:
        results["trl"] = run_trl(cfg, root, out, a.trl_python, a.config)
        if isinstance(results["trl"], str):
            print(f"TRL column skipped: {results['trl']}", file=sys.stderr)
    if "plain" in wanted:
        results["plain"] = run_plain(cfg, root, out, a.config)
    (out / "bench_step.json").write_text(json.dumps(results, indent=1))
    print(f"\n{a.config} config, {cfg['steps']} steps, medians after the first {a.warmup}; "
          f"{results['threads']} thread(s), load average at the start {results['load_average'][0]:.1f}:\n")
    print(table(results, a.warmup))
    print(f"\nfull results: {out / 'bench_step.json'}")


if __name__ == "__main__":
    main()
