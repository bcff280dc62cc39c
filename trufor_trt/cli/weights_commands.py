"""`weights download | add | path`: the official TruFor weights in the user's data folder."""

import contextlib
import sys
from pathlib import Path

import typer

from trufor_trt.cli.common import console, fail_setup, say


def download(
    accept_license: bool = typer.Option(False, "--accept-license",
                                        help="Accept the weights' licence (non-commercial research use) "
                                             "without being asked."),
    url: str = typer.Option(None, "--url", help="Where the authors' TruFor_weights.zip is (default: their URL)."),
    md5: str = typer.Option(None, "--md5", help="The archive's MD5 (default: the one the authors publish)."),
    timeout: float = typer.Option(30.0, "--timeout", min=1.0, help="Seconds to wait for the server."),
) -> None:
    """Download the TruFor authors' weights (about 250 MB), verify them and store trufor.pth.tar
    where --checkpoint defaults to it. Broken off, the same command resumes."""
    from trufor_trt.weights import LICENSE_TERMS, OFFICIAL_MD5, OFFICIAL_URL, download as fetch_weights

    console.print(LICENSE_TERMS, highlight=False, markup=False)
    if not accept_license and not _accepted_interactively():
        fail_setup("the licence was not accepted: nothing downloaded (--accept-license accepts it)")
    with _progress() as update:
        stored = fetch_weights(url or OFFICIAL_URL, md5 or OFFICIAL_MD5, timeout, on_progress=update, on_step=say)
    typer.echo(str(stored))


def _accepted_interactively() -> bool:
    if not sys.stdin.isatty():
        return False
    return typer.confirm("Do you accept these terms?", default=False, err=True)


@contextlib.contextmanager
def _progress():
    """A transfer bar on stderr; it gives a callable taking (bytes so far, total or None)."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with Progress(*Progress.get_default_columns()[:2], DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("TruFor_weights.zip", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def add(file: Path = typer.Argument(..., help="TruFor_weights.zip as the authors publish it, or its "
                                             "trufor.pth.tar.")) -> None:
    """Store weights you downloaded yourself, after verifying them."""
    from trufor_trt.weights import add as store

    typer.echo(str(store(file, on_step=say)))


def path() -> None:
    """Print where the weights are stored (exit code 1 while they are not there yet)."""
    from trufor_trt.weights import installed_weights, weights_path

    typer.echo(str(weights_path()))
    if installed_weights() is None:
        say("not downloaded yet: trufor-trt weights download")
        raise typer.Exit(1)
