"""`watch` and `serve`: one runner kept loaded, for a folder's arrivals or for HTTP requests."""

import threading
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from trufor_trt.batch.analyze import AnalyzeOptions
from trufor_trt.batch.records import RESULTS_FILE, Record
from trufor_trt.batch.results_log import OutputFolderBusy, ResultsLogError, SummaryError
from trufor_trt.cli.common import (ACCEPT_UNVALIDATED, BACKEND, CHECKPOINT, DEVICE, EXIT_FAILED, EXIT_STOPPED, MAX_MEMORY, MAX_PIXELS,
                                   MODEL, NO_PNG, PRECISION, QUIET, SAVE_NOISEPRINT, Backend, Precision,
                                   check_checkpoint, check_not_busy_folder, check_output_folder,
                                   check_results_folder, console, fail_setup, load_runners, record_line,
                                   runner_spec, say)
from trufor_trt.errors import RunnerFailure, TruforError
from trufor_trt.signals import stop_on_signals


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
        check_output_folder(folder, option)
    check_not_busy_folder(folders["--out"])


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
    accept_unvalidated: bool = ACCEPT_UNVALIDATED,
    quiet: bool = QUIET,
) -> None:
    """Analyse every image that appears in INBOX (and those there at start), one runner kept
    loaded; SIGTERM / Ctrl-C stop after the image in hand. A restart after a crash neither loses
    nor repeats an image: the outputs and results.jsonl are the record."""
    from trufor_trt.service.watch import Watch, WatchOptions

    folders = {option: folder for option, folder in (("--out", out), ("--done", done), ("--failed", failed))
               if folder is not None}
    _check_watch_folders(inbox, folders)
    check_checkpoint(checkpoint)
    [runner] = load_runners(runner_spec(backend.value, model, checkpoint, device, precision.value, max_memory,
                      accept_unvalidated))
    options = WatchOptions(AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint, write_png=not no_png,
                                          max_pixels=max_pixels),
                           done_dir=done, failed_dir=failed, poll=poll, settle=settle)

    counts = Counter()

    def report(record: Record) -> None:
        counts[record.status] += 1
        if record.status == "error" or not quiet:
            console.print(record_line(record), soft_wrap=True)

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
    accept_unvalidated: bool = ACCEPT_UNVALIDATED,
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
    except (TruforError, ValueError) as exc:
        fail_setup(f"--max-body {max_body}: {exc}")
    if out is not None:
        check_results_folder(out)
    check_checkpoint(checkpoint)
    [runner] = load_runners(runner_spec(backend.value, model, checkpoint, device, precision.value, max_memory,
                      accept_unvalidated))
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
