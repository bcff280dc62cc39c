"""`trufor-trt`: the command line. Thin: each command parses, calls the package, sets the exit code.

Exit codes: 0 all good, 1 some images failed (the others were done) or a self-test failed,
2 usage or setup error. Progress and messages go to stderr; stdout stays free for results.
"""

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .batch.analyze import RESULTS_FILE, AnalyzeOptions, analyze_batch
from .batch.inputs import expand_inputs
from .engine import BACKEND_EXTRAS, create_runner, pick_backend
from .engine.decode import DEFAULT_MAX_PIXELS
from .errors import TruforError

EXIT_FAILED = 1
EXIT_SETUP = 2

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TruFor forgery detection and localization, exported and run fast and faithfully.")
console = Console(stderr=True, highlight=False)


class Backend(str, Enum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    torch = "torch"


class Precision(str, Enum):
    fp32 = "fp32"


def fail_setup(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(EXIT_SETUP)


def say(message: str) -> None:
    console.print(f"[dim]{message}[/]", soft_wrap=True)


def _missing_package(exc: ModuleNotFoundError, extra: str) -> str:
    return f"this needs the '{exc.name}' package: pip install \"trufor-trt[{extra}]\""


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"trufor-trt {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """TruFor: a localization map, a reliability map and an integrity score per image."""


@app.command()
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="TruFor checkpoint (trufor.pth.tar)."),
    out: Path = typer.Option(..., "--out", help="Model folder to write (replaced if it exists)."),
    opset: int = typer.Option(18, "--opset", min=17, max=20, help="ONNX opset."),
) -> None:
    """Export the network to a verified ONNX model folder (graphs, detection head, manifest)."""
    try:
        from .export.bundle import export_model_dir

        manifest = export_model_dir(checkpoint, out, opset=opset, on_step=say)
    except TruforError as exc:
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc, "export"))
    worst = max(result["max_abs"]["localization_logits"]
                for result in manifest["verification"]["results"])
    console.print(f"wrote {out} ({', '.join(manifest['variants'])}); worst logit deviation from "
                  f"the float64 network {worst:.2e}")


def _open_model(model: Optional[Path], checkpoint: Optional[Path]):
    """The checked model folder for the ONNX backends: --model, else the cache for --checkpoint."""
    from .engine.model_dir import ModelDir, sha256_file

    if model is not None:
        return ModelDir.open(model, checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None)
    if checkpoint is None:
        fail_setup("give --model MODEL_DIR (from `trufor-trt export`) or --checkpoint FILE")
    from .export.cache import cached_model_dir

    return cached_model_dir(checkpoint, on_step=say)


def _load_runner(backend: str, model: Optional[Path], checkpoint: Optional[Path], device: str,
                 precision: str):
    try:
        if backend == "torch":
            if checkpoint is None:
                fail_setup("the torch backend runs from --checkpoint FILE")
            runner = create_runner("torch", checkpoint=checkpoint, device=device, precision=precision)
        else:
            runner = create_runner(backend, model=_open_model(model, checkpoint), precision=precision)
        runner.load()
    except TruforError as exc:
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc, "export" if exc.name == "torch" else BACKEND_EXTRAS[backend]))
    return runner


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


@app.command()
def analyze(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...",
                                       help="Image files, folders (searched recursively) or globs."),
    out: Path = typer.Option(..., "--out", help="Output folder (created if needed)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="TruFor checkpoint; exported once into a cache for ONNX backends."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder from `trufor-trt export`."),
    backend: Backend = typer.Option(Backend.auto, "--backend",
                                    help="auto: TensorRT where it can run, else ONNX Runtime."),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help="Numeric precision."),
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
    runner = _load_runner(pick_backend(backend.value), model, checkpoint, device, precision.value)
    options = AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint, write_png=not no_png,
                             overwrite=overwrite, max_pixels=max_pixels)
    try:
        with _progress() as progress:
            task = progress.add_task(f"analysing ({runner.backend} {runner.precision})", total=len(jobs))

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
    raise typer.Exit(EXIT_FAILED if summary["error"] else 0)


def _selftest_table(report) -> Table:
    from .selftest import BOUNDS

    table = Table(title=f"selftest: {report.backend} vs the float64 PyTorch network (max abs)")
    table.add_column("image")
    for name, bound in BOUNDS.items():
        table.add_column(f"{name} (<= {bound:g})", justify="right")
    table.add_column("ms: decode / infer / post", justify="right")
    for check in report.checks:
        times = check.times_ms
        table.add_row(f"{check.size[1]}x{check.size[0]}",
                      *(f"{check.deviations[name]:.2e}" for name in BOUNDS),
                      f"{times['decode']:.0f} / {times['inference']:.0f} / {times['postprocess']:.0f}")
    return table


@app.command()
def selftest(
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Backend to prove."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random checkpoint."),
) -> None:
    """Prove this installation end to end on a random checkpoint and synthetic images."""
    chosen = pick_backend(backend.value)
    try:
        from .selftest import run_selftest

        report = run_selftest(chosen, seed=seed, on_step=say)
    except TruforError as exc:
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc, "export" if exc.name == "torch" else BACKEND_EXTRAS[chosen]))
    Console(highlight=False).print(_selftest_table(report))
    setup = ", ".join(f"{stage} {ms / 1000:.1f} s" for stage, ms in report.setup_ms.items())
    worst = ", ".join(f"{name} {error:.2e}" for name, error in report.worst().items())
    typer.echo(f"{'PASS' if report.passed else 'FAIL'}: {chosen}; worst {worst}; setup: {setup}")
    raise typer.Exit(0 if report.passed else EXIT_FAILED)
