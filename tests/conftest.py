"""Shared fixtures: a tiny task, a word-level tokenizer and tiny GPT-2 teacher/student on disk."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-model runs: the matmuls gain nothing from a second thread,
    and on shared cores OpenMP's spin-waiting made two threads ~5x slower (measured on the SmolLM2 test:
    510 s against 107 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-only tests are skipped by marker when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Task data (train/valid/test JSONL, pretrain.txt) and tiny teacher/student folders."""
    from minillm.data.task import corpus_texts, write_task
    from minillm.tiny import build_word_tokenizer, save_pair, tiny_gpt2

    root = tmp_path_factory.mktemp("tiny")
    paths = write_task(root / "data", seed=1, n_train=120, n_valid=16, n_test=16, n_pretrain=100)
    tok = build_word_tokenizer(corpus_texts())
    paths["teacher"] = save_pair(tiny_gpt2(tok, n_layer=2, n_embd=48, seed=0), tok, root / "teacher")
    paths["student"] = save_pair(tiny_gpt2(tok, n_layer=1, n_embd=32, seed=1), tok, root / "student")
    paths["root"] = root
    return paths


def tiny_config_dict(task: dict[str, Path], out: Path, method: str = "sft", **sections: dict) -> dict:
    """A small, fast config over the tiny task; ``sections`` override per section."""
    cfg: dict = {
        "method": method,
        "output_dir": str(out),
        "seed": 3,
        "teacher": {"path": str(task["teacher"])},
        "student": {"path": str(task["student"])},
        "data": {"train": str(task["train"]), "valid": str(task["valid"]), "max_prompt_len": 64, "max_len": 96},
        "train": {"max_steps": 4, "lr": 1e-3, "warmup": 0, "batch_size": 4, "grad_accum": 2, "eval_every": 2,
                  "save_every": 2, "eval_batch_size": 8, "progress": False},
        "generation": {"max_new_tokens": 24},
        "minillm": {"rollouts_per_step": 8, "rollout_batch_size": 8, "ppo_epochs": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


class GradCatcher:
    """A stand-in optimizer: keeps the gradients of each step instead of applying them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.grads = model, []

    def step(self) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


@contextlib.contextmanager
def loopback_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 (a free port) in a thread; yields ``http://127.0.0.1:PORT``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def reply_json(handler: http.server.BaseHTTPRequestHandler, status: int, payload: object) -> None:
    """Send ``payload`` as a JSON response with ``status``."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def train_cli(path: Path, *over: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m minillm train PATH OVERRIDES`` in a real process, one thread, with the fault
    hook ``MINILLM_FAULT_INJECT`` set to ``fault`` (or cleared)."""
    from minillm.atomic import FAULT_ENV

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "minillm", "train", str(path), *over], capture_output=True, text=True,
                          env=env, timeout=300)
