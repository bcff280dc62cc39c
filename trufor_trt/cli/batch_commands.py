"""`analyze` and `report`: a batch of images, in this process or on Ray, and its HTML report."""

import signal
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from trufor_trt.batch.analyze import AnalyzeOptions
from trufor_trt.batch.inputs import expand_inputs, output_folder_problem
from trufor_trt.batch.records import RESULTS_FILE, Record
from trufor_trt.batch.results_log import OutputFolderBusy, ResultsLogError, SummaryError
from trufor_trt.batch.summary import SUMMARY_FILE
from trufor_trt.cli.common import (ACCEPT_UNVALIDATED, BACKEND, CHECKPOINT, DECODE_SECONDS, DEVICE, EXIT_FAILED,
                                   EXIT_STOPPED, MAX_FILE, MAX_MEMORY, MAX_PIXELS, MODEL, NO_PNG, PRECISION, QUIET,
                                   SAVE_NOISEPRINT, VERDICT_MARGIN, Backend, Precision, check_checkpoint,
                                   check_results_folder, console, fail_setup, file_limit, load_runners,
                                   missing_package, random_weights_checkpoint, record_line, runner_spec, say, shown,
                                   verdict_guard, warn_unless_official)
from trufor_trt.engine.runner_spec import close_all
from trufor_trt.errors import RunnerFailure
from trufor_trt.files import sha256_file
from trufor_trt.signals import halt_on_signals


def _in_this_process(jobs: list, spec, streams: int, options: AnalyzeOptions, batch: int, workers: int,
                     verdict_margin: Optional[float]):
    """analyze's batch on runners of `spec` loaded here: (what runs it, a function (on_record,
    halt) -> records per status)."""
    from trufor_trt.batch.pipeline import analyze_batch

    guard, runners = verdict_guard(spec, verdict_margin), load_runners(spec, streams)
    if batch > 1 and not runners[0].takes_batches():
        close_all(runners)
        fail_setup(f"--batch {batch}: this {runners[0].backend} runner takes one image at a time; batches "
                   "need TensorRT engines built with `trufor-trt build --max-batch N`, or --backend torch on a GPU")
    what = f"{runners[0].backend} {runners[0].precision}, {len(runners)} runner{'s' if len(runners) > 1 else ''}"

    def analyse(on_record, halt):
        try:
            return analyze_batch(jobs, runners, options, on_record=on_record, halt=halt, batch=batch,
                                 workers=workers, guard=guard)
        finally:
            close_all(runners)
            guard.close()
    return what, analyse


def _actor_spec(spec, cpus: int, batch: int, verdict_margin: Optional[float]):
    """What each Ray actor loads: the resolved runner spec, paths as this process sees them."""
    import os

    from trufor_trt.cluster.ray_analyze import ActorSpec

    if spec.backend == "torch":
        warn_unless_official(sha256_file(spec.checkpoint))
        paths = {"checkpoint": str(spec.checkpoint)}
    else:
        warn_unless_official(spec.model.checkpoint_sha256)
        paths = {"model": str(spec.model.path)}
    return ActorSpec(replace(spec, **paths), cpus=cpus, folder=os.getcwd(), batch=batch,
                     verdict_margin=verdict_margin)


def _on_ray(jobs: list, address: str, spec, options: AnalyzeOptions, workers: int):
    """analyze's batch on Ray actors: (what runs it, a function (on_record, halt) -> records per
    status)."""
    import importlib

    try:
        importlib.import_module("ray.data")  # here, so that a missing extra is a setup error
    except ModuleNotFoundError as exc:
        fail_setup(missing_package(exc))
    from trufor_trt.cluster.ray_analyze import analyze_on_ray

    def started(actors: int, needs: dict) -> None:
        each = ", ".join(f"{value} {name.removeprefix('num_').upper()}" for name, value in needs.items())
        say(f"Ray: {actors} actor{'s' if actors > 1 else ''}, each {each} and one {spec.runner.backend} runner")

    def analyse(on_record, halt):
        return analyze_on_ray(jobs, address, spec, options, workers, on_record, halt, on_start=started)
    return f"{spec.runner.backend} {spec.runner.precision} on Ray", analyse


def _checked_jobs(inputs: list, out: Path) -> list:
    """The images the inputs name, once the output folder is known to be a safe place for them."""
    jobs = expand_inputs(inputs)
    if not jobs:
        fail_setup("no input images found in: " + " ".join(inputs))
    problem = output_folder_problem(out, inputs, jobs)
    if problem:
        fail_setup(problem)
    check_results_folder(out)
    return jobs


def _progress(enabled: bool) -> Progress:
    """A bar with the time left, in a terminal only (elsewhere `analyze` prints a line per image)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=True, disable=not enabled)


RANDOM_WEIGHTS = typer.Option(False, "--random-weights",
                              help="Try the tool without the official weights: a random checkpoint (the one "
                                   "selftest and bench use); its outputs are noise, marked official false.")
STREAMS = typer.Option(0, "--streams", min=0, help="Runners side by side in the pipeline (0: 2 with TensorRT, else 1).")
WORKERS = typer.Option(0, "--workers", min=0,
                       help="Threads decoding, postprocessing and writing (0: every core beside GPU runners, 2 "
                            "beside CPU runners); outputs are the same bytes for any N.")
BATCH = typer.Option(1, "--batch", min=1, help="Infer up to N same-size images together (TensorRT engines built "
                                               "with --max-batch, torch on a GPU); never padded or resized.")


def analyze(
    inputs: List[str] = typer.Argument(..., metavar="INPUT",
                                       help="Image files, folders (searched recursively) or globs."),
    out: Path = typer.Option(..., "--out", help="Output folder (created if needed)."),
    checkpoint: Optional[Path] = CHECKPOINT,
    model: Optional[Path] = MODEL,
    random_weights: bool = RANDOM_WEIGHTS,
    backend: Backend = BACKEND,
    precision: Precision = PRECISION,
    device: str = DEVICE,
    save_noiseprint: bool = SAVE_NOISEPRINT,
    no_png: bool = NO_PNG,
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo images even where matching outputs exist."),
    max_pixels: int = MAX_PIXELS,
    decode_seconds: float = DECODE_SECONDS,
    max_file: str = MAX_FILE,
    max_memory: Optional[str] = MAX_MEMORY,
    accept_unvalidated: bool = ACCEPT_UNVALIDATED,
    verdict_margin: Optional[float] = VERDICT_MARGIN,
    streams: int = STREAMS,
    workers: int = WORKERS,
    batch: int = BATCH,
    ray_address: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS",
        help="Run on Ray actors: local (a Ray instance on this machine, for this run), auto (the "
             "cluster this machine joined) or HOST:PORT; paths must be the same on every node."),
    ray_workers: int = typer.Option(0, "--ray-workers", min=0,
                                    help="--ray: actors, one runner each (0: one per GPU, or per --ray-cpus CPUs)."),
    ray_cpus: int = typer.Option(1, "--ray-cpus", min=1, help="--ray: cores per actor (CPU backends: its inference threads; "
                                         "GPU backends: its decoding and postprocessing threads)."),
    report: bool = typer.Option(False, "--report", help="Also write the batch's HTML report, OUT/report.html."),
    report_to: Optional[Path] = typer.Option(None, "--report-to", metavar="FILE",
                                             help="The report elsewhere than OUT/report.html (implies --report)."),
    quiet: bool = QUIET,
) -> None:
    """Analyse images: per image an .npz with map, conf, score, imgsize (+ PNGs), a line in
    results.jsonl (the log of runs) and a row in results.csv (each image's latest state)."""
    jobs = _checked_jobs(inputs, out)
    check_checkpoint(checkpoint)
    checkpoint = random_weights_checkpoint(model, checkpoint) if random_weights else checkpoint
    if ray_address is not None and (streams or workers):
        fail_setup("--streams and --workers set this process's pipeline; with --ray, --ray-workers sets the "
                   "actors and --ray-cpus each one's cores")
    options = AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint, write_png=not no_png,
                             overwrite=overwrite, max_pixels=max_pixels, max_file_bytes=file_limit(max_file),
                             decode_seconds=decode_seconds)
    spec = runner_spec(backend.value, model, checkpoint, device, precision.value, max_memory,
                      accept_unvalidated)
    if ray_address is None:
        what, analyse = _in_this_process(jobs, spec, streams, options, batch, workers, verdict_margin)
    else:
        what, analyse = _on_ray(jobs, ray_address, _actor_spec(spec, ray_cpus, batch, verdict_margin), options,
                                ray_workers)
    counts, stopped, summary_problem = _run_batch(analyse, len(jobs), what, quiet, out)
    if report or report_to is not None:
        _write_report(out, report_to)
    _say_how_it_ended(counts, stopped, summary_problem, len(jobs), out)


def _say_how_it_ended(counts: Counter, stopped: list, summary_problem, total: int, out: Path) -> None:
    """The batch's last line, and its exit code."""
    done = f"{counts['ok']} analysed, {counts['skipped']} skipped (outputs exist), {counts['error']} failed"
    if summary_problem:
        console.print(f"[red]error:[/] {shown(summary_problem)}", soft_wrap=True)
    if stopped:
        left = total - sum(counts.values())
        console.print(f"stopped by {signal.Signals(stopped[0]).name}: {done}, {left} not started "
                      "(run again to resume)", soft_wrap=True)
        raise typer.Exit(128 + stopped[0])
    console.print(f"{done}; details in {shown(str(out / RESULTS_FILE))} and {shown(str(out / SUMMARY_FILE))}",
                  soft_wrap=True)
    raise typer.Exit(EXIT_FAILED if counts["error"] or summary_problem else 0)


def _run_batch(analyse, total: int, what: str, quiet: bool, out: Path):
    """The batch with its progress: (records per status, the signals that stopped it, why
    results.csv was not rewritten or None). Exits 3 when the batch stopped: the runner failed,
    or results.jsonl could not be written."""
    # A line for every image (in a terminal above a progress bar: a user with two photos wants
    # their scores there, not in the CSV); with --quiet failures only.
    in_terminal = console.is_terminal and not quiet
    halt, stopped, counts = threading.Event(), [], Counter()
    try:
        with _progress(in_terminal) as progress, halt_on_signals(halt, stopped.append):
            task = progress.add_task(f"analysing ({what})", total=total)

            def show(record: Record) -> None:
                counts[record.status] += 1
                if record.status == "error" or not quiet:
                    progress.console.print(record_line(record), soft_wrap=True)
                progress.advance(task)

            analyse(show, halt)
    except SummaryError as exc:
        return counts, stopped, str(exc)
    except OutputFolderBusy as exc:  # another run took the folder since the check
        fail_setup(str(exc))
    except (RunnerFailure, ResultsLogError) as exc:
        console.print(f"[red]stopped[/]: {shown(str(exc))}; the images done so far are in "
                      f"{shown(str(out / RESULTS_FILE))}, run again to resume", soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED)
    return counts, stopped, None


def _write_report(out: Path, page: Optional[Path]) -> None:
    from trufor_trt.batch.report import build_report

    try:
        written = build_report(out, page)
    except (OSError, ModuleNotFoundError) as exc:
        fail_setup(f"report: {missing_package(exc) if isinstance(exc, ModuleNotFoundError) else exc}")
    console.print(f"report: {shown(str(written))}", soft_wrap=True)


def report_command(
    out: Path = typer.Argument(..., metavar="OUT", help="An output folder `analyze` wrote."),
    page: Optional[Path] = typer.Option(None, "--to", help="The page to write (default OUT/report.html)."),
) -> None:
    """(Re)build the HTML report of an output folder from its results.jsonl and files (the model
    is not run): scores, maps, overlays, failures; sortable, filterable, no network needed."""
    _write_report(out, page)
