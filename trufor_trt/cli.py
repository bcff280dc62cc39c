"""`trufor-trt`: the command line. Thin: each command parses, calls the package, sets the exit code.

Exit codes: 0 all good, 1 some images failed (the others were done), 2 usage or setup error.
Progress and messages go to stderr; stdout stays free for results.
"""

from enum import Enum
from pathlib import Path
from typing import List

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .batch.analyze import RESULTS_FILE, AnalyzeOptions, analyze_batch
from .batch.inputs import expand_inputs
from .engine import create_runner
from .engine.decode import DEFAULT_MAX_PIXELS
from .errors import TruforError

EXIT_SOME_FAILED = 1
EXIT_SETUP = 2
BACKEND_EXTRAS = {"torch": "export"}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TruFor forgery detection and localization, exported and run fast and faithfully.")
console = Console(stderr=True, highlight=False)


class Backend(str, Enum):
    torch = "torch"


def fail_setup(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(EXIT_SETUP)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"trufor-trt {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """TruFor: a localization map, a reliability map and an integrity score per image."""


def _load_runner(backend: str, checkpoint: Path, device: str):
    runner = create_runner(backend, checkpoint=checkpoint, device=device)
    try:
        runner.load()
    except TruforError as exc:
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        fail_setup(f"the {backend} backend needs the '{exc.name}' package: "
                   f"pip install \"trufor-trt[{BACKEND_EXTRAS[backend]}]\"")
    return runner


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


@app.command()
def analyze(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...",
                                       help="Image files, folders (searched recursively) or globs."),
    out: Path = typer.Option(..., "--out", help="Output folder (created if needed)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="TruFor checkpoint (trufor.pth.tar)."),
    backend: Backend = typer.Option(Backend.torch, "--backend", help="Inference backend."),
    device: str = typer.Option("auto", "--device", help="torch backend: cpu, cuda or auto."),
    save_noiseprint: bool = typer.Option(False, "--save-noiseprint", help="Also store np++ in the .npz."),
    no_png: bool = typer.Option(False, "--no-png", help="Skip the heatmap and overlay PNGs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo images whose outputs exist."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1,
                                   help="Refuse images with more pixels (decompression bombs)."),
) -> None:
    """Analyse images: per image an .npz with map, conf, score, imgsize (+ PNGs), and results.jsonl."""
    jobs = expand_inputs(inputs)
    if not jobs:
        fail_setup("no input images found in: " + " ".join(inputs))
    runner = _load_runner(backend.value, checkpoint, device)
    options = AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint, write_png=not no_png,
                             overwrite=overwrite, max_pixels=max_pixels)
    try:
        with _progress() as progress:
            task = progress.add_task("analysing", total=len(jobs))

            def report(record: dict) -> None:
                if record["status"] == "error":
                    progress.console.print(f"[red]failed[/] {record['input']}: {record['reason']}",
                                           soft_wrap=True)
                progress.advance(task)

            summary = analyze_batch(jobs, runner, options, on_record=report)
    finally:
        runner.close()
    console.print(f"{summary['ok']} analysed, {summary['skipped']} skipped (outputs exist), "
                  f"{summary['error']} failed; details in {out / RESULTS_FILE}")
    raise typer.Exit(EXIT_SOME_FAILED if summary["error"] else 0)
