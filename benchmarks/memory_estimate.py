"""Per-GPU memory of a MiniLLM run, estimated from the models' shapes (docs/scaling.md's tables).

    python benchmarks/memory_estimate.py            # the three pairs of docs/scaling.md, 8 GPUs
    python benchmarks/memory_estimate.py --ranks 16 --rollout-batch 32 --prompt 256 --new 256

Parameter counts are exact: each architecture is built from its public config on the meta device
(nothing is downloaded or allocated). Everything else is arithmetic, per rank, in GB (1e9 bytes):

* student, trained: float32 weights + float32 gradients + AdamW's two float32 moments = 16 bytes
  per parameter, divided by the ranks under ``train.parallel: fsdp``; under FSDP the rollout phase
  also holds the whole student gathered in bf16 (2 bytes per parameter; minillm.parallel.gathered);
  with LoRA the frozen base is 2 bytes per parameter (bf16) and the adapters' 16 bytes are negligible;
* teacher, frozen: bf16, 2 bytes per parameter, whole or divided by the ranks when sharded;
* KV caches of both models at the rollout batch: 2 (K and V) x layers x KV heads x head dim x
  (prompt + new tokens) x rollout batch x 2 bytes (bf16), the static engine's preallocated length;
* loss chunk: one micro-batch's student and teacher logits over the response, bf16, plus one float32
  copy for the vocabulary-wide softmax (the losses run in chunks, so this is the peak, not a sum);
* activations kept for backward of one micro-batch (with SDPA attention): about 34 x tokens x
  hidden bytes per layer without activation checkpointing; with it, 2 x tokens x hidden bytes per
  layer (block inputs) plus one layer's 34 x tokens x hidden.

Not counted: CUDA context and allocator slack (budget 3-5 GB), FSDP's all-gather buffers for one
block (small next to the above), the optimizer's temporary buffers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Arch:
    name: str
    params: int
    layers: int
    hidden: int
    kv_dim: int  # KV heads x head dim
    vocab: int


def _count(config: object) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights once


def arch(name: str) -> Arch:
    """Public shapes of the models the docs discuss (GPT-2, OPT, Llama 3)."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    shapes = {
        "gpt2-120M": GPT2Config(n_layer=12, n_embd=768, n_head=12),
        "gpt2-xl-1.5B": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
        "opt-1.3B": OPTConfig(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, ffn_dim=8192, vocab_size=50272),
        "opt-13B": OPTConfig(num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, ffn_dim=20480, vocab_size=50272),
        "llama3-8B": LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                 intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
        "llama3-70B": LlamaConfig(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                                  intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False),
    }
    c = shapes[name]
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return Arch(name, _count(c), layers, hidden, kv_heads * hidden // heads, c.vocab_size)


@dataclass(frozen=True)
class Layout:
    name: str
    student_sharded: bool
    teacher_sharded: bool
    lora: bool = False
    activation_checkpointing: bool = False


def estimate(s: Arch, t: Arch, lay: Layout, ranks: int, rollout_batch: int, micro_batch: int, prompt: int, new: int) -> dict[str, float]:
    """GB per rank for each part, and their total."""
    n_s = ranks if lay.student_sharded else 1
    n_t = ranks if lay.teacher_sharded else 1
    if lay.lora:
        student = 2 * s.params / n_s
    else:
        student = 16 * s.params / n_s + (2 * s.params if lay.student_sharded else 0)
    teacher = 2 * t.params / n_t
    seq = prompt + new
    kv = sum(2 * m.layers * m.kv_dim * seq * rollout_batch * 2 for m in (s, t))
    logits = micro_batch * new * s.vocab * (2 + 2 + 4)
    tokens = micro_batch * seq
    per_layer = 34 * tokens * s.hidden
    acts = 2 * tokens * s.hidden * s.layers + per_layer if lay.activation_checkpointing else per_layer * s.layers
    parts = {"student": student, "teacher": teacher, "kv_caches": kv, "loss_chunk": logits, "activations": acts}
    out = {k: v / GB for k, v in parts.items()}
    # rollouts (KV caches) and the update (logits, activations) do not overlap in time
    out["peak"] = out["student"] + out["teacher"] + max(out["kv_caches"], out["loss_chunk"] + out["activations"])
    return out


PAIRS = [("gpt2-xl-1.5B", "gpt2-120M"), ("opt-13B", "opt-1.3B"), ("llama3-70B", "llama3-8B")]
LAYOUTS = [
    Layout("ddp, teacher whole", False, False),
    Layout("ddp, teacher sharded", False, True),
    Layout("fsdp, teacher sharded", True, True),
    Layout("fsdp + act. ckpt, teacher sharded", True, True, activation_checkpointing=True),
    Layout("LoRA (ddp), teacher sharded", False, True, lora=True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--rollout-batch", type=int, default=16, help="prompts decoded together on one rank")
    ap.add_argument("--micro-batch", type=int, default=4, help="train.batch_size")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    a = ap.parse_args()
    print(f"ranks {a.ranks}, rollout batch {a.rollout_batch} per rank, micro-batch {a.micro_batch}, "
          f"{a.prompt} prompt + {a.new} new tokens; GB per rank\n")
    for t_name, s_name in PAIRS:
        t, s = arch(t_name), arch(s_name)
        print(f"### {t.name} ({t.params / 1e9:.2f}B) -> {s.name} ({s.params / 1e9:.2f}B)\n")
        print("| layout | student | teacher | KV caches | loss chunk | activations | peak |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for lay in LAYOUTS:
            e = estimate(s, t, lay, a.ranks, a.rollout_batch, a.micro_batch, a.prompt, a.new)
            print(f"| {lay.name} | {e['student']:.1f} | {e['teacher']:.1f} | {e['kv_caches']:.1f} | {e['loss_chunk']:.1f} | "
                  f"{e['activations']:.1f} | **{e['peak']:.1f}** |")
        print()


if __name__ == "__main__":
    main()
