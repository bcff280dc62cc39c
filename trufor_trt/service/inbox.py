"""A watched folder: which of its files are complete images, and filing the originals away.

A file counts as complete once its size and modification time have stayed the same for `settle`
seconds of watching (a camera or a copy writing in pieces keeps changing both). A writer that
pauses longer than that mid-file leaves a file that reads as truncated: watch tries it again
until it has been left unchanged for --retry-truncated seconds (watch.py). Writers can avoid
both by writing under a hidden name (".name") or a non-image suffix ("name.jpg.part") and
renaming when done: those are never read. One watch at a time holds an inbox (inbox_lock).
"""

import errno
import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from trufor_trt.batch.inputs import IMAGE_SUFFIXES, ImageJob
from trufor_trt.batch.provenance import input_sha256
from trufor_trt.errors import TruforError
from trufor_trt.files import temporary_beside

SETTLE_SECONDS = 2.0


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or below it, links resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


class Inbox:
    """Scans `folder` (recursively) and tells which images have settled."""

    def __init__(self, folder: Path, settle: float = SETTLE_SECONDS, exclude=()):
        self.folder = Path(folder)
        self.settle = settle
        # Only folders below this one can hold its files (the CLI refuses them: usually none).
        self._exclude = [Path(path) for path in exclude if is_inside(path, self.folder)]
        self._seen = {}  # path -> ((size, mtime_ns), monotonic time it was first seen so)

    def _candidates(self):
        for path in sorted(self.folder.rglob("*")):
            relative = path.relative_to(self.folder)
            # Links and special files too: each gets its reason (watch refuses links, the
            # decoder anything but a regular file), rather than lying in the inbox unexplained.
            if (path.suffix.lower() in IMAGE_SUFFIXES and not _hidden(relative)
                    and not any(is_inside(path, folder) for folder in self._exclude)
                    and (path.is_symlink() or not path.is_dir())):
                yield path, relative

    def scan(self) -> list:
        """[(ImageJob, (size, mtime_ns))] of the images unchanged for `settle` seconds."""
        now, seen, ready = time.monotonic(), {}, []
        for path, relative in self._candidates():
            try:
                stat = path.lstat()  # a link's own: never waits on what it points to
            except OSError:  # gone since the listing
                continue
            key = (stat.st_size, stat.st_mtime_ns)
            earlier = self._seen.get(path)
            since = earlier[1] if earlier is not None and earlier[0] == key else now
            seen[path] = (key, since)
            if now - since >= self.settle:
                ready.append((ImageJob(path, relative.as_posix()), key))
        self._seen = seen
        return ready

    def settling(self) -> bool:
        """Whether some image seen in the last scan has not settled yet."""
        now = time.monotonic()
        return any(now - since < self.settle for _, since in self._seen.values())


class InboxBusy(TruforError):
    pass


@contextmanager
def inbox_lock(folder: Path):
    """Hold `folder` as this process's inbox: InboxBusy when another watch holds it (two would
    analyse every image twice and race to file each away). A lock on the folder itself, which
    the kernel drops when its holder exits, however it exits; nothing is written in the inbox."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise InboxBusy(f"INBOX {folder}: another trufor-trt watch is watching it (one watch per inbox)") from None
    try:
        yield
    finally:
        os.close(descriptor)


def free_place(target: Path) -> Path:
    """`target`, or name-2.ext, name-3.ext... where it is taken: an original is never overwritten."""
    candidate, count = target, 1
    while candidate.exists() or candidate.is_symlink():
        count += 1
        candidate = target.with_name(f"{target.stem}-{count}{target.suffix}")
    return candidate


class OriginalChanged(Exception):
    """The original's bytes are no longer those that were analysed."""


def file_away(path: Path, target: Path, analysed_sha256) -> Path:
    """Move an original to `target` (the next free name if it is taken by now), once its bytes
    are checked to be those analysed (OriginalChanged if not): one rename on the same file
    system; elsewhere a copy under a temporary name, checked again, a rename, then the
    original's removal. Returns where it went."""
    if input_sha256(path) != analysed_sha256:
        raise OriginalChanged(path)
    target = free_place(Path(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # not a move to another file system
            raise
        temporary = temporary_beside(target)
        try:
            shutil.copy2(path, temporary)
            if input_sha256(temporary) != analysed_sha256:
                raise OriginalChanged(path) from None
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        path.unlink()
    return target
