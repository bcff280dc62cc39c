"""`trufor-trt`: the command line. Thin: each command parses, calls the package, sets the exit code.

Exit codes: 0 all good, 1 some images failed (the others were done), results.csv could not be
rewritten, or a self-test failed; 2 usage or setup error; 3 the batch stopped: the runner itself
failed, or results.jsonl could not be written; 128 + N stopped by signal N (Ctrl-C: 130).
Progress and messages go to stderr; stdout stays free for results.
"""

import signal
import threading
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from trufor_trt import __version__
from trufor_trt.batch.analyze import AnalyzeOptions
from trufor_trt.batch.inputs import expand_inputs, output_folder_problem
from trufor_trt.batch.provenance import not_official_warning
from trufor_trt.batch.records import RESULTS_FILE
from trufor_trt.batch.results_log import OutputFolderBusy, ResultsLogError, SummaryError, check_not_busy
from trufor_trt.batch.summary import SUMMARY_FILE
from trufor_trt.engine import create_runner, pick_backend
from trufor_trt.engine.decode import DEFAULT_MAX_PIXELS, separate_python_stderr
from trufor_trt.errors import RunnerFailure, TruforError
from trufor_trt.files import sha256_file
from trufor_trt.installed import install_command
from trufor_trt.signals import halt_on_signals, stop_on_signals

EXIT_FAILED = 1
EXIT_SETUP = 2
EXIT_STOPPED = 3

# Plain help: typer's rich help shows every flag as taking a value ("--fp16 <bool>").
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="TruFor forgery detection and localization, exported and run fast and faithfully.")
console = Console(stderr=True, highlight=False)


class Backend(str, Enum):
    auto = "auto"
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"
    torch = "torch"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class SelftestPrecision(str, Enum):
    """selftest proves fp32 and fp16 against fixed bounds; int8 is judged on real images."""

    fp32 = "fp32"
    fp16 = "fp16"


def fail_setup(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(EXIT_SETUP)


def say(message: str) -> None:
    console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[bold yellow]{escape(message)}[/]", soft_wrap=True)


def run() -> None:
    """The `trufor-trt` command."""
    separate_python_stderr()
    app(prog_name="trufor-trt")


def _missing_package(exc: ModuleNotFoundError) -> str:
    module = (exc.name or "").split(".")[0]
    return f"this needs the '{module}' package: {install_command(module)}"


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
    out: Path = typer.Option(..., "--out", help="Model folder to write (FP32: replaced if it exists)."),
    opset: int = typer.Option(18, "--opset", min=17, max=20, help="ONNX opset."),
    precision: Precision = typer.Option(Precision.fp32, "--precision",
                                        help="fp16 / int8: add that variant to the model folder."),
    calib_images: Optional[Path] = typer.Option(None, "--calib-images",
                                                help="Real images to measure fp16 / calibrate int8 on; "
                                                     "include full-size ones (the largest 2 are measured whole)."),
    max_shape: str = typer.Option("2048x2048", "--max-shape",
                                  help="HxW: the largest image the variant's engines will take "
                                       "(build --max-shape); the plan is checked at full size up to it."),
) -> None:
    """Export the network to a verified ONNX model folder, or add an FP16 / INT8 variant to it."""
    if precision != Precision.fp32 and calib_images is None:
        fail_setup(f"--precision {precision.value} needs --calib-images DIR (real images)")
    _check_checkpoint(checkpoint)
    try:
        from trufor_trt.engine.model_dir import ModelDir, ModelDirError
        from trufor_trt.export.bundle import export_model_dir

        try:
            manifest = ModelDir.open(out, checkpoint_sha256=sha256_file(checkpoint)).manifest
            fresh = precision == Precision.fp32
        except ModelDirError:
            fresh = True
        if fresh:
            manifest = export_model_dir(checkpoint, out, opset=opset, on_step=say)
            worst = max(result["max_abs"]["localization_logits"]
                        for result in manifest["verification"]["results"])
            console.print(f"wrote {escape(str(out))} ({', '.join(manifest['variants'])}); worst logit deviation "
                          f"from the float64 network {worst:.2e}")
        if precision != Precision.fp32:
            from trufor_trt.export.variants import add_precision_variant

            from trufor_trt.shapes import parse_shape

            entry = add_precision_variant(out, precision.value, calib_images, max_shape=parse_shape(max_shape),
                                          on_step=say)
            _print_variant(out, precision.value, entry)
    except TruforError as exc:
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc))


def _print_variant(out: Path, precision: str, entry: dict) -> None:
    measured = ", ".join(f"{name} {error:.2e}" for name, error in entry["deviation_vs_fp32"]["max_abs"].items())
    console.print(f"added {precision} to {escape(str(out))}; deviation from fp32 (worst of "
                  f"{', '.join(entry['deviation_vs_fp32']['sizes'])}): {measured}")
    for record in entry["flops_by_precision"]:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in record["network_share"].items() if share)
        console.print(f"FLOPs at {record['size']}: {shares}")
    if "warning" in entry["size_coverage"]:
        say("warning: " + entry["size_coverage"]["warning"])


def _check_checkpoint(checkpoint: Optional[Path]) -> None:
    """A mistyped --checkpoint is said at once, not after the model's load time."""
    if checkpoint is not None and not checkpoint.is_file():
        fail_setup(f"--checkpoint {checkpoint}: " + ("not a file" if checkpoint.exists() else "no such file"))


def _check_output_folder(out: Path, option: str = "--out") -> None:
    """The output folder exists or can be made, and takes files: checked before any model loads."""
    import tempfile

    if out.exists() and not out.is_dir():
        fail_setup(f"{option} {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        fail_setup(f"{option} {out}: cannot be written ({exc.strerror or exc})")


def _check_results_folder(out: Path) -> None:
    """An output folder that takes results: writable, and no other run writing into it."""
    _check_output_folder(out)
    _check_not_busy(out)


def _check_not_busy(out: Path) -> None:
    try:
        check_not_busy(out)
    except OutputFolderBusy as exc:
        fail_setup(str(exc))


def _open_model(model: Optional[Path], checkpoint: Optional[Path]):
    """The checked model folder for the ONNX backends: --model, else the cache for --checkpoint."""
    from trufor_trt.engine.model_dir import ModelDir

    if model is not None:
        return ModelDir.open(model, checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None)
    if checkpoint is None:
        fail_setup("give --model MODEL_DIR (from `trufor-trt export`) or --checkpoint FILE")
    from trufor_trt.export.cache import cached_model_dir

    return cached_model_dir(checkpoint, on_step=say)


def _load_runners(backend: str, model: Optional[Path], checkpoint: Optional[Path], device: str,
                  precision: str, max_memory: Optional[str] = None, streams: int = 1) -> list:
    """`streams` loaded runners for the requested backend (auto resolved here; 0 streams: 2 for
    TensorRT, which overlaps engines on one GPU, else 1). CPU runners side by side share the
    cores and the memory budget."""
    import os

    runners = []
    try:
        from trufor_trt.engine.memory_budget import parse_memory, physical_memory

        budget = parse_memory(max_memory) if max_memory else None
        if backend != "torch":
            opened = _open_model(model, checkpoint)
            backend = pick_backend(backend, opened.path, precision, on_notice=say)
        elif checkpoint is None:
            fail_setup("the torch backend runs from --checkpoint FILE")
        count = streams or (2 if backend == "tensorrt" else 1)
        threads = max(1, (os.cpu_count() or 1) // count) if count > 1 else 0
        if count > 1 and budget is None and backend != "tensorrt":
            budget = physical_memory()
        share = budget // count if budget else None
        for _ in range(count):
            runners.append(create_runner(backend, checkpoint=checkpoint, model=None if backend == "torch" else opened,
                                         device=device, precision=precision, threads=threads,
                                         max_memory_bytes=share))
            runners[-1].load()
    except TruforError as exc:
        _close_all(runners)
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        _close_all(runners)
        fail_setup(_missing_package(exc))
    _warn_unless_official(runners[0].model_sha256)
    return runners


def _warn_unless_official(model_sha256: Optional[str]) -> None:
    warning = not_official_warning(model_sha256)
    if warning:
        warn(warning)


def _close_all(runners: list) -> None:
    for runner in runners:
        runner.close()


def _load_runner(backend: str, model: Optional[Path], checkpoint: Optional[Path], device: str,
                 precision: str, max_memory: Optional[str] = None):
    """One loaded runner for the requested backend (auto resolved here)."""
    return _load_runners(backend, model, checkpoint, device, precision, max_memory)[0]


def _in_this_process(jobs: list, runners: list, options: AnalyzeOptions, batch: int):
    """analyze's batch on loaded runners: a function (on_record, halt) -> records per status."""
    from trufor_trt.batch.pipeline import analyze_batch

    def analyse(on_record, halt):
        try:
            return analyze_batch(jobs, runners, options, on_record=on_record, halt=halt, batch=batch)
        finally:
            _close_all(runners)
    return analyse


def _ray_runner_spec(backend: str, model: Optional[Path], checkpoint: Optional[Path], device: str,
                     precision: str, max_memory: Optional[str], cpus: int, batch: int):
    """What each Ray actor loads: the backend resolved here, paths as this process sees them."""
    import os

    from trufor_trt.cluster.ray_analyze import RunnerSpec
    from trufor_trt.engine.memory_budget import parse_memory

    try:
        budget = parse_memory(max_memory) if max_memory else None
        if backend == "torch":
            if checkpoint is None:
                fail_setup("the torch backend runs from --checkpoint FILE")
            _warn_unless_official(sha256_file(checkpoint))
            return RunnerSpec(backend, precision, checkpoint=str(checkpoint), device=device, cpus=cpus,
                              max_memory=budget, folder=os.getcwd(), batch=batch)
        opened = _open_model(model, checkpoint)
        backend = pick_backend(backend, opened.path, precision, on_notice=say)
        _warn_unless_official(opened.checkpoint_sha256)
    except TruforError as exc:
        fail_setup(str(exc))
    return RunnerSpec(backend, precision, model=str(opened.path), cpus=cpus, max_memory=budget, folder=os.getcwd(),
                      batch=batch)


def _on_ray(jobs: list, address: str, spec, options: AnalyzeOptions, workers: int):
    """analyze's batch on Ray actors: a function (on_record, halt) -> records per status."""
    import importlib

    try:
        importlib.import_module("ray.data")  # here, so that a missing extra is a setup error
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc))
    from trufor_trt.cluster.ray_analyze import analyze_on_ray

    def started(actors: int, needs: dict) -> None:
        each = ", ".join(f"{value} {name.removeprefix('num_').upper()}" for name, value in needs.items())
        say(f"Ray: {actors} actor{'s' if actors > 1 else ''}, each {each} and one {spec.backend} runner")

    def analyse(on_record, halt):
        try:
            return analyze_on_ray(jobs, address, spec, options, workers, on_record, halt, on_start=started)
        except RunnerFailure:
            raise  # analyze reports it: the job stopped
        except TruforError as exc:  # the cluster cannot host the actors
            fail_setup(str(exc))
    return analyse


def _progress(enabled: bool) -> Progress:
    """A bar with the time left, in a terminal only (elsewhere `analyze` prints a line per image)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=True, disable=not enabled)


def _record_line(record: dict) -> str:
    """One image's outcome as one line: what logs and `--quiet` keep (failures only)."""
    name = escape(record["input"])
    if record["status"] == "error":
        return f"[red]failed[/] {name}: {escape(record['reason'])}"
    score = f"score {record['score']:.4f}" if record.get("score") is not None else "no score"
    if record["status"] == "skipped":
        return f"skipped {name}: {score} (outputs exist)"
    seconds = record["times_ms"].get("total", 0) / 1000
    why = f" ({escape(record['reason'])})" if record["reason"] else ""
    return f"{name}: {score}, {seconds:.1f} s{why}"


# The options of every command that analyses images (analyze, watch, serve).
CHECKPOINT = typer.Option(None, "--checkpoint",
                          help="TruFor checkpoint; exported once into a cache for ONNX backends.")
MODEL = typer.Option(None, "--model", help="Model folder from `trufor-trt export`.")
BACKEND = typer.Option(Backend.auto, "--backend", help="auto: TensorRT where it can run, else ONNX Runtime.")
PRECISION = typer.Option(Precision.fp32, "--precision", help="Numeric precision.")
DEVICE = typer.Option("auto", "--device", help="torch backend: cpu, cuda or auto.")
SAVE_NOISEPRINT = typer.Option(False, "--save-noiseprint", help="Also store np++ in the .npz.")
NO_PNG = typer.Option(False, "--no-png", help="Skip the heatmap and overlay PNGs.")
MAX_PIXELS = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1,
                          help="Refuse images with more pixels (decompression bombs).")
MAX_MEMORY = typer.Option(None, "--max-memory",
                          help="Host memory budget per image on the CPU, e.g. 8G (default: physical "
                               "memory); bands follow from it.")
QUIET = typer.Option(False, "--quiet", help="No progress: failures and the summary only.")


@app.command()
def analyze(
    inputs: List[str] = typer.Argument(..., metavar="INPUT",
                                       help="Image files, folders (searched recursively) or globs."),
    out: Path = typer.Option(..., "--out", help="Output folder (created if needed)."),
    checkpoint: Optional[Path] = CHECKPOINT,
    model: Optional[Path] = MODEL,
    backend: Backend = BACKEND,
    precision: Precision = PRECISION,
    device: str = DEVICE,
    save_noiseprint: bool = SAVE_NOISEPRINT,
    no_png: bool = NO_PNG,
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo images even where matching outputs exist."),
    max_pixels: int = MAX_PIXELS,
    max_memory: Optional[str] = MAX_MEMORY,
    streams: int = typer.Option(0, "--streams", min=0,
                                help="Runners side by side in the pipeline (0: 2 with TensorRT, else 1)."),
    batch: int = typer.Option(1, "--batch", min=1,
                              help="Infer up to N same-size images together (TensorRT engines built "
                                   "with --max-batch, torch on a GPU); never padded or resized."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS",
        help="Run on Ray actors: local (a Ray instance on this machine, for this run), auto (the "
             "cluster this machine joined) or HOST:PORT; paths must be the same on every node."),
    ray_workers: int = typer.Option(0, "--ray-workers", min=0,
                                    help="--ray: actors, one runner each (0: one per GPU, or per --ray-cpus CPUs)."),
    ray_cpus: int = typer.Option(1, "--ray-cpus", min=1, help="--ray, CPU backends: cores per actor."),
    report: bool = typer.Option(False, "--report", help="Also write the batch's HTML report, OUT/report.html."),
    report_to: Optional[Path] = typer.Option(None, "--report-to", metavar="FILE",
                                             help="The report elsewhere than OUT/report.html (implies --report)."),
    quiet: bool = QUIET,
) -> None:
    """Analyse images: per image an .npz with map, conf, score, imgsize (+ PNGs), a line in
    results.jsonl (the log of runs) and a row in results.csv (each image's latest state)."""
    try:
        jobs = expand_inputs(inputs)
    except TruforError as exc:
        fail_setup(str(exc))
    if not jobs:
        fail_setup("no input images found in: " + " ".join(inputs))
    problem = output_folder_problem(out, inputs, jobs)
    if problem:
        fail_setup(problem)
    _check_results_folder(out)
    _check_checkpoint(checkpoint)
    if ray_address is not None and streams:
        fail_setup("--streams sets runners in this process; with --ray, --ray-workers sets the actors")
    options = AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint, write_png=not no_png,
                             overwrite=overwrite, max_pixels=max_pixels)
    if ray_address is None:
        runners = _load_runners(backend.value, model, checkpoint, device, precision.value, max_memory, streams)
        if batch > 1 and not runners[0].takes_batches():
            _close_all(runners)
            fail_setup(f"--batch {batch}: this {runners[0].backend} runner takes one image at a time; batches "
                       "need TensorRT engines built with `trufor-trt build --max-batch N`, or --backend torch on a GPU")
        what = f"{runners[0].backend} {runners[0].precision}, {len(runners)} runner{'s' if len(runners) > 1 else ''}"
        analyse = _in_this_process(jobs, runners, options, batch)
    else:
        spec = _ray_runner_spec(backend.value, model, checkpoint, device, precision.value, max_memory, ray_cpus,
                                batch)
        what = f"{spec.backend} {spec.precision} on Ray"
        analyse = _on_ray(jobs, ray_address, spec, options, ray_workers)
    counts, stopped, summary_problem = _run_batch(analyse, len(jobs), what, quiet, out)
    done = f"{counts['ok']} analysed, {counts['skipped']} skipped (outputs exist), {counts['error']} failed"
    if report or report_to is not None:
        _write_report(out, report_to)
    if summary_problem:
        console.print(f"[red]error:[/] {escape(summary_problem)}", soft_wrap=True)
    if stopped:
        left = len(jobs) - sum(counts.values())
        console.print(f"stopped by {signal.Signals(stopped[0]).name}: {done}, {left} not started "
                      "(run again to resume)", soft_wrap=True)
        raise typer.Exit(128 + stopped[0])
    console.print(f"{done}; details in {escape(str(out / RESULTS_FILE))} and {escape(str(out / SUMMARY_FILE))}",
                  soft_wrap=True)
    raise typer.Exit(EXIT_FAILED if counts["error"] or summary_problem else 0)


def _run_batch(analyse, total: int, what: str, quiet: bool, out: Path):
    """The batch with its progress: (records per status, the signals that stopped it, why
    results.csv was not rewritten or None). Exits 3 when the batch stopped: the runner failed,
    or results.jsonl could not be written."""
    # In a terminal a progress bar, and a line for each failure or redone image; in a log a
    # line for every image; with --quiet failures only.
    in_terminal = console.is_terminal and not quiet
    halt, stopped, counts = threading.Event(), [], Counter()
    try:
        with _progress(in_terminal) as progress, halt_on_signals(halt, stopped.append):
            task = progress.add_task(f"analysing ({what})", total=total)

            def show(record: dict) -> None:
                counts[record["status"]] += 1
                noteworthy = record["status"] == "error" or (record["status"] == "ok" and record["reason"])
                if record["status"] == "error" or (not quiet and (noteworthy or not in_terminal)):
                    progress.console.print(_record_line(record), soft_wrap=True)
                progress.advance(task)

            analyse(show, halt)
    except SummaryError as exc:
        return counts, stopped, str(exc)
    except OutputFolderBusy as exc:  # another run took the folder since the check
        fail_setup(str(exc))
    except (RunnerFailure, ResultsLogError) as exc:
        console.print(f"[red]stopped[/]: {escape(str(exc))}; the images done so far are in "
                      f"{escape(str(out / RESULTS_FILE))}, run again to resume", soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED)
    return counts, stopped, None


def _write_report(out: Path, page: Optional[Path]) -> None:
    from trufor_trt.batch.report import build_report

    try:
        written = build_report(out, page)
    except (OSError, ModuleNotFoundError) as exc:
        fail_setup(f"report: {_missing_package(exc) if isinstance(exc, ModuleNotFoundError) else exc}")
    console.print(f"report: {escape(str(written))}", soft_wrap=True)


@app.command("report")
def report_command(
    out: Path = typer.Argument(..., metavar="OUT", help="An output folder `analyze` wrote."),
    page: Optional[Path] = typer.Option(None, "--to", help="The page to write (default OUT/report.html)."),
) -> None:
    """(Re)build the HTML report of an output folder from its results.jsonl and files (the model
    is not run): scores, maps, overlays, failures; sortable, filterable, no network needed."""
    _write_report(out, page)


def _check_watch_folders(inbox: Path, folders: dict) -> None:
    """The inbox is a folder; --out / --done / --failed are writable and neither inside it (their
    files would be watched too) nor each other."""
    if not inbox.is_dir():
        fail_setup(f"INBOX {inbox}: " + ("not a folder" if inbox.exists() else "no such folder"))
    from trufor_trt.service.inbox import is_inside

    for option, folder in folders.items():
        if is_inside(folder, inbox):
            fail_setup(f"{option} {folder}: inside INBOX {inbox}; put it beside it")
    if len({folder.resolve() for folder in folders.values()}) < len(folders):
        fail_setup("--out, --done and --failed must be different folders")
    for option, folder in folders.items():
        _check_output_folder(folder, option)
    _check_not_busy(folders["--out"])


@app.command()
def watch(
    inbox: Path = typer.Argument(..., metavar="INBOX", help="Folder to watch (its subfolders too)."),
    out: Path = typer.Option(..., "--out", help="Output folder: what `analyze INBOX --out DIR` writes."),
    done: Optional[Path] = typer.Option(None, "--done", help="Move each analysed original here."),
    failed: Optional[Path] = typer.Option(None, "--failed", help="Move each original that failed here."),
    poll: float = typer.Option(5.0, "--poll", min=0.1,
                               help="Seconds between full rescans (file systems without change events)."),
    settle: float = typer.Option(2.0, "--settle", min=0.0,
                                 help="Seconds a file's size and time must stay unchanged before it is read."),
    checkpoint: Optional[Path] = CHECKPOINT,
    model: Optional[Path] = MODEL,
    backend: Backend = BACKEND,
    precision: Precision = PRECISION,
    device: str = DEVICE,
    save_noiseprint: bool = SAVE_NOISEPRINT,
    no_png: bool = NO_PNG,
    max_pixels: int = MAX_PIXELS,
    max_memory: Optional[str] = MAX_MEMORY,
    quiet: bool = QUIET,
) -> None:
    """Analyse every image that appears in INBOX (and those there at start), one runner kept
    loaded; SIGTERM / Ctrl-C stop after the image in hand. A restart after a crash neither loses
    nor repeats an image: the outputs and results.jsonl are the record."""
    from trufor_trt.service.watch import Watch, WatchOptions

    folders = {option: folder for option, folder in (("--out", out), ("--done", done), ("--failed", failed))
               if folder is not None}
    _check_watch_folders(inbox, folders)
    _check_checkpoint(checkpoint)
    runner = _load_runner(backend.value, model, checkpoint, device, precision.value, max_memory)
    options = WatchOptions(AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint, write_png=not no_png,
                                          max_pixels=max_pixels),
                           done_dir=done, failed_dir=failed, poll=poll, settle=settle)

    counts = Counter()

    def report(record: dict) -> None:
        counts[record["status"]] += 1
        if record["status"] == "error" or not quiet:
            console.print(_record_line(record), soft_wrap=True)

    say(f"watching {inbox} ({runner.backend} {runner.precision}); SIGTERM or Ctrl-C stops after the image in hand")
    try:
        with stop_on_signals(threading.Event()) as stop:
            Watch(inbox, runner, options, stop, on_record=report, on_notice=say).run()
    except OutputFolderBusy as exc:
        fail_setup(str(exc))
    except (RunnerFailure, ResultsLogError) as exc:  # a supervisor (systemd: Restart=on-failure) starts it again
        console.print(f"[red]stopped[/]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED)
    except SummaryError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    finally:
        runner.close()
    console.print(f"stopped: {counts['ok']} analysed, {counts['error']} failed in this run; details in "
                  f"{escape(str(out / RESULTS_FILE))}", soft_wrap=True)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any but loopback needs --token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    token: Optional[str] = typer.Option(None, "--token", envvar="TRUFOR_TRT_TOKEN",
                                        help="Bearer token every route but /healthz requires "
                                             "(or the TRUFOR_TRT_TOKEN environment variable)."),
    max_queue: int = typer.Option(8, "--max-queue", min=0,
                                  help="Requests that may wait for the runner; beyond: 503 + Retry-After."),
    max_body: str = typer.Option("64M", "--max-body", help="Largest request body, e.g. 64M; beyond: 413."),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="Also write what `analyze` writes, named by the image's SHA-256."),
    checkpoint: Optional[Path] = CHECKPOINT,
    model: Optional[Path] = MODEL,
    backend: Backend = BACKEND,
    precision: Precision = PRECISION,
    device: str = DEVICE,
    save_noiseprint: bool = SAVE_NOISEPRINT,
    no_png: bool = NO_PNG,
    max_pixels: int = MAX_PIXELS,
    max_memory: Optional[str] = MAX_MEMORY,
) -> None:
    """HTTP API: POST /v1/analyze (the image as the body or multipart field "image"; ?outputs=map
    adds the maps), GET /healthz, /readyz, /metrics. One runner, one inference at a time."""
    from trufor_trt.engine.memory_budget import parse_memory
    from trufor_trt.service.serve import is_loopback, serve_app

    if not is_loopback(host) and not token:
        fail_setup(f"--host {host} is reachable from other machines: give --token (or TRUFOR_TRT_TOKEN)")
    try:
        from trufor_trt.service.http_app import ServeSettings, create_app

        settings = ServeSettings(AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint,
                                                write_png=not no_png, overwrite=True, max_pixels=max_pixels),
                                 token=token, max_queue=max_queue, max_body=parse_memory(max_body))
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc))
    except (TruforError, ValueError) as exc:
        fail_setup(f"--max-body {max_body}: {exc}")
    if out is not None:
        _check_results_folder(out)
    _check_checkpoint(checkpoint)
    runner = _load_runner(backend.value, model, checkpoint, device, precision.value, max_memory)
    say(f"serving {runner.backend} {runner.precision} on http://{host}:{port}; SIGTERM or Ctrl-C "
        "stops after the requests in hand")
    app = create_app(runner, settings)
    try:
        started = serve_app(app, host, port)
    finally:
        runner.close()
    if not started:
        fail_setup(f"the server did not start on {host}:{port} (see the message above)")
    if app.state.service.failure is not None:
        console.print(f"[red]stopped[/]: {escape(app.state.service.failure)}", soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED)


def _selftest_table(report) -> Table:
    from trufor_trt.selftest import bounds_for

    table = Table(title=f"selftest: {report.backend} {report.precision} vs the float64 PyTorch "
                        "network (max abs)")
    table.add_column("image")
    for name, bound in bounds_for(report.precision).items():
        table.add_column(f"{name} (<= {bound:g})", justify="right")
    table.add_column("ms: decode / infer / post", justify="right")
    for check in report.checks:
        times = check.times_ms
        table.add_row(f"{check.size[1]}x{check.size[0]}",
                      *(f"{check.deviations[name]:.2e}" for name in check.bounds),
                      f"{times['decode']:.0f} / {times['inference']:.0f} / {times['postprocess']:.0f}")
    return table


@app.command()
def selftest(
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Backend to prove."),
    precision: SelftestPrecision = typer.Option(SelftestPrecision.fp32, "--precision",
                                                help="int8 is judged on real images: `validate`."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random checkpoint."),
) -> None:
    """Prove this installation end to end on a random checkpoint and synthetic images
    (with --backend tensorrt: a small-profile engine built on this GPU)."""
    chosen = "onnxruntime" if backend == Backend.auto else backend.value
    try:
        from trufor_trt.selftest import run_selftest

        report = run_selftest(chosen, precision=precision.value, seed=seed, on_step=say)
    except TruforError as exc:
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc))
    Console(highlight=False).print(_selftest_table(report))
    setup = ", ".join(f"{stage} {ms / 1000:.1f} s" for stage, ms in report.setup_ms.items())
    worst = ", ".join(f"{name} {error:.2e}" for name, error in report.worst().items())
    typer.echo(f"{'PASS' if report.passed else 'FAIL'}: {chosen} {report.precision}; worst {worst}; "
               f"setup: {setup}")
    raise typer.Exit(0 if report.passed else EXIT_FAILED)


def _doctor_lines(report: dict) -> list:
    """The doctor's report as plain lines: what a user pastes into a bug report."""
    cuda, tensorrt = report["cuda"], report["tensorrt"]
    lines = [f"trufor-trt {report['trufor_trt']}, Python {report['python']}, {report['platform']}",
             "packages: " + ", ".join(f"{name} {version or '-'}" for name, version in report["packages"].items())]
    if cuda["layer"]:
        lines.append(f"CUDA: layer {cuda['layer']}, driver supports CUDA {cuda['driver_cuda_version']}")
        lines += [f"  GPU {gpu['index']}: {gpu['name']}, sm {gpu['compute_capability']}, {gpu['memory_gib']} GiB"
                  f"{', integrated' if gpu['integrated'] else ''}" for gpu in cuda["gpus"]]
    else:
        lines.append(f"CUDA: none ({cuda['problem']})")
    lines.append(f"TensorRT: {tensorrt['version'] or 'none'}; can build here: "
                 f"{'yes' if tensorrt['can_build'] else 'no (' + tensorrt['problem'] + ')'}")
    for name, backend in report["backends"].items():
        details = ", ".join(backend.get("devices") or backend.get("providers") or [])
        state = f"usable{f' ({details})' if details else ''}" if backend["usable"] else \
            f"not usable: {backend['problem']}"
        wanted = backend.get("install")
        install = f"; install: {wanted}" if wanted and "install" not in backend["problem"] else ""
        lines.append(f"backend {name}: {state}{install}")
    memory = report["cpu_memory"]
    lines.append(f"CPU memory: {memory['physical_gib']} GiB; ONNX Runtime takes images up to about "
                 f"{memory['onnxruntime_largest_square_image']} within it")
    if "model" in report:
        model = report["model"]
        state = f"ok, variants {', '.join(model['variants'])}" if model["ok"] else model["problem"]
        lines.append(f"model {model['path']}: {state}")
        lines += [f"  engine {entry['engine']}: "
                  + ("runs here" if entry["runs_here"] else f"not here ({entry['why_not']})")
                  for entry in model.get("engines", [])]
    return lines


cache_app = typer.Typer(help="The export cache: model folders exported from --checkpoint runs.",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list() -> None:
    """Each cached model folder and checkpoint: size, and whether it is usable."""
    from trufor_trt.export.cache import cache_entries, cache_root

    entries = cache_entries()
    for entry in entries:
        typer.echo(f"{entry['path']}  {entry['bytes'] / 2 ** 20:.0f} MiB  {entry['kind']}: {entry['state']}")
    total = sum(entry["bytes"] for entry in entries)
    typer.echo(f"{len(entries)} entries, {total / 2 ** 20:.0f} MiB in {cache_root()}")


@cache_app.command("clean")
def cache_clean() -> None:
    """Remove every cached model folder and checkpoint (they are made again when needed)."""
    from trufor_trt.export.cache import cache_root, clean_cache

    freed = clean_cache()
    typer.echo(f"freed {freed / 2 ** 20:.0f} MiB in {cache_root()}")


@app.command()
def doctor(
    model: Optional[Path] = typer.Option(None, "--model", help="Also check this model folder and its engines."),
    json_output: bool = typer.Option(False, "--json", help="The report as JSON on stdout."),
) -> None:
    """What this machine can run: packages, GPUs, CUDA, TensorRT, each backend and why not."""
    import json

    from trufor_trt.doctor import diagnose

    report = diagnose(model)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        for line in _doctor_lines(report):
            typer.echo(line)


@app.command()
def build(
    model: Path = typer.Option(Path("trufor-model"), "--model", help="Model folder from `trufor-trt export`."),
    fp16: bool = typer.Option(False, "--fp16", help="Build the FP16 variant."),
    int8: bool = typer.Option(False, "--int8", help="Build the INT8 variant."),
    fp32: bool = typer.Option(False, "--fp32", help="Build the FP32 graph."),
    min_shape: Optional[str] = typer.Option(None, "--min-shape", help="HxW; default 32x32."),
    opt_shape: Optional[str] = typer.Option(None, "--opt-shape",
                                            help="HxW; default 768x768 on a Jetson, 1024x1024 else."),
    max_shape: Optional[str] = typer.Option(None, "--max-shape",
                                            help="HxW; default 1536x1536 on a Jetson, 2048x2048 else."),
    max_batch: int = typer.Option(1, "--max-batch", min=1,
                                  help="Largest batch of same-size images (analyze --batch); default 1."),
    workspace: float = typer.Option(4.0, "--workspace", min=0.25, help="Builder workspace, GiB."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Loaded and saved."),
) -> None:
    """Build a TensorRT engine for this GPU (like trtexec): one profile, timing cache, sidecar."""
    chosen = [name for name, wanted in (("fp16", fp16), ("int8", int8), ("fp32", fp32)) if wanted]
    if len(chosen) != 1:
        fail_setup("choose exactly one of --fp16, --int8, --fp32")
    try:
        from trufor_trt.export.tensorrt_build import build_engine

        engine = build_engine(model, chosen[0], workspace_gib=workspace, timing_cache_path=timing_cache,
                              min_shape=min_shape, opt_shape=opt_shape, max_shape=max_shape, max_batch=max_batch,
                              on_step=say)
    except TruforError as exc:
        fail_setup(str(exc))
    console.print(f"wrote {escape(str(engine))}")


def _validation_table(report) -> Table:
    table = Table(title=f"{report.backend} {report.label} vs fp32 (onnxruntime)")
    for column in ("image", "map max", "map mean", "conf max", "conf mean", "score err", "np++ max", "flipped"):
        table.add_column(column, justify="left" if column == "image" else "right")
    for row in report.images:
        table.add_row(row.image, f"{row.map_max:.2e}", f"{row.map_mean:.2e}", f"{row.conf_max:.2e}",
                      f"{row.conf_mean:.2e}", f"{row.score_error:.2e}", f"{row.noiseprint_max:.2e}",
                      "YES" if row.flipped else "no")
    overall = report.overall()
    table.add_row("overall", f"{overall['map_max']:.2e}", f"{overall['map_mean']:.2e}",
                  f"{overall['conf_max']:.2e}", f"{overall['conf_mean']:.2e}",
                  f"{overall['score_error_max']:.2e}", f"{overall['noiseprint_max']:.2e}",
                  str(overall["decisions_flipped"]))
    return table


def _print_validation(report) -> None:
    out = Console(highlight=False)
    out.print(_validation_table(report))
    for size, worst in report.by_size().items():
        out.print(f"{report.label} at {size} ({worst['images']} images): map {worst['map_max']:.2e}, "
                  f"conf {worst['conf_max']:.2e}, score {worst['score_error_max']:.2e}, "
                  f"np++ {worst['noiseprint_max']:.2e}, flipped {worst['decisions_flipped']}")
    for record in report.flops_by_precision:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in record["network_share"].items() if share)
        out.print(f"{report.precision} FLOPs at {record['size']}: {shares}")


def _map_budgets() -> dict:
    from trufor_trt.calibration.int8 import INT8_TARGET
    from trufor_trt.export.fp16_plan import FP16_BUDGET

    return {"fp16": FP16_BUDGET["map"], "int8": INT8_TARGET["map"]}


@app.command()
def validate(
    model: Path = typer.Option(..., "--model", help="Model folder from `trufor-trt export`."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Backend to validate."),
    precisions: Optional[List[Precision]] = typer.Option(
        None, "--precision", help="Variant to validate (repeat for several; default fp16, with --backend torch fp32)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="The model folder's checkpoint: what --backend torch runs."),
    images: Optional[Path] = typer.Option(None, "--images", help="Real images (default: synthetic)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report here (one "
                                             "variant: its report; several: {\"variants\": {precision: report}})."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: deviation against image size per precision."),
) -> None:
    """Faithfulness of engines or graph variants against the FP32 reference, per image and size."""
    import json

    from trufor_trt.files import write_atomically
    from trufor_trt.validate import plot_deviation, reports_json, validate as run_validation

    chosen = list(dict.fromkeys(precision.value for precision in precisions or []))
    _check_checkpoint(checkpoint)
    if backend == Backend.torch:
        if checkpoint is None:
            fail_setup("--backend torch runs the PyTorch network from --checkpoint FILE (the model folder's checkpoint)")
        if set(chosen) - {"fp32"}:
            fail_setup("--backend torch runs the network in fp32 only: --precision fp32")
    try:
        opened = _open_model(model, checkpoint)
        candidates = [(pick_backend(backend.value, opened.path, precision, on_notice=say), precision)
                      for precision in chosen or (["fp32"] if backend == Backend.torch else ["fp16"])]
        reports = run_validation(opened, candidates, images, checkpoint=checkpoint)
        for report in reports:
            _print_validation(report)
        if plot is not None:
            plot_deviation(reports, plot, _map_budgets())
    except TruforError as exc:
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc))
    if json_path is not None:
        write_atomically(json_path, (json.dumps(reports_json(reports), indent=2) + "\n").encode())


@app.command()
def bench(
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder from `trufor-trt export`."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="TruFor checkpoint (else random weights: speed "
                                                   "does not depend on their values)."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Backend to measure."),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help="Numeric precision."),
    sizes: str = typer.Option("512x512", "--sizes", help="Synthetic images, HxW[,HxW...]."),
    images: Optional[Path] = typer.Option(None, "--images", help="Real images instead of --sizes."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed images first, per case."),
    repeat: int = typer.Option(5, "--repeat", min=1, help="Timed images per case."),
    streams: int = typer.Option(1, "--streams", min=0,
                                help="Runners side by side in the Offline run (0: skip it)."),
    compare: Optional[str] = typer.Option(None, "--compare",
                                          help="torch: also run the PyTorch FP32 reference."),
    device: str = typer.Option("auto", "--device", help="torch runs: cpu, cuda or auto."),
    peak_gflops: Optional[float] = typer.Option(None, "--peak-gflops", min=0.001,
                                                help="The machine's nominal FP32 peak, if known."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Latency per megapixel, PNG (matplotlib)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown",
                                            help="Write the results table here (between the bench "
                                                 "markers if the file has them)."),
) -> None:
    """Benchmark per stage: latency (SingleStream), throughput (Offline), memory, FLOP/s."""
    import json

    from trufor_trt.files import write_atomically

    if compare not in (None, "torch"):
        fail_setup(f"--compare {compare}: only torch (the PyTorch reference) can be compared")
    try:
        from trufor_trt.benchmarks.bench import BenchOptions, parse_sizes, run_bench
        from trufor_trt.benchmarks.report import print_tables, write_markdown, write_plot

        options = BenchOptions(model=model, checkpoint=checkpoint, backend=backend.value,
                               precision=precision.value, sizes=parse_sizes(sizes), images=images,
                               warmup=warmup, repeat=repeat, streams=streams,
                               compare_torch=compare == "torch", device=device, peak_gflops=peak_gflops)
        report = run_bench(options, on_step=say)
    except TruforError as exc:
        fail_setup(str(exc))
    except ModuleNotFoundError as exc:
        fail_setup(_missing_package(exc))
    print_tables(report, Console(highlight=False, width=200))
    if json_path is not None:
        write_atomically(json_path, (json.dumps(report, indent=2) + "\n").encode())
    if markdown is not None:
        write_markdown(report, markdown)
    if plot is not None:
        try:
            write_plot(report, plot)
        except ModuleNotFoundError:
            fail_setup('--plot needs matplotlib: pip install "trufor-trt[bench]"')
    failed = [run for run in report["runs"] if "error" in run]
    for run in failed:
        console.print(f"[red]failed[/] {escape(run['input'])} {run['backend']}: {escape(run['error'])}")
    raise typer.Exit(EXIT_FAILED if failed else 0)
