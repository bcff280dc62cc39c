"""`trufor-trt weights`: the TruFor authors' published weights, fetched once into the user's data
folder, verified, and used by default where no --checkpoint or --model is given.

The weights are never bundled: they are the authors' (GRIP-UNINA), for non-commercial research
use, and a user downloads them from the authors' URL after accepting those terms. What is
verified: the archive's MD5 (the one the authors publish), a `trufor.pth.tar` inside it, and the
checkpoint itself (its SHA-256 where it is the official file, else a strict load of every tensor
of the official layout). A download is written to a `.part` file and resumed from there, so a
broken connection costs only what was not yet received.
"""

import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional

from trufor_trt.batch.provenance import is_official
from trufor_trt.errors import TruforError
from trufor_trt.files import md5_file, sha256_file, temporary_beside

OFFICIAL_URL = "https://www.grip.unina.it/download/prog/TruFor/TruFor_weights.zip"
OFFICIAL_MD5 = "7bee48f3476c75616c3c5721ab256ff8"  # the archive's, as the authors' README gives it
CHECKPOINT_NAME = "trufor.pth.tar"
DATA_ENV = "TRUFOR_TRT_DATA"
LICENSE_TERMS = (
    "The TruFor weights are the work of the Image Processing Research Group of the University "
    "Federico II of Naples (GRIP-UNINA). Their licence allows informational and non-profit use "
    "only (research, not commercial work); the full terms are in LICENSE.txt of "
    "https://github.com/grip-unina/TruFor. trufor-trt does not redistribute them: you download "
    "them from the authors and accept their terms.")
CHUNK = 1 << 20


class WeightsError(TruforError):
    """The weights cannot be fetched, verified or stored."""


def data_folder() -> Path:
    """$TRUFOR_TRT_DATA, else $XDG_DATA_HOME/trufor-trt, else ~/.local/share/trufor-trt."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "trufor-trt"


def weights_path() -> Path:
    return data_folder() / "weights" / CHECKPOINT_NAME


def installed_weights() -> Optional[Path]:
    """The stored checkpoint, None before `weights download` or `weights add`."""
    path = weights_path()
    return path if path.is_file() else None


def manual_steps(url: str) -> str:
    return (f"download {url} yourself (a browser, another machine), then "
            "`trufor-trt weights add TruFor_weights.zip`")


def download(url: str = OFFICIAL_URL, md5: str = OFFICIAL_MD5, timeout: float = 30.0,
             on_progress: Callable[[int, Optional[int]], None] = lambda done, total: None,
             on_step=print) -> Path:
    """Fetch the archive (resuming a `.part` left by an earlier try), verify it, store its
    checkpoint; returns where. `on_progress(bytes so far, total or None)`."""
    part = weights_path().with_name(Path(url.split("?")[0]).name or "weights.zip").with_suffix(".zip.part")
    part.parent.mkdir(parents=True, exist_ok=True)
    _fetch(url, part, timeout, on_progress, on_step)
    found = md5_file(part)
    if found != md5:
        part.unlink()
        raise WeightsError(f"{url}: the archive's MD5 is {found}, not the published {md5}: it is not the "
                           f"authors' archive (deleted; nothing stored). Try again, or {manual_steps(url)}")
    try:
        return add(part, on_step=on_step)
    finally:
        part.unlink()  # verified or not, resuming it cannot help


def _fetch(url: str, part: Path, timeout: float, on_progress, on_step) -> None:
    """The whole resource at `url` into `part`, resuming from its length."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after what we have: the part is whole
            return
        raise WeightsError(f"{url}: the server answered HTTP {exc.code} {exc.reason}; {manual_steps(url)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(f"{url}: cannot be reached ({reason}); {manual_steps(url)}") from None
    with response:
        resumed = have and response.status == 206
        if have:
            on_step(f"resuming after {have / 1e6:.1f} MB" if resumed else "the server cannot resume: starting again")
        have = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        _receive(response, part, have, total, on_progress, url)


def _receive(response, part: Path, have: int, total: Optional[int], on_progress, url: str) -> None:
    with open(part, "ab" if have else "wb") as out:
        try:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                have += len(chunk)
                on_progress(have, total)
        except (http.client.IncompleteRead, OSError) as exc:
            raise WeightsError(f"{url}: the download broke off after {have / 1e6:.1f} MB ({type(exc).__name__}): "
                               "run the same command again to resume") from None
    if total is not None and have < total:
        raise WeightsError(f"{url}: the download broke off after {have / 1e6:.1f} of {total / 1e6:.1f} MB: "
                           "run the same command again to resume")


def add(source, on_step=print) -> Path:
    """Store the checkpoint of `source` (the authors' zip, or a trufor.pth.tar) after verifying
    it; returns where. Another checkpoint than the official one is stored with a warning."""
    source = Path(source)
    if not source.is_file():
        raise WeightsError(f"{source}: no such file")
    target = weights_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_beside(target)
    try:
        _checkpoint_out_of(source, staged)
        official = verify_checkpoint(staged, name=source.name)
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    on_step(f"stored {target}" + ("" if official else
            " (not the official trufor.pth.tar: results made with it say so)"))
    return target


def _checkpoint_out_of(source: Path, staged: Path) -> None:
    """The checkpoint file of `source` (a zip holding one trufor.pth.tar, or the file itself) copied to `staged`."""
    if not zipfile.is_zipfile(source):
        shutil.copyfile(source, staged)
        return
    try:
        with zipfile.ZipFile(source) as archive:
            members = [name for name in archive.namelist() if Path(name).name == CHECKPOINT_NAME]
            if len(members) != 1:
                raise WeightsError(f"{source.name}: not TruFor's weights archive: it holds "
                                   f"{len(members) or 'no'} {CHECKPOINT_NAME}")
            with archive.open(members[0]) as packed, open(staged, "wb") as out:
                shutil.copyfileobj(packed, out, CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise WeightsError(f"{source.name}: the archive cannot be read ({exc})") from None


def verify_checkpoint(path: Path, name: str) -> bool:
    """Whether `path` is the official checkpoint (by SHA-256); another file must load strictly
    into the network (every tensor of the official layout), else WeightsError."""
    if is_official(sha256_file(path)):
        return True
    try:
        from trufor_trt.model.checkpoint import load_trufor
    except ModuleNotFoundError:
        raise WeightsError(f"{name}: not the official checkpoint, and checking another one needs torch "
                           "(pip install \"trufor-trt[export]\")") from None
    try:
        load_trufor(path)
    except TruforError as exc:
        raise WeightsError(f"{name}: not a TruFor checkpoint: {str(exc).split(': ', 1)[-1]}") from None
    return False
