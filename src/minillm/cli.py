"""The ``minillm`` command. User mistakes print one line and exit with status 2."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from minillm.errors import UserError


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=True)], force=True,
    )
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def progress_bar() -> Any:
    """A live progress display with elapsed time and an estimate of the time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), transient=False, disable=not sys.stderr.isatty() and os.environ.get("MINILLM_PROGRESS") != "1",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="minillm")
def cli(verbose: bool) -> None:
    """minillm: distil a causal LM into a smaller one with on-policy reverse KL (MiniLLM)."""
    _setup_logging(verbose)


def _load(config: str | None, overrides: tuple[str, ...]) -> Any:
    from minillm.config import load_config

    return load_config(config, list(overrides))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def train(config: str, overrides: tuple[str, ...]) -> None:
    """Train the method named by CONFIG's `method` key. OVERRIDES: dotted.key=value ..."""
    from minillm.trainer import train as run_train

    cfg = _load(config, overrides)
    with progress_bar() as bar:
        out = run_train(cfg, progress=bar if cfg.train.progress and _is_main_rank() else None)
    if _is_main_rank():
        click.echo(f"done: student saved in {out / 'final'} (best checkpoint: {out / 'best'})")


def _is_main_rank() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that prints."""
    return os.environ.get("RANK", "0") == "0"


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, help="Folder for the Hugging Face model (safetensors + tokenizer).")
@click.option("--step", type=int, default=None, help="Export this step's checkpoint (default: the newest).")
def export(run_dir: str, out: str, step: int | None) -> None:
    """Consolidate a run's checkpoint (one-process or distributed) into a Hugging Face folder."""
    from minillm.export import export as run_export

    path = run_export(Path(run_dir), Path(out), step)
    click.echo(f"exported to {path}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--out", "out", default=None, help="Output JSONL (default: output_dir/generated.jsonl).")
@click.option("--samples", default=1, show_default=True, help="Responses per prompt, one seed each.")
@click.option("--model", "which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
def generate(config: str, overrides: tuple[str, ...], out: str | None, samples: int, which: str) -> None:
    """Sample responses to data.train's prompts (SeqKD data), resumable."""
    from minillm.generate_data import run_generate

    cfg = _load(config, overrides)
    with progress_bar() as bar:
        path = run_generate(cfg, out=out, samples=samples, which=which, progress=bar)
    click.echo(f"wrote {path}")


@cli.command(name="eval")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def eval_cmd(config: str, overrides: tuple[str, ...]) -> None:
    """Evaluate eval.models on eval.test sets over eval.seeds; print the comparison table."""
    from minillm.eval.runner import run_eval

    cfg = _load(config, overrides)
    with progress_bar() as bar:
        table = run_eval(cfg, progress=bar)
    click.echo(table)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2", help="An axis of the grid (repeatable; replaces the file's axis of KEY).")
@click.option("--out", default=None, help="Sweep folder [default: the file's sweep.out, else runs/sweeps/NAME].")
@click.option("--print-commands", is_flag=True, help="Print one `minillm train ... && minillm eval ...` line per run instead of running.")
@click.option("--demo", "demo", is_flag=True, help="Run the grid on the demo's task (its teacher and SFT student are trained first).")
@click.option("--size", type=click.Choice(["quick", "default", "large"]), default="default", show_default=True,
              help="With --demo: the demo study size.")
@click.option("--device", default="auto", show_default=True, help="With --demo: auto, cpu or cuda.")
def sweep(config: str, overrides: tuple[str, ...], grids: tuple[str, ...], out: str | None, print_commands: bool,
          demo: bool, size: str, device: str) -> None:
    """Train, evaluate and compare the runs of a grid (a sweep file of configs/sweeps/, or CONFIG with --grid).
    OVERRIDES: dotted.key=value for every run."""
    from minillm.demo import SIZES
    from minillm.sweep import load_sweep, run_sweep
    from minillm.sweep import print_commands as commands

    if demo and print_commands:
        raise UserError("--print-commands with --demo: the demo's sweep runs here (its teacher and SFT student are "
                        "trained first); drop --print-commands")
    sw = load_sweep(config, list(grids), list(overrides), out, demo=SIZES[size] if demo else None, demo_size=size, device=device)
    if print_commands:
        click.echo(commands(sw))
        return
    with progress_bar() as bar:
        text = run_sweep(sw, progress=bar)
    click.echo(text)


@cli.command()
@click.option("--out", default="minillm-demo", show_default=True, help="Folder for the run folders and the report.")
@click.option("--quick", is_flag=True, help="Same as --size quick (about 35 seconds on 2 CPU cores).")
@click.option("--size", type=click.Choice(["quick", "default", "large"]), default=None,
              help="Study size: quick and default fit a laptop's CPU; large is meant for --device cuda.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", default=10, show_default=True, help="First whole-pipeline seed.")
@click.option("--seeds", type=int, default=None,
              help="Whole-pipeline seeds (teacher and students retrained per seed) [default: 3; --quick: 1].")
@click.option("--readme", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Write the demo table into this README, between its demo-table markers.")
def demo(out: str, quick: bool, size: str | None, device: str, seed: int, seeds: int | None, readme: str | None) -> None:
    """The built-in study, offline: teacher, SFT, KD, SeqKD and MiniLLM students on a generated task."""
    from minillm.demo import run_demo

    if quick and size not in (None, "quick"):
        raise click.UsageError("--quick and --size disagree; give one of them")
    with progress_bar() as bar:
        table = run_demo(Path(out), quick=quick, device=device, seed=seed, progress=bar, size=size, seeds=seeds,
                         readme=Path(readme) if readme else None)
    click.echo(table)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, help="Report folder (default: the first run folder's report/).")
def report(run_dirs: tuple[str, ...], out: str | None) -> None:
    """Write an HTML + Markdown report (tables, curves, plots) for one or more runs."""
    from minillm.report import write_report

    path = write_report([Path(d) for d in run_dirs], Path(out) if out else None)
    click.echo(f"report: {path}")


@cli.command()
@click.option("--out", default="minillm-toy", show_default=True)
def toy(out: str) -> None:
    """The paper's Figure 2: fit one Gaussian to a two-mode mixture by forward and reverse KL."""
    from minillm.toy import run_toy

    path = run_toy(Path(out))
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("dataset", type=click.Choice(["dolly"]))
@click.option("--source", default="databricks/databricks-dolly-15k", show_default=True, help="Raw JSONL file, saved dataset folder or Hub id.")
@click.option("--out", required=True, help="Folder for train/valid/test JSONL.")
@click.option("--tokenizer", default=None, help="Tokenizer used to drop prompts over --max-prompt-len (as the paper).")
@click.option("--max-prompt-len", default=256, show_default=True)
@click.option("--seed", default=10, show_default=True)
@click.option("--valid-size", default=1000, show_default=True, help="Validation records (reference scripts: --dev-num 1000).")
@click.option("--test-size", default=500, show_default=True, help="Test records (the paper's DollyEval: 500).")
def prepare(
    dataset: str, source: str, out: str, tokenizer: str | None, max_prompt_len: int, seed: int, valid_size: int, test_size: int
) -> None:
    """Turn raw Dolly into the paper's splits (1000 valid, 500 test, the rest train)."""
    from minillm.prepare import prepare_dolly

    paths = prepare_dolly(
        source, Path(out), tokenizer=tokenizer, max_prompt_len=max_prompt_len, seed=seed, valid_size=valid_size, test_size=test_size
    )
    click.echo("\n".join(f"{k}: {v}" for k, v in paths.items()))


@cli.command(name="init-student")
@click.option("--from", "source", required=True, help="Teacher: folder, Hub id or .gguf file.")
@click.option("--layers", required=True, type=int, help="Decoder layers to keep (evenly spaced).")
@click.option("--out", required=True, help="Folder for the student (Hugging Face format).")
def init_student_cmd(source: str, layers: int, out: str) -> None:
    """Build a smaller student from a teacher by keeping N evenly spaced layers."""
    from minillm.init_student import init_student

    path = init_student(source, layers, Path(out))
    click.echo(f"student saved in {path}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; a :class:`UserError` prints one line and exits with status 2.

    SIGTERM and SIGINT exit with 143 / 130 after one line: a training run first finishes its step
    and writes a checkpoint (:mod:`minillm.stopping`), other commands stop where they are."""
    import shlex

    from minillm.stopping import Interrupted, Stopped, exit_status, install_interrupt_handlers

    argv = list(sys.argv[1:] if argv is None else argv)
    install_interrupt_handlers()  # not KeyboardInterrupt: click would turn it into a bare Abort
    try:
        cli.main(args=argv, prog_name="minillm", standalone_mode=False)
    except Stopped as e:
        if _is_main_rank():
            again = "resume" if e.checkpoint is not None else "start again"
            click.echo(f"{e}; rerun the same command to {again}: minillm {shlex.join(argv)}", err=True)
        sys.exit(exit_status(e.signum))
    except Interrupted as e:
        if _is_main_rank():
            click.echo(f"{e}; finished checkpoints and written records are kept, rerun the same command to resume",
                       err=True)
        sys.exit(exit_status(e.signum))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        if _is_main_rank():  # every rank of a torchrun launch refuses the same input: say it once
            click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # a full disk or an unwritable folder met outside the writers that say so themselves
        from minillm.atomic import disk_error

        err = disk_error(e, e.filename or "a file")
        if err is None:
            raise
        if _is_main_rank():
            click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; finished checkpoints are kept, rerun the same command to resume", err=True)
        sys.exit(130)


