"""Config loading: defaults, YAML, dotted overrides, and user errors that name file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from minillm.config import Config, config_from_dict, load_config, save_config
from minillm.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_load() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    # the paper's GPT-2 settings (Appendix C)
    assert cfg.method == "sft"
    assert cfg.train.lr == 5e-6 and cfg.train.sequences_per_step == 64
    assert cfg.minillm.alpha == 0.2 and cfg.minillm.clip == 0.2 and cfg.minillm.rollouts_per_step == 256
    assert cfg.data.max_prompt_len == 256 and cfg.data.max_len == 512


def test_yaml_values_override_defaults(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "method: minillm\ntrain:\n  lr: 1e-4\n  batch_size: 4\nminillm:\n  alpha: 0.1\n")
    cfg = load_config(p)
    assert cfg.method == "minillm"
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: coerced
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 4
    assert cfg.minillm.alpha == 0.1
    assert cfg.train.grad_accum == Config().train.grad_accum  # untouched keys keep defaults


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "")) == Config()


def test_dotted_overrides(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "train:\n  lr: 1e-3\ndata:\n  valid: v.jsonl\n")
    cfg = load_config(
        p,
        ["train.lr=1e-4", "train.adam_betas=[0.8, 0.95]", "data.valid=null", "minillm.reward_clip=5",
         "eval.seeds=[1, 2]", "data.columns={prompt: q}", "method=minillm"],
    )
    assert cfg.train.lr == pytest.approx(1e-4)  # override wins over the file
    assert cfg.train.adam_betas == [0.8, 0.95]
    assert cfg.data.valid is None
    assert cfg.minillm.reward_clip == 5.0 and isinstance(cfg.minillm.reward_clip, float)
    assert cfg.eval.seeds == [1, 2]
    assert cfg.data.columns == {"prompt": "q"}
    assert cfg.method == "minillm"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainlr", "expected dotted.key=value"),
        ("=3", "key before '=' is empty"),
        ("train.lr.x=3", "train.lr"),
        ("train=3", "expected a mapping"),
        ("foo.bar=1", "unknown key 'foo'"),
        ("train.batch_size=two", "train.batch_size: expected an integer"),
        ("train.resume=maybe", "train.resume: expected true or false"),
        ("train.max_steps=null", "train.max_steps: may not be null"),
    ],
)
def test_bad_overrides(override: str, needle: str) -> None:
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_top_level_key_names_file_line_and_suggestion(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "method: sft\nseed: 3\ntrian:\n  lr: 1e-4\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3:")
    assert "did you mean 'train'" in msg


def test_unknown_nested_key(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "method: sft\ntrain:\n  lr: 1e-4\n  lrr: 1e-4\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:4:")
    assert "'train.lrr'" in msg and "did you mean 'train.lr'" in msg


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "zzzzzz: 1\n")
    with pytest.raises(UserError, match="valid keys: .*'train'"):
        load_config(p)


def test_wrong_type_names_key_and_line(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "method: sft\ntrain:\n  lr: 1e-4\n  max_steps: abc\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:4:")
    assert "train.max_steps" in msg and "integer" in msg and "'abc'" in msg


def test_section_given_a_value(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "method: sft\ntrain: 3\n")
    with pytest.raises(UserError, match=r":2: train: expected a mapping of TrainConfig keys"):
        load_config(p)


def test_list_of_wrong_element_type(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "train:\n  adam_betas: [0.9, high]\n")
    with pytest.raises(UserError, match=r":2: train.adam_betas\[1\]: expected a number"):
        load_config(p)


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("minillm:\n  alpha: 1.0\n", 2, "minillm.alpha: must lie in [0, 1)"),
        ("minillm:\n  alpha: -0.1\n", 2, "minillm.alpha"),
        ("data:\n  max_prompt_len: 300\n  max_len: 200\n", 3, "data.max_len: must exceed data.max_prompt_len (300)"),
        ("data:\n  max_len: 256\n", 2, "data.max_len"),  # equal to the default max_prompt_len: no room left
        ("generation:\n  top_p: 0\n", 2, "generation.top_p: must lie in (0, 1]"),
        ("method: sftt\n", 1, "unknown method 'sftt'; choose one of"),
        ("train:\n  lr: 1e-3\n  min_lr: 1e-2\n", 3, "train.min_lr"),
        ("generation:\n  max_new_tokens: 600\n", 2, "must be <= data.max_len (512)"),
        ("teacher:\n  dtype: int8\n", 2, "teacher.dtype"),
        ("data:\n  columns:\n    prompts: q\n", 3, "data.columns.prompts"),
        ("data:\n  valid_size: 0\n", 2, "data.valid_size: must be >= 1"),
        ("data:\n  max_examples: 0\n", 2, "data.max_examples"),
        ("train:\n  eval_batch_size: 0\n", 2, "train.eval_batch_size: must be positive"),
        ("train:\n  save_every: 0\n", 2, "train.save_every"),
        ("train:\n  eval_max_examples: 0\n", 2, "train.eval_max_examples"),
        ("train:\n  weight_decay: -0.1\n", 2, "train.weight_decay"),
        ("train:\n  adam_betas: [2, 5]\n", 2, "train.adam_betas: must be two numbers in [0, 1)"),
        ("eval:\n  test: {a: a.jsonl}\n  formats: {b: dolly}\n", 3, "eval.formats.b: names no test set"),
        ("eval:\n  test: {a: a.jsonl}\n  formats: {a: alpaca}\n", 3, "eval.formats.a: must be one of"),
    ],
)
def test_theory_checks_name_key_and_line(tmp_path: Path, text: str, line: int, needle: str) -> None:
    p = _yaml(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}:"), msg
    assert needle in msg


def test_unknown_method_lists_every_option() -> None:
    with pytest.raises(UserError) as e:
        load_config(None, ["method=distil"])
    for name in ("sft", "minillm", "kd", "seqkd"):
        assert name in str(e.value)


def test_rollouts_per_step_must_fill_whole_optimizer_steps() -> None:
    base = ["method=minillm", "student.path=s", "teacher.path=t", "data.train=d.jsonl",
            "train.batch_size=4", "train.grad_accum=2"]
    load_config(None, [*base, "minillm.rollouts_per_step=16"]).validate_for_training()
    cfg = load_config(None, [*base, "minillm.rollouts_per_step=12"])  # loads: only training needs the check
    with pytest.raises(UserError, match=r"minillm.rollouts_per_step: must be a multiple of .* \(8\)"):
        cfg.validate_for_training()


def test_training_needs_paths() -> None:
    with pytest.raises(UserError, match="student.path: is required"):
        load_config(None).validate_for_training()
    with pytest.raises(UserError, match="data.train: is required"):
        load_config(None, ["student.path=s"]).validate_for_training()
    with pytest.raises(UserError, match="teacher.path: is required by method 'minillm'"):
        load_config(None, ["student.path=s", "data.train=d", "method=minillm", "minillm.rollouts_per_step=64"]).validate_for_training()


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "method: sft\ntrain:\n  lr: [1\n  x: 2\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:4:") and "not valid YAML" in msg


def test_top_level_list_refused(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "- method\n- sft\n")
    with pytest.raises(UserError, match="expected a mapping of config keys at the top level"):
        load_config(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        ["method=minillm", "train.lr=3e-5", "train.epochs=1.5", "minillm.reward_clip=100", "data.columns={prompt: q}",
         "eval.models={a: /x}", "train.adam_betas=[0.8, 0.9]", "student.path=s", "seed=7"],
    )
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_config_from_dict_without_file_has_no_location() -> None:
    with pytest.raises(UserError) as e:
        config_from_dict({"train": {"lrr": 1}})
    assert str(e.value).startswith("unknown key 'train.lrr'")


def _shipped_configs() -> list[Path]:
    """Every run config (the sweep files of configs/sweeps/ are checked by tests/test_sweep.py)."""
    found = {*REPO.glob("configs/**/*.yaml"), *REPO.glob("src/minillm/configs/**/*.yaml")}
    return sorted(p for p in found if "sweeps" not in p.relative_to(REPO).parts)


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    if cfg.student.path is not None and cfg.data.train is not None:
        cfg.validate_for_training()  # a training config must also pass the training-time checks


def test_errors_from_overrides_name_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A bad key or value given on the command line is reported as such, not as a line of the file."""
    p = tmp_path / "c.yaml"
    p.write_text("method: sft\ntrain:\n  lr: 1.0e-4\n")
    for override, expected in [
        ("trian.lr=3", "command-line override 'trian.lr=3': unknown key 'trian'; did you mean 'train'?"),
        ("train.lr=abc", "command-line override 'train.lr=abc': train.lr: expected a number"),
        ("minillm.alpha=1.5", "command-line override 'minillm.alpha=1.5': minillm.alpha: must lie in [0, 1)"),
    ]:
        with pytest.raises(UserError) as err:
            load_config(p, [override])
        assert str(err.value).startswith(expected)
    with pytest.raises(UserError, match=r"c\.yaml:3: train\.lr"):
        p.write_text("method: sft\ntrain:\n  lr: abc\n")
        load_config(p)


def test_exposure_protocols_default_and_bad_name() -> None:
    assert Config().eval.exposure_protocols == ["fixed_length", "length_fair"]
    cfg = config_from_dict({"eval": {"exposure_protocols": ["to_eos"]}})
    assert cfg.eval.exposure_protocols == ["to_eos"]
    with pytest.raises(UserError) as e:
        config_from_dict({"eval": {"exposure_protocols": ["fixed_length", "fair"]}})
    msg = str(e.value)
    assert msg.startswith("eval.exposure_protocols: unknown protocol 'fair'") and "length_fair" in msg and "to_eos" in msg
    with pytest.raises(UserError, match="names a protocol twice"):
        config_from_dict({"eval": {"exposure_protocols": ["to_eos", "to_eos"]}})


def test_old_exposure_stop_at_eos_key_says_what_to_use(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "eval:\n  exposure_bias: true\n  exposure_stop_at_eos: true\n")
    with pytest.raises(UserError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:3:" in msg and "eval.exposure_stop_at_eos was removed" in msg
    assert "eval.exposure_protocols" in msg and "[to_eos] for true" in msg
