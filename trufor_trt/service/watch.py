"""`trufor-trt watch`: analyse every image that lands in a folder, with one runner kept loaded.

The outputs on disk and results.jsonl are the record: an image whose latest record says it was
analysed (same input bytes, model, backend, precision, version) and whose outputs exist is not
analysed again, so a restart after a crash or `kill -9` neither loses nor repeats an image.
Originals move to --done / --failed only after their record is written.
"""

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..batch.analyze import AnalyzeOptions, ResultsLog, run_job
from ..batch.provenance import input_sha256, provenance, why_redo
from ..batch.summary import latest_records
from ..engine.runner import Runner
from ..errors import one_line
from .inbox import SETTLE_SECONDS, Inbox, file_away

POLL_SECONDS = 5.0
WAIT_SLICE = 0.2  # how often a wait looks at the stop flag


@dataclass(frozen=True)
class WatchOptions:
    analyze: AnalyzeOptions
    done_dir: Optional[Path] = None
    failed_dir: Optional[Path] = None
    poll: float = POLL_SECONDS  # full rescan interval, for file systems without change events
    settle: float = SETTLE_SECONDS


class WakeUps:
    """wait(timeout) returns early when the folder changes (file-system events through
    watchfiles, in a thread of its own) or when `stop` is set; without events it just waits."""

    def __init__(self, folder: Path, stop: threading.Event, on_notice: Callable[[str], None]):
        self._changed = threading.Event()
        self._stop = stop
        self._on_notice = on_notice
        try:
            import watchfiles
        except ImportError:
            on_notice("watchfiles is not installed: polling the folder only")
            return
        threading.Thread(target=self._follow, args=(watchfiles, folder), daemon=True,
                         name="trufor-watch-events").start()

    def _follow(self, watchfiles, folder: Path) -> None:
        try:
            for _ in watchfiles.watch(folder, stop_event=self._stop, debounce=100, step=50,
                                      raise_interrupt=False):
                self._changed.set()
        except Exception as exc:  # e.g. the inotify watch limit: polling still works
            self._on_notice(f"file-system events stopped ({one_line(exc)}): polling the folder only")

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._stop.is_set() and not self._changed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.wait(min(left, WAIT_SLICE))
        self._changed.clear()


def _done_before(earlier: Optional[dict], path: Path, runner: Runner) -> bool:
    """Whether the latest record of this input stands for it now: analysed from the same bytes by
    the same model, backend, precision and version, its outputs still there."""
    if earlier is None or earlier.get("status") not in ("ok", "skipped") or not earlier.get("provenance"):
        return False
    if why_redo(earlier["provenance"], provenance(input_sha256(path), runner)) is not None:
        return False
    return all(Path(output).is_file() for output in earlier["outputs"])


class Watch:
    """The loop: scan, analyse what has settled (one image at a time), file the originals
    away, wait for a change or the next poll; until `stop` is set."""

    def __init__(self, inbox: Path, runner: Runner, options: WatchOptions, stop: threading.Event,
                 on_record: Callable[[dict], None], on_notice: Callable[[str], None]):
        self.runner, self.options, self.stop = runner, options, stop
        self.on_record, self.on_notice = on_record, on_notice
        out_dir = options.analyze.out_dir
        self.inbox = Inbox(inbox, options.settle,
                           exclude=[folder for folder in (out_dir, options.done_dir, options.failed_dir) if folder])
        self.earlier = latest_records(out_dir)  # input -> its latest record, from earlier runs
        self.handled = {}  # path -> (size, mtime_ns) when this run handled it

    def run(self) -> dict:
        """Counts of this run's records per status."""
        with ResultsLog(self.options.analyze.out_dir) as log:
            wake_ups = WakeUps(self.inbox.folder, self.stop, self.on_notice)
            while not self.stop.is_set():
                if self._pass(log):
                    log.write_summary()
                wake_ups.wait(self.options.settle / 2 if self.inbox.settling() else self.options.poll)
        return log.summary

    def _pass(self, log: ResultsLog) -> bool:
        """Handle every settled image not handled yet; whether any record was written."""
        wrote = False
        for job, key in self.inbox.scan():
            if self.stop.is_set():
                break
            if self.handled.get(job.path) == key:
                continue
            self.handled[job.path] = key
            wrote |= self._handle(job, log)
        return wrote

    def _handle(self, job, log: ResultsLog) -> bool:
        record = self.earlier.get(str(job.path))
        analysed = not _done_before(record, job.path, self.runner)
        if analysed:
            record = run_job(job, self.runner, self.options.analyze).record
            log.add(record)
            self.on_record(record)
        self._file_away(job, record["status"])
        return analysed

    def _file_away(self, job, status: str) -> None:
        folder = self.options.failed_dir if status == "error" else self.options.done_dir
        if folder is None:
            return
        try:
            file_away(job.path, job.relative, folder)
        except OSError as exc:
            self.on_notice(f"could not move {job.path} to {folder}: {one_line(exc)}")
