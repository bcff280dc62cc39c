"""`watch` and `serve`: one runner kept loaded, for a folder's arrivals or for HTTP requests."""

import threading
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from trufor_trt.batch.analyze import AnalyzeOptions
from trufor_trt.batch.records import RESULTS_FILE, Record
from trufor_trt.batch.results_log import OutputFolderBusy, ResultsLogError, SummaryError
from trufor_trt.cli.common import (ACCEPT_UNVALIDATED, BACKEND, CHECKPOINT, DECODE_SECONDS, DEVICE, EXIT_FAILED,
                                   EXIT_STOPPED, MAX_FILE, MAX_MEMORY, MAX_PIXELS, MODEL, NO_PNG, PRECISION, QUIET,
                                   SAVE_NOISEPRINT, VERDICT_MARGIN, Backend, Precision, check_checkpoint,
                                   check_not_busy_folder, check_output_folder, check_results_folder, console,
                                   fail_setup, file_limit, load_runners, record_line, runner_spec, say, shown,
                                   verdict_guard)
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
    retry_truncated: float = typer.Option(
        30.0, "--retry-truncated", min=0.0,
        help="A file that reads as truncated is tried again until unchanged this long (a writer that "
             "paused), then filed as failed."),
    checkpoint: Optional[Path] = CHECKPOINT,
    model: Optional[Path] = MODEL,
    backend: Backend = BACKEND,
    precision: Precision = PRECISION,
    device: str = DEVICE,
    save_noiseprint: bool = SAVE_NOISEPRINT,
    no_png: bool = NO_PNG,
    max_pixels: int = MAX_PIXELS,
    decode_seconds: float = DECODE_SECONDS,
    max_file: str = MAX_FILE,
    max_memory: Optional[str] = MAX_MEMORY,
    accept_unvalidated: bool = ACCEPT_UNVALIDATED,
    verdict_margin: Optional[float] = VERDICT_MARGIN,
    quiet: bool = QUIET,
) -> None:
    """Analyse every image that appears in INBOX (and those there at start), one runner kept loaded;
    SIGTERM / Ctrl-C stop after the image in hand. A restart neither loses nor repeats an image."""
    from trufor_trt.service.inbox import InboxBusy, inbox_lock
    from trufor_trt.service.watch import WatchOptions

    folders = {option: folder for option, folder in (("--out", out), ("--done", done), ("--failed", failed))
               if folder is not None}
    _check_watch_folders(inbox, folders)
    check_checkpoint(checkpoint)
    options = WatchOptions(AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint, write_png=not no_png,
                                          max_pixels=max_pixels, max_file_bytes=file_limit(max_file),
                                          decode_seconds=decode_seconds),
                           done_dir=done, failed_dir=failed, poll=poll, settle=settle, retry_truncated=retry_truncated)
    try:
        with inbox_lock(inbox):  # before the model loads: a second watch is refused at once
            spec = runner_spec(backend.value, model, checkpoint, device, precision.value, max_memory,
                               accept_unvalidated)
            counts = _watch(inbox, load_runners(spec)[0], options, quiet, verdict_guard(spec, verdict_margin))
    except InboxBusy as exc:
        fail_setup(str(exc))
    console.print(f"stopped: {counts['ok']} analysed, {counts['error']} failed in this run; details in "
                  f"{shown(str(out / RESULTS_FILE))}", soft_wrap=True)


def _watch(inbox: Path, runner, options, quiet: bool, guard) -> Counter:
    """The watch until a signal stops it: its records per status (exits 3 when it had to stop)."""
    from trufor_trt.service.watch import Watch

    counts = Counter()

    def report(record: Record) -> None:
        counts[record.status] += 1
        if record.status == "error" or not quiet:
            console.print(record_line(record), soft_wrap=True)

    say(f"watching {inbox} ({runner.backend} {runner.precision}); SIGTERM or Ctrl-C stops after the image in hand")
    try:
        with stop_on_signals(threading.Event()) as stop:
            Watch(inbox, runner, options, stop, on_record=report, on_notice=say, guard=guard).run()
    except OutputFolderBusy as exc:
        fail_setup(str(exc))
    except (RunnerFailure, ResultsLogError) as exc:  # a supervisor (systemd: Restart=on-failure) starts it again
        console.print(f"[red]stopped[/]: {shown(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED)
    except SummaryError as exc:
        console.print(f"[red]error:[/] {shown(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    finally:
        runner.close()
        guard.close()
    return counts


TOKEN_FILE = typer.Option(None, "--token-file", help="Read the bearer token from this file (not visible in ps).")
BODY_TIMEOUT = typer.Option(60.0, "--body-timeout", min=0.1,
                            help="Seconds a request's whole body may take to arrive; beyond: 408.")
HEADER_TIMEOUT = typer.Option(10.0, "--header-timeout", min=0.1,
                              help="Seconds a connection may take to send a request's headers (from opening, "
                                   "or from its previous answer); then it is closed.")
MAX_CONNECTIONS = typer.Option(None, "--max-connections", min=1,
                               help="Open connections at most (default 256, fewer under a low ulimit -n); a new "
                                    "one displaces the longest idle one. Must stay 128 below the file limit.")
SHUTDOWN_TIMEOUT = typer.Option(30.0, "--shutdown-timeout", min=0.0,
                                help="After SIGTERM, seconds to answer the open requests; then the rest are "
                                     "dropped and the process exits.")


def _serve_settings(analyze: AnalyzeOptions, token, max_queue: int, max_body: str, body_timeout: float):
    from trufor_trt.engine.memory_budget import parse_memory
    from trufor_trt.service.http_app import ServeSettings

    try:
        return ServeSettings(analyze, token=token, max_queue=max_queue, max_body=parse_memory(max_body),
                             body_timeout=body_timeout)
    except (TruforError, ValueError) as exc:
        fail_setup(f"--max-body {max_body}: {exc}")
        raise


def _checked_reach(host: str, token: Optional[str], max_connections: Optional[int]) -> int:
    """The connection limit, once the host has a token where it is reachable from elsewhere and
    the limit leaves room for the process's own descriptors."""
    from trufor_trt.service.connections import connection_limit_problem, default_max_connections
    from trufor_trt.service.serve import is_loopback

    if not is_loopback(host) and not token:
        fail_setup(f"--host {host} is reachable from other machines: give --token-file (or --token, "
                   "TRUFOR_TRT_TOKEN)")
    max_connections = max_connections or default_max_connections()
    if connection_limit_problem(max_connections):
        fail_setup(connection_limit_problem(max_connections))
    return max_connections


def _token(token: Optional[str], token_file: Optional[Path]) -> Optional[str]:
    """The bearer token: --token (or TRUFOR_TRT_TOKEN), or the first line of --token-file."""
    if token_file is None:
        return token
    if token:
        fail_setup("give the token once: --token (or TRUFOR_TRT_TOKEN) or --token-file")
    try:
        lines = token_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail_setup(f"--token-file {token_file}: cannot be read ({exc})")
        raise
    if not lines or not lines[0].strip():
        fail_setup(f"--token-file {token_file}: empty")
    return lines[0].strip()


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any but loopback needs --token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    token: Optional[str] = typer.Option(None, "--token", envvar="TRUFOR_TRT_TOKEN",
                                        help="Bearer token every route but /healthz requires "
                                             "(or the TRUFOR_TRT_TOKEN environment variable)."),
    max_queue: int = typer.Option(8, "--max-queue", min=0,
                                  help="Requests that may wait for the runner; beyond: 503 + Retry-After."),
    token_file: Optional[Path] = TOKEN_FILE,
    max_body: str = typer.Option("64M", "--max-body", help="Largest request body, e.g. 64M; beyond: 413."),
    body_timeout: float = BODY_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: Optional[int] = MAX_CONNECTIONS,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
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
    decode_seconds: float = DECODE_SECONDS,
    max_memory: Optional[str] = MAX_MEMORY,
    accept_unvalidated: bool = ACCEPT_UNVALIDATED,
    verdict_margin: Optional[float] = VERDICT_MARGIN,
) -> None:
    """HTTP API: POST /v1/analyze (the image as the body or multipart field "image"; ?outputs=map
    adds the maps), GET /healthz, /readyz, /metrics. One runner, one inference at a time."""
    from trufor_trt.service.connections import ConnectionLimits
    from trufor_trt.service.http_app import create_app
    from trufor_trt.service.serve import serve_app

    token = _token(token, token_file)
    max_connections = _checked_reach(host, token, max_connections)
    settings = _serve_settings(AnalyzeOptions(out_dir=out, save_noiseprint=save_noiseprint, write_png=not no_png,
                                              overwrite=True, max_pixels=max_pixels, decode_seconds=decode_seconds),
                               token, max_queue, max_body, body_timeout)
    if out is not None:
        check_results_folder(out)
    check_checkpoint(checkpoint)
    spec = runner_spec(backend.value, model, checkpoint, device, precision.value, max_memory, accept_unvalidated)
    [runner], guard = load_runners(spec), verdict_guard(spec, verdict_margin)
    say(f"serving {runner.backend} {runner.precision} on http://{host}:{port}; SIGTERM or Ctrl-C "
        "stops after the requests in hand")
    app = create_app(runner, settings, guard)
    try:
        started = serve_app(app, host, port, ConnectionLimits(max_connections, header_timeout), shutdown_timeout)
    finally:
        runner.close()
        guard.close()
    if not started:
        fail_setup(f"the server did not start on {host}:{port} (see the message above)")
    if app.state.service.failure is not None:
        console.print(f"[red]stopped[/]: {shown(app.state.service.failure)}", soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED)
