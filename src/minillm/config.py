"""Typed run configuration: the one source of defaults.

A YAML file and ``dotted.key=value`` overrides only *change* values declared here. Unknown keys,
wrong types and values that break the method's assumptions are refused at load time with the file,
line and key at fault, and a suggestion.

Defaults are the paper's GPT-2 MiniLLM settings (Gu et al. 2024, Appendix C; reference scripts
``scripts/gpt2/minillm/train_base_xl.sh``): lr 5e-6 constant after 100 warm-up steps, 64 sequences
per optimizer step, 256 rollouts per rollout phase, 4 PPO epochs, clip 0.2, teacher mix 0.2,
prompts up to 256 tokens and sequences up to 512.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from minillm.errors import UserError
from minillm.textio import decode_utf8

METHODS = ("sft", "minillm", "kd", "seqkd")
TEACHER_METHODS = ("minillm", "kd")  # methods that load teacher.path (their classes say needs_teacher)
WHITEN = ("none", "rollout", "minibatch_padded")
ALPHA_SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("tensorboard", "wandb")

# ``minillm.recipe``: named tables of dotted keys applied at load time to every key the config does
# not set itself (an explicit key always wins); config.yaml records the resolved values. "paper" is the
# defaults below, unchanged. "reference" is every place where the reference code (microsoft/LMOps,
# minillm/) departs from the paper: both models re-scored teacher-forced after sampling, its trainer's
# return (r_t included, gamma 0.95), reward scaling
# (its --reward-scaling 0.5) and clipping, advantage whitening per PPO mini-batch with padding
# counted, the unweighted single-step term, 0.5 forward KD in L_PT (--kd-ratio 0.5), and its
# optimizer (AdamW betas (0.9, 0.95), weight decay 1e-6 on every parameter).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "reference": {
        "minillm.rescore": True,
        "minillm.reward_scale": 2.0,
        "minillm.reward_clip": 100.0,
        "minillm.gamma": 0.95,
        "minillm.include_current_reward": True,
        "minillm.whiten": "minibatch_padded",
        "minillm.single_step_weight": False,
        "minillm.pt_kd_ratio": 0.5,
        "train.adam_betas": [0.9, 0.95],
        "train.weight_decay": 1e-6,
        "train.weight_decay_on": "all",
    },
}
TEMPLATES = ("alpaca", "chat", "raw")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARALLEL = ("ddp", "fsdp")
TEACHER_SHARDING = ("auto", "whole", "shard")
# the names of minillm.data.formats.FORMATS (a test keeps them equal), for data.format and eval.format
DATA_FORMATS = ("auto", "dolly", "selfinst", "vicuna", "sni", "unni", "prompt_response")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{key}: {msg}")


@dataclass
class LoraConfig:
    """LoRA adapters trained in place of the student's weights (through ``peft``; ``r: 0`` = off)."""

    r: int = 0  # adapter rank; 0: no adapter, every weight of the student is trained
    alpha: float = 16.0  # the adapter's output is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] = field(default_factory=list)  # module names to adapt (e.g. [q_proj, v_proj]); empty: peft's default for the architecture

    def __post_init__(self) -> None:
        _check(self.r >= 0, "r", "must be >= 0 (0 turns LoRA off)")
        _check(self.alpha > 0, "alpha", "must be positive")
        _check(0 <= self.dropout < 1, "dropout", "must lie in [0, 1)")


@dataclass
class ModelConfig:
    """A causal LM: a Hugging Face Hub id, a local folder, or a ``.gguf`` file."""

    path: str | None = None  # Hub id, local folder or .gguf file
    dtype: str = "auto"  # auto: float32 on CPU; on CUDA bfloat16 for the teacher, float32 master weights for the student
    trust_remote_code: bool = False  # run model code shipped with a Hub repo (off unless you trust it)
    revision: str | None = None  # Hub branch, tag or commit
    tokenizer: str | None = None  # defaults to `path` (a GGUF file carries its tokenizer)
    adapter: str | None = None  # a PEFT LoRA adapter folder trained on `path`: merged into the weights when loaded
    lora: LoraConfig = field(default_factory=LoraConfig)  # student only: train LoRA adapters (see student.lora.*)

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class DataConfig:
    """Instruction data (JSONL or a Hugging Face dataset) and an optional pre-training corpus."""

    train: str | None = None  # JSONL / JSON file, saved dataset folder or Hub dataset id
    valid: str | None = None  # same forms; unset: held out of `train` (see valid_split, valid_size)
    format: str = "auto"  # format of train and valid: auto (from the first record), dolly, selfinst, vicuna, sni, unni, prompt_response
    pretrain: str | None = None  # .txt (one document per line) or .jsonl corpus for the L_PT loss; unset: no L_PT
    template: str = "alpaca"  # alpaca (the paper), chat (the tokenizer's chat template) or raw (prompt as is)
    max_prompt_len: int = 256  # longer prompts are skipped and counted, never truncated
    max_len: int = 512  # prompt + response tokens; longer responses are cut (counted)
    split: str = "train"  # split of a Hub/saved dataset used for `train`
    valid_split: str | None = None  # split of `train`'s dataset used for validation when `valid` is unset
    valid_size: int = 500  # examples held out of `train` when neither `valid` nor `valid_split` is set
    columns: dict[str, str] = field(default_factory=dict)  # our field -> dataset column
    max_examples: int | None = None  # cap on training examples (after filtering)
    pretrain_text_key: str = "text"  # field holding the text in a .jsonl pre-training corpus
    fingerprint: str = "stat"  # how a resume checks the data files are unchanged: stat (size + modification time) or hash (SHA-256 of the contents: reads them once per start)

    def __post_init__(self) -> None:
        _check(self.template in TEMPLATES, "data.template", f"must be one of {TEMPLATES}, got {self.template!r}")
        _check(self.format in DATA_FORMATS, "data.format", f"must be one of {DATA_FORMATS}, got {self.format!r}")
        _check(self.max_prompt_len > 0, "data.max_prompt_len", "must be positive")
        _check(
            self.max_len > self.max_prompt_len,
            "data.max_len",
            f"must exceed data.max_prompt_len ({self.max_prompt_len}) to leave room for a response",
        )
        _check(self.fingerprint in ("stat", "hash"), "data.fingerprint", f"must be stat or hash, got {self.fingerprint!r}")
        _check(self.valid_size >= 1, "data.valid_size", "must be >= 1 (or point data.valid at a file)")
        _check(self.max_examples is None or self.max_examples >= 1, "data.max_examples", "must be >= 1 or null (all)")
        allowed = {"prompt", "response", "instruction", "context", "messages", "references"}
        for k in self.columns:
            _check(k in allowed, f"data.columns.{k}", f"unknown field; map one of {sorted(allowed)}")


@dataclass
class TrainConfig:
    """The optimisation loop shared by every method."""

    max_steps: int = 5000  # optimizer steps
    epochs: float | None = None  # if set, max_steps = epochs * (examples / sequences per step)
    lr: float = 5e-6  # peak learning rate (AdamW)
    min_lr: float = 0.0  # floor of the cosine / linear decay
    warmup: int = 100  # linear warm-up steps
    schedule: str = "constant"  # after warm-up: constant, cosine or linear decay to min_lr
    weight_decay: float = 0.01  # AdamW decoupled weight decay, on the parameters weight_decay_on names
    weight_decay_on: str = "matrices"  # matrices (not biases and norms) or all (the reference code)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
    grad_clip: float = 1.0  # 0 disables clipping
    dtype: str = "auto"  # student compute: auto = bf16 autocast on CUDA (fp16 with loss scaling where bf16 is missing), fp32 on CPU
    device: str = "auto"  # auto (CUDA when visible), cpu, cuda, cuda:N
    pt_coef: float = 1.0  # weight of the pre-training LM loss for non-MiniLLM methods (when data.pretrain is set)
    eval_every: int = 100  # validate every N optimizer steps (and at the end)
    eval_batch_size: int = 16  # sequences per batch in validation and generation
    eval_max_examples: int | None = 500  # validation examples used (null: all)
    select_by: str = "loss"  # keep best/ by validation "loss" (lower) or "rouge_l" (higher)
    save_every: int = 500  # checkpoint every N steps (and at the end), atomically
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    resume: bool = True  # continue from the latest checkpoint in output_dir when there is one
    progress: bool = True  # live progress bar with a time estimate (on a terminal)
    log_every: int = 10  # without a terminal (CI, nohup, Slurm): a log line every N steps with loss, metrics and ETA; 0 = off
    report_to: list[str] = field(default_factory=list)  # tensorboard and/or wandb (optional extras): metrics.jsonl rows, resolved config, git commit
    wandb_project: str = "minillm"  # W&B project (report_to: wandb)
    wandb_mode: str = "offline"  # offline (no network; `wandb sync` later) or online
    parallel: str = "ddp"  # under torchrun: ddp (whole student per rank, gradients all-reduced) or fsdp (FSDP2 shards its weights, gradients, optimizer state)
    teacher_sharding: str = "auto"  # auto: whole on each rank when its weights take under 40% of one GPU (always on CPU), else FSDP2-sharded; or whole / shard
    activation_checkpointing: bool = False  # recompute each transformer block's activations in backward: less memory, about a third more compute
    dist_timeout_s: float = 1800.0  # a collective waiting longer fails the run: a stuck rank becomes an error, not a hang
    fused_loss: str = "auto"  # losses from hidden states and the output layer in chunks, no (B, T, V) logits held: auto (when a micro-batch's would pass 256 MB), on, off
    max_bad_steps: int = 3  # a step with a non-finite loss, gradient norm or reward is skipped (no update); this many in a row stop the run with a diagnosis
    loss_jump: float = 100.0  # warn (once) when |loss| exceeds this many times its running median (floored at 1); 0 = off
    length_collapse: float = 0.25  # warn (once) when the mean rollout response length falls below this fraction of the first rollouts' (or half the responses are empty); 0 = off
    distinct_collapse: float = 0.5  # warn (once) of reward hacking when rollout distinct-2 falls below this fraction of the first rollouts' while the teacher's log-prob rises; 0 = off

    def __post_init__(self) -> None:
        _check(self.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}")
        _check(self.weight_decay_on in ("matrices", "all"), "train.weight_decay_on", "must be 'matrices' or 'all'")
        _check(self.log_every >= 0, "train.log_every", "must be >= 0 (0 turns the log lines off)")
        for name in self.report_to:
            _check(name in TRACKERS, "train.report_to", f"unknown tracker {name!r}; choose from {TRACKERS}")
        _check(len(set(self.report_to)) == len(self.report_to), "train.report_to", f"names a tracker twice: {self.report_to}")
        _check(self.wandb_mode in ("offline", "online"), "train.wandb_mode", "must be 'offline' or 'online'")
        _check(self.dtype in DTYPES, "train.dtype", f"must be one of {DTYPES}")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(self.min_lr >= 0 and self.min_lr <= self.lr, "train.min_lr", "must lie in [0, train.lr]")
        _check(self.max_steps > 0, "train.max_steps", "must be positive")
        _check(self.warmup >= 0, "train.warmup", "must be >= 0")
        _check(self.batch_size > 0, "train.batch_size", "must be positive")
        _check(self.grad_accum > 0, "train.grad_accum", "must be positive")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(self.eval_every > 0, "train.eval_every", "must be positive")
        _check(self.save_every > 0, "train.save_every", "must be positive")
        _check(self.eval_batch_size > 0, "train.eval_batch_size", "must be positive")
        _check(self.eval_max_examples is None or self.eval_max_examples >= 1, "train.eval_max_examples",
               "must be >= 1 or null (all)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.pt_coef >= 0, "train.pt_coef", "must be >= 0")
        _check(self.keep_last >= 1, "train.keep_last", "must keep at least one checkpoint")
        _check(self.select_by in ("loss", "rouge_l"), "train.select_by", "must be 'loss' or 'rouge_l'")
        _check(len(self.adam_betas) == 2 and all(0 <= x < 1 for x in self.adam_betas), "train.adam_betas",
               "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        _check(self.epochs is None or self.epochs > 0, "train.epochs", "must be positive")
        _check(self.parallel in PARALLEL, "train.parallel", f"must be one of {PARALLEL}, got {self.parallel!r}")
        _check(self.teacher_sharding in TEACHER_SHARDING, "train.teacher_sharding",
               f"must be one of {TEACHER_SHARDING}, got {self.teacher_sharding!r}")
        _check(self.dist_timeout_s > 0, "train.dist_timeout_s", "must be positive")
        _check(self.fused_loss in ("auto", "on", "off"), "train.fused_loss", f"must be auto, on or off, got {self.fused_loss!r}")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1 (bad steps in a row that stop the run)")
        _check(self.loss_jump >= 0, "train.loss_jump", "must be >= 0 (0 turns the warning off)")
        _check(0 <= self.length_collapse < 1, "train.length_collapse", "must lie in [0, 1) (0 turns the warning off)")
        _check(0 <= self.distinct_collapse < 1, "train.distinct_collapse", "must lie in [0, 1) (0 turns the warning off)")

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass
class GenerationConfig:
    """Sampling for rollouts, SeqKD data and evaluation (paper: temperature 1, no top-k/top-p)."""

    temperature: float = 1.0  # sampling temperature (rollouts, SeqKD data, evaluation)
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus sampling mass; 1 disables
    max_new_tokens: int = 256  # response budget (also capped by data.max_len - prompt length)
    no_repeat_ngram_size: int = 0  # forbid repeating n-grams (evaluation option; plain loop only)
    engine: str = "auto"  # auto: static caches + CUDA graphs on GPU (plain loop, with a warning, for a model they cannot run), plain loop on CPU; or eager / static

    def __post_init__(self) -> None:
        _check(self.engine in ("auto", "eager", "static"), "generation.engine", "must be auto, eager or static")
        _check(self.temperature > 0, "generation.temperature", "must be positive (use top_k=1 for greedy)")
        _check(self.top_k >= 0, "generation.top_k", "must be >= 0 (0 disables)")
        _check(0 < self.top_p <= 1, "generation.top_p", "must lie in (0, 1]")
        _check(self.max_new_tokens > 0, "generation.max_new_tokens", "must be positive")
        _check(self.no_repeat_ngram_size >= 0, "generation.no_repeat_ngram_size", "must be >= 0")


@dataclass
class MiniLLMConfig:
    """MiniLLM's policy-gradient distillation; every stabiliser has its own switch."""

    recipe: str = "paper"  # paper (these defaults) or reference: the reference code's settings (table below); explicit keys win
    alpha: float = 0.2  # teacher-mix strength: sample from (1-a) q + a p; 0 = pure student
    alpha_schedule: str = "constant"  # constant (the paper), linear or cosine from alpha to alpha_end over training
    alpha_end: float = 0.0  # teacher-mix strength at the last step (linear / cosine schedules)
    single_step: bool = True  # exact per-token reverse KL instead of its sampled estimate
    length_norm: bool = True  # average the future return over the remaining length
    gamma: float = 1.0  # discount counted from the response start (reference code: 0.95)
    clip: float = 0.2  # PPO ratio clip; 0 disables clipping
    ppo_epochs: int = 4  # passes over each rollout batch
    rollouts_per_step: int = 256  # rollouts sampled per rollout phase
    rollout_batch_size: int = 64  # prompts decoded together
    pt_coef: float = 1.0  # weight of the pre-training loss (needs data.pretrain)
    single_step_weight: bool = True  # weight the single-step KL by w_t (paper); the reference code does not
    include_current_reward: bool = False  # reference code: the return includes r_t itself
    whiten: str | bool = "none"  # none; rollout: over the rollout phase's real tokens; minibatch_padded: per PPO mini-batch, padding counted (reference code)
    reward_scale: float = 1.0  # rewards are multiplied by this; reference code: 2 (it divides by its --reward-scaling 0.5)
    reward_clip: float | None = None  # reference code: 100
    pt_kd_ratio: float = 0.0  # reference code mixes 0.5 LM + 0.5 forward KD on the pre-training batch
    rescore: bool = False  # score both models teacher-forced after sampling (reference code); default: reuse the decode's log q / log p (the student is re-scored where it decodes in reduced precision)
    teacher_cache: str = "auto"  # the teacher's logits for the single-step term, once per rollout phase: auto (on the device, else pinned host memory), device, host, off (recompute every PPO epoch)
    cache_gb: float = 8.0  # budget for the logits a rollout phase keeps (the teacher cache, the decode's logits)

    def __post_init__(self) -> None:
        if isinstance(self.whiten, bool):  # before 0.2 a switch: true whitened over the rollout phase
            self.whiten = "rollout" if self.whiten else "none"
        _check(self.recipe in RECIPES, "minillm.recipe", f"must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        _check(self.whiten in WHITEN, "minillm.whiten", f"must be one of {WHITEN} (or true = rollout, false = none)")
        _check(self.alpha_schedule in ALPHA_SCHEDULES, "minillm.alpha_schedule", f"must be one of {ALPHA_SCHEDULES}")
        _check(0 <= self.alpha_end < 1, "minillm.alpha_end", "must lie in [0, 1)")
        _check(0 <= self.alpha < 1, "minillm.alpha", "must lie in [0, 1) (the student must keep some mass)")
        _check(0 < self.gamma <= 1, "minillm.gamma", "must lie in (0, 1]")
        _check(0 <= self.clip < 1, "minillm.clip", "must lie in [0, 1); 0 disables clipping")
        _check(self.ppo_epochs >= 1, "minillm.ppo_epochs", "must be >= 1")
        _check(self.rollouts_per_step >= 1, "minillm.rollouts_per_step", "must be >= 1")
        _check(self.rollout_batch_size >= 1, "minillm.rollout_batch_size", "must be >= 1")
        _check(self.pt_coef >= 0, "minillm.pt_coef", "must be >= 0")
        _check(self.reward_scale > 0, "minillm.reward_scale", "must be positive")
        _check(self.reward_clip is None or self.reward_clip > 0, "minillm.reward_clip", "must be positive or null")
        _check(0 <= self.pt_kd_ratio <= 1, "minillm.pt_kd_ratio", "must lie in [0, 1]")
        _check(self.teacher_cache in ("auto", "device", "host", "off"), "minillm.teacher_cache",
               f"must be auto, device, host or off, got {self.teacher_cache!r}")
        _check(self.cache_gb >= 0, "minillm.cache_gb", "must be >= 0 (0 keeps nothing)")


@dataclass
class KDConfig:
    """Token-level distillation baselines (word-level KD, GKD/DistiLLM divergence family)."""

    loss: str = "forward_kl"  # any name in minillm.losses.DIVERGENCES
    ratio: float = 0.5  # weight of the divergence; 1 - ratio goes to cross-entropy on the data
    temperature: float = 1.0  # both distributions are softened by this temperature inside the divergence
    beta: float = 0.5  # generalised JSD interpolation
    skew_alpha: float = 0.1  # skew KL mixing
    onpolicy_fraction: float = 0.0  # GKD lambda: share of batches whose responses the student samples

    def __post_init__(self) -> None:
        _check(0 <= self.ratio <= 1, "kd.ratio", "must lie in [0, 1]")
        _check(self.temperature > 0, "kd.temperature", "must be positive")
        _check(0 <= self.beta <= 1, "kd.beta", "must lie in [0, 1]")
        _check(0 <= self.skew_alpha <= 1, "kd.skew_alpha", "must lie in [0, 1]")
        _check(0 <= self.onpolicy_fraction <= 1, "kd.onpolicy_fraction", "must lie in [0, 1]")


@dataclass
class EvalConfig:
    """`minillm eval`: models x test sets x sampling seeds (see :mod:`minillm.eval.runner`)."""

    models: dict[str, str] = field(default_factory=dict)  # display name -> model path (folder, Hub id, .gguf)
    test: dict[str, str] = field(default_factory=dict)  # test-set name -> file / dataset
    format: str = "auto"  # auto, dolly, selfinst, vicuna, sni, unni, prompt_response (every test set)
    formats: dict[str, str] = field(default_factory=dict)  # test-set name -> format, for sets that differ from eval.format
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])  # one generation per seed (the paper: 5)
    max_examples: int | None = None  # first N examples of each test set
    batch_size: int = 16  # prompts generated together
    metrics: list[str] = field(default_factory=lambda: ["rouge_l", "exact_match", "dist_4", "self_bleu", "lm_loss", "length", "length_words"])  # columns of the table
    exposure_bias: bool = False  # ExAccErr curve of every model against teacher.path
    exposure_samples: int = 4  # samples per prompt for ExAccErr
    exposure_max_prompts: int = 50  # prompts used for ExAccErr
    exposure_max_len: int | None = None  # generation length l_max; default generation.max_new_tokens
    exposure_protocols: list[str] = field(default_factory=lambda: ["fixed_length", "length_fair"])  # fixed_length, length_fair, to_eos (minillm.eval.exposure)
    exposure_min_at_risk: int = 10  # length_fair: the curve ends where fewer draws of either model are still running
    exposure_test: str | None = None  # test set whose prompts are used; default the first of eval.test
    calibration: str | None = None  # JSONL of {prompt, choices, answer} for ECE
    calibration_bins: int = 10  # equal-width confidence bins for ECE
    judge: str | None = None  # "openai:<model>@<base_url>" or a local model path; None = off
    judge_api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the judge's API key
    out: str | None = None  # defaults to output_dir/eval

    def __post_init__(self) -> None:
        metrics = ("rouge_l", "exact_match", "dist_4", "self_bleu", "lm_loss", "length", "length_words")
        formats = DATA_FORMATS
        _check(len(self.seeds) >= 1, "eval.seeds", "needs at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), "eval.seeds", f"has a repeated seed: {self.seeds}")
        _check(self.batch_size >= 1, "eval.batch_size", "must be positive")
        _check(self.format in formats, "eval.format", f"must be one of {formats}, got {self.format!r}")
        for name, fmt in self.formats.items():
            _check(name in self.test, f"eval.formats.{name}", f"names no test set of eval.test {sorted(self.test)}")
            _check(fmt in formats, f"eval.formats.{name}", f"must be one of {formats}, got {fmt!r}")
        for m in self.metrics:
            _check(m in metrics, "eval.metrics", f"unknown metric {m!r}; choose from {metrics}")
        _check(self.max_examples is None or self.max_examples >= 1, "eval.max_examples", "must be positive or null")
        _check(self.exposure_samples >= 1, "eval.exposure_samples", "must be >= 1")
        _check(self.exposure_max_prompts >= 1, "eval.exposure_max_prompts", "must be >= 1")
        _check(self.exposure_max_len is None or self.exposure_max_len >= 1, "eval.exposure_max_len", "must be positive or null")
        _check(self.calibration_bins >= 1, "eval.calibration_bins", "must be >= 1")
        protocols = ("fixed_length", "length_fair", "to_eos")
        _check(len(self.exposure_protocols) >= 1, "eval.exposure_protocols", f"needs at least one of {protocols}")
        for name in self.exposure_protocols:
            _check(name in protocols, "eval.exposure_protocols", f"unknown protocol {name!r}; choose from {protocols}")
        _check(len(set(self.exposure_protocols)) == len(self.exposure_protocols), "eval.exposure_protocols",
               f"names a protocol twice: {self.exposure_protocols}")
        _check(self.exposure_min_at_risk >= 1, "eval.exposure_min_at_risk", "must be >= 1")
        _check(self.exposure_test is None or self.exposure_test in self.test, "eval.exposure_test",
               f"must name one of the test sets in eval.test {sorted(self.test)}")


@dataclass
class Config:
    """A whole run. ``method`` picks the module that builds batches and losses."""

    method: str = "sft"  # sft, minillm, kd or seqkd
    output_dir: str = "runs/default"  # run folder: config, metrics.jsonl, checkpoints/, best/, final/
    seed: int = 10  # seeds data order, sampling and initialisation
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", f"unknown method {self.method!r}; choose one of {METHODS}")
        _check(
            self.generation.max_new_tokens <= self.data.max_len,
            "generation.max_new_tokens",
            f"must be <= data.max_len ({self.data.max_len})",
        )

    def validate_for_training(self) -> None:
        """Checks that only apply when a run trains (eval-only configs skip them)."""
        _check(self.student.path is not None, "student.path", "is required: a Hub id, a local folder or a .gguf file")
        _check(self.data.train is not None, "data.train", "is required: a JSONL file or a Hugging Face dataset")
        if self.method in TEACHER_METHODS:
            _check(self.teacher.path is not None, "teacher.path", f"is required by method {self.method!r}")
        _check(self.teacher.lora.r == 0, "teacher.lora.r",
               "the teacher is frozen, it trains no adapter; give a LoRA-tuned teacher's adapter folder as teacher.adapter")
        if self.method == "minillm":
            m, t = self.minillm, self.train
            _check(
                m.rollouts_per_step % t.sequences_per_step == 0,
                "minillm.rollouts_per_step",
                f"must be a multiple of train.batch_size * train.grad_accum ({t.sequences_per_step}), "
                f"the rollouts one optimizer step consumes",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, dotted overrides, type checking.


# what yaml.safe_load raises besides YAMLError: deep nesting, and scalars Python cannot build (a date like 2024-13-01)
_YAML_ERRORS = (yaml.YAMLError, RecursionError, ValueError, OverflowError)


def _yaml_lines(text: str) -> dict[str, int]:
    """Map every dotted key in a YAML document to its (1-based) line."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        root = yaml.compose(text)
    except _YAML_ERRORS:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{key}: may not be null")
    origin = typing.get_origin(inner)
    if origin in (Union, types.UnionType):  # e.g. str | bool: the first type that takes the value
        for arm in typing.get_args(inner):
            try:
                return _coerce(value, arm, key)
            except UserError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(inner))
        raise UserError(f"{key}: expected {names}, got {value!r}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise UserError(f"{key}: {value} is too large for a number") from None
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "5e-6" as a string
            except ValueError:
                pass
        raise UserError(f"{key}: expected a number, got {value!r}")
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        (elem,) = typing.get_args(inner)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(inner)
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported config type {inner} at {key}")  # a bug in this module, not user input


def _loc(lines: dict[str, int | str], key: str, source: str) -> str:
    """Where ``key`` was set: ``file:line: ``, ``command-line override: `` or ``file: ``."""
    where = lines.get(key)
    if isinstance(where, str):
        return f"{where}: "
    if where is not None:
        return f"{source}:{where}: "
    return f"{source}: " if source else ""


# keys of older configs, with what to write instead (a clear error rather than a silent mapping)
REMOVED_KEYS = {
    "eval.exposure_stop_at_eos": "use eval.exposure_protocols instead ([to_eos] for true, [fixed_length] for false; "
                                 "default [fixed_length, length_fair])",
}


def _build(cls: type, values: dict[str, Any], prefix: str, lines: dict[str, int | str], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        dotted = f"{prefix}{k}"
        loc = _loc(lines, dotted, source)
        if dotted in REMOVED_KEYS:
            raise UserError(f"{loc}{dotted} was removed: {REMOVED_KEYS[dotted]}")
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {sorted(fields)}"
            raise UserError(f"{loc}unknown key {dotted!r}{hint}")
        tp = hints[k]
        try:
            if dataclasses.is_dataclass(tp):
                if not isinstance(v, dict):
                    raise UserError(f"{dotted}: expected a mapping of {tp.__name__} keys, got {v!r}")
                kwargs[k] = _build(tp, v, dotted + ".", lines, source)
            else:
                kwargs[k] = _coerce(v, tp, dotted)
        except UserError as e:
            msg = str(e)
            located = msg.startswith(source or "\0") or msg.startswith("command-line override")
            raise UserError(msg if located else f"{loc}{msg}") from None
    try:
        return cls(**kwargs)
    except UserError as e:
        key = str(e).split(":", 1)[0]
        full = key if key.startswith(prefix) or not prefix else f"{prefix}{key}"
        loc = _loc(lines, full, source)
        msg = str(e) if key.startswith(prefix) or not prefix else f"{prefix}{e}"
        raise UserError(f"{loc}{msg}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 1e-4). Values are read as YAML scalars / lists."""
    if "=" not in item:
        raise UserError(f"override {item!r}: expected dotted.key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {item!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except _YAML_ERRORS:  # not a YAML scalar or list: the text itself
        value = raw
    return key.split("."), value


def set_key(data: dict[str, Any], path: list[str], value: Any, item: str = "") -> None:
    """``data[path[0]][path[1]]... = value`` in a nested dict, creating sections on the way."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {item or '.'.join(path)!r}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict (in place) and return it."""
    for item in overrides:
        path, value = parse_override(item)
        set_key(data, path, value, item)
    return data


def apply_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with ``minillm.recipe``'s table (:data:`RECIPES`) filling every key that
    ``data`` does not set itself. An unknown recipe is left for validation to name."""
    section = data.get("minillm")
    recipe = section.get("recipe", "paper") if isinstance(section, dict) else "paper"
    table = RECIPES.get(recipe) if isinstance(recipe, str) else None
    out = copy.deepcopy(data)
    for dotted, value in (table or {}).items():
        node: Any = out
        path = dotted.split(".")
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not (isinstance(node, dict) and path[-1] in node):
            set_key(out, path, copy.deepcopy(value))
    return out


def config_from_dict(data: dict[str, Any], source: str = "", lines: dict[str, int | str] | None = None) -> Config:
    """Build and validate a :class:`Config` from a nested dict (``minillm.recipe`` resolved first)."""
    return _build(Config, apply_recipe(data), "", lines or {}, source)


def read_yaml(p: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML file's top-level mapping (empty for an empty file) and the line of every dotted key;
    a missing file or bad YAML is a :class:`UserError` naming the file (and line)."""
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    text = decode_utf8(p.read_bytes(), p).removeprefix("\ufeff")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        raise UserError(f"{p}: YAML nested deeper than the parser allows") from None
    except (ValueError, OverflowError) as e:  # a scalar YAML reads but Python cannot build, e.g. the date 2024-13-01
        raise UserError(f"{p}: not valid YAML ({e})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"{p}: expected a mapping of config keys at the top level")
    return loaded, _yaml_lines(text)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or only defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = ""
    if path is not None:
        source = str(path)
        data, lines = read_yaml(Path(path))
    merge_overrides(data, overrides or [])
    where: dict[str, int | str] = dict(lines)
    for item in overrides or []:
        path, _ = parse_override(item)
        for i in range(1, len(path) + 1):  # errors about an overridden key name the command line
            key = ".".join(path[:i])
            if i == len(path) or key not in where:
                where[key] = f"command-line override {item!r}"
    return config_from_dict(data, source, where)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    from minillm.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``: nested sections as dotted keys (an empty
    section stays one key holding ``{}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(cfg: Config) -> str:
    """A stable digest of the config, used to decide whether finished work can be reused."""
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
