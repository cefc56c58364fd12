"""init_student (layer dropping) on tiny random Llama / Mistral / Qwen2 / Qwen3 / GPT-2 teachers, and
the example recipes under configs/examples."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from minillm.errors import UserError
from minillm.init_student import LAYER_LISTS, RECORD, init_student, kept_layers

ROOT = Path(__file__).resolve().parents[1]
N_TEACHER = 5


def _tiny_config(kind: str, vocab: int) -> object:
    import transformers as tr

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=N_TEACHER,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "llama":
        return tr.LlamaConfig(**common)
    if kind == "mistral":
        return tr.MistralConfig(**common, sliding_window=None)
    if kind == "qwen2":
        # layers >= max_window_layers use a sliding window: per-layer attention kinds must follow the kept layers
        return tr.Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    if kind == "qwen3":
        return tr.Qwen3Config(**common, head_dim=8)
    if kind == "gpt2":
        return tr.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=N_TEACHER, n_head=4, n_positions=64,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=2)
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def word_tokenizer() -> object:
    from minillm.data.task import corpus_texts
    from minillm.tiny import build_word_tokenizer

    return build_word_tokenizer(corpus_texts())


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: object) -> dict[str, Path]:
    """One tiny random teacher of each supported kind, saved in Hugging Face format."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for i, kind in enumerate(("llama", "mistral", "qwen2", "qwen3", "gpt2")):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(_tiny_config(kind, len(word_tokenizer)))
        # random norms too, so that copying the wrong norm cannot pass unnoticed
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(root / kind)
        word_tokenizer.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def _load(path: Path) -> object:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model: object, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :4] = 0  # left padding on one row
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn).logits


# -- the layer rule ------------------------------------------------------------------------------


def _naive_keep(L: int, N: int) -> list[int]:
    """round(j (L-1) / (N-1)) with halves rounded up, in exact rationals."""
    if N == 1:
        return [0]
    return [math.floor(Fraction(j * (L - 1), N - 1) + Fraction(1, 2)) for j in range(N)]


def test_kept_layers_match_the_rule_and_keep_both_ends() -> None:
    assert kept_layers(30, 6) == [0, 6, 12, 17, 23, 29]  # the documented example
    assert kept_layers(4, 3) == [0, 2, 3]  # 1.5 rounds up
    for L in range(1, 41):
        for N in range(1, L + 1):
            keep = kept_layers(L, N)
            assert keep == _naive_keep(L, N)
            assert all(a < b for a, b in zip(keep, keep[1:])), (L, N, keep)
            assert keep[0] == 0
            if N >= 2:
                assert keep[-1] == L - 1
    assert kept_layers(7, 7) == list(range(7))
    with pytest.raises(ValueError):
        kept_layers(3, 4)


# -- the student -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_student_copies_the_chosen_layers(kind: str, teachers: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    n = 3
    keep = kept_layers(N_TEACHER, n)
    assert keep == [0, 2, 4]
    out = init_student(str(teachers[kind]), n, tmp_path / "student")
    assert (out / "model.safetensors").is_file()
    teacher, student = _load(teachers[kind]), _load(out)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == n
    prefix = LAYER_LISTS[kind]
    assert len(student.get_submodule(prefix)) == n

    t_state, s_state = teacher.state_dict(), student.state_dict()
    head = prefix + "."
    expected_keys = set()
    for name, t in t_state.items():
        if name.startswith(head):
            idx, rest = name[len(head):].split(".", 1)
            if int(idx) in keep:
                new = f"{head}{keep.index(int(idx))}.{rest}"
                expected_keys.add(new)
                assert torch.equal(s_state[new], t), new
        else:
            expected_keys.add(name)
            assert torch.equal(s_state[name], t), name  # embeddings, final norm, LM head
    assert set(s_state) == expected_keys

    record = json.loads((out / RECORD).read_text())
    assert record["kept_layers"] == keep and record["teacher_layers"] == N_TEACHER
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(teachers[kind]).get_vocab()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_all_layers_reproduce_the_teacher_exactly(kind: str, teachers: dict[str, Path], tmp_path: Path, word_tokenizer: object) -> None:
    out = init_student(str(teachers[kind]), N_TEACHER, tmp_path / "student")
    vocab = len(word_tokenizer)
    assert torch.equal(_logits(_load(out), vocab), _logits(_load(teachers[kind]), vocab))


def test_per_layer_attention_kinds_follow_the_kept_layers(teachers: dict[str, Path], tmp_path: Path) -> None:
    teacher = _load(teachers["qwen2"])
    kinds = list(teacher.config.layer_types)
    assert kinds == ["full_attention"] * 2 + ["sliding_attention"] * 3  # max_window_layers = 2
    student = _load(init_student(str(teachers["qwen2"]), 3, tmp_path / "student"))
    assert list(student.config.layer_types) == [kinds[i] for i in (0, 2, 4)]
    assert student.config.max_window_layers == 1  # only kept layer 0 lies below the teacher's 2


def test_one_layer_keeps_the_first(teachers: dict[str, Path], tmp_path: Path) -> None:
    student = _load(init_student(str(teachers["gpt2"]), 1, tmp_path / "student"))
    teacher = _load(teachers["gpt2"])
    assert student.config.n_layer == 1
    assert torch.equal(student.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[0].mlp.c_fc.weight)


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, N_TEACHER + 1])
def test_layers_out_of_range_is_a_user_error(n: int, teachers: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"--layers: must lie in 1\.\.{N_TEACHER}") as e:
        init_student(str(teachers["llama"]), n, tmp_path / "s")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_unsupported_architecture_is_a_user_error(tmp_path: Path, word_tokenizer: object) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=len(word_tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    with pytest.raises(UserError, match=r"'opt' model .*init-student supports gpt2, llama") as e:
        init_student(str(tmp_path / "opt"), 1, tmp_path / "s")
    assert "\n" not in str(e.value)


def test_refuses_to_overwrite_a_foreign_folder(teachers: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--out: .* not a student made by init-student"):
        init_student(str(teachers["llama"]), 2, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="would overwrite the teacher"):
        init_student(str(teachers["llama"]), 2, teachers["llama"])
    # a previous init-student output may be replaced
    first = init_student(str(teachers["llama"]), 2, tmp_path / "s")
    init_student(str(teachers["llama"]), 3, first)
    assert _load(first).config.num_hidden_layers == 3


def test_missing_teacher_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--from"):
        init_student(str(tmp_path / "nowhere"), 2, tmp_path / "s")
    with pytest.raises(UserError, match="GGUF file not found"):
        init_student(str(tmp_path / "absent.gguf"), 2, tmp_path / "s")


def test_cli(teachers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from minillm.cli import main

    main(["init-student", "--from", str(teachers["gpt2"]), "--layers", "2", "--out", str(tmp_path / "s")])
    assert "student saved in" in capsys.readouterr().out
    assert _load(tmp_path / "s").config.n_layer == 2
    with pytest.raises(SystemExit) as e:
        main(["init-student", "--from", str(teachers["gpt2"]), "--layers", "9", "--out", str(tmp_path / "t")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --layers") and "\n" not in err


# -- example recipes ----------------------------------------------------------------------------------

EXAMPLES = sorted((ROOT / "configs" / "examples").glob("*.yaml"))


def test_there_are_example_recipes() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_recipe_validates(path: Path) -> None:
    from minillm.config import load_config

    cfg = load_config(path)
    if cfg.method in ("sft", "minillm", "kd", "seqkd") and cfg.student.path is not None:
        cfg.validate_for_training()
