"""The README stays true: its config reference is the generated one, and it documents every
command, method, divergence and config section."""

from __future__ import annotations

from pathlib import Path

from minillm.config_doc import END, START, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_config_reference_is_generated_from_the_dataclasses() -> None:
    section = README.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == reference_markdown().strip(), "run `python -m minillm.config_doc README.md`"


def test_every_command_is_documented() -> None:
    from minillm.cli import cli

    for name in cli.commands:
        assert f"minillm {name}" in README, name


def test_every_method_and_divergence_is_documented() -> None:
    from minillm.losses import DIVERGENCES
    from minillm.methods import METHODS

    for name in METHODS:
        assert f"`{name}`" in README, name
    for name in DIVERGENCES:
        assert f"`{name}`" in README, name


def test_the_two_setup_commands_are_there() -> None:
    assert 'pip install "torch==2.13.0" -e . && minillm demo' in README
    assert "bash .ci/run" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci and "ruff check src tests" in ci
